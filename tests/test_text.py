"""Text encoders: packed output against independent per-prompt references, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from sora_fast.models.text import T5TextEncoder, TinyTextConfig, TinyTextEncoder, load_text_encoder
from tests._utils import assert_close

PROMPTS = ["a red circle moving left slowly", "", "Blue SQUARE, up!", "a " * 80 + "end"]


def _tiny_reference(enc: TinyTextEncoder, prompt: str) -> torch.Tensor:
    """One prompt alone through plain torch (SDPA, no packing): ``(L, dim)``."""
    ids = torch.tensor(enc.token_ids(prompt))
    x = enc.embed(ids) + enc.pos(torch.arange(len(ids)))
    for blk in enc.blocks:
        n, d = x.shape
        q, k, v = blk.qkv(blk.norm1(x)).view(n, 3, blk.heads, d // blk.heads).permute(1, 2, 0, 3)  # (H, L, Dh)
        x = x + blk.out(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, d))
        x = x + blk.mlp(blk.norm2(x))
    return enc.norm(x)


def test_tiny_packed_matches_each_prompt_alone():
    enc = TinyTextEncoder(TinyTextConfig(dim=48, layers=2, heads=3, max_words=40))
    packed = enc.encode(PROMPTS)
    assert packed.num_sequences == len(PROMPTS)
    outs = packed.unpack(packed.tokens)
    for p, out in zip(PROMPTS, outs):
        ref = _tiny_reference(enc, p)
        assert out.shape == ref.shape
        assert_close(out, ref, torch.float32, msg=repr(p))
    # the empty prompt is the end token alone; long prompts are cut at max_words (+ end token)
    assert packed.seqlens[1] == 1 and packed.seqlens[3] == 41


def test_tiny_words_are_case_and_punctuation_insensitive_and_trainable():
    enc = TinyTextEncoder(dim=32)
    assert enc.token_ids("Red, CIRCLE!") == enc.token_ids("red circle")
    assert enc.token_ids("red") != enc.token_ids("blue")
    out = enc.encode(["red circle", "blue"]).tokens
    out.square().sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, err, match", [
    ("a prompt", TypeError, "single str"),
    ([], TypeError, "non-empty list"),
    (["ok", 3], TypeError, r"prompts\[1\] must be a str"),
])
def test_tiny_bad_prompts(bad, err, match):
    with pytest.raises(err, match=match):
        TinyTextEncoder(dim=32).encode(bad)


def test_tiny_bad_config():
    with pytest.raises(ValueError, match="dim=30 must split into heads=4"):
        TinyTextConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="layers must be a positive int"):
        TinyTextConfig(layers=0)
    with pytest.raises(TypeError, match="not both"):
        TinyTextEncoder(TinyTextConfig(), dim=16)
    with pytest.raises(ValueError, match="'tiny' or a directory"):
        load_text_encoder("no/such/dir")


def _save_tiny_t5(path, model_type: str):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "moving", "left", "blue", "square", "up"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    cfg_cls = transformers.UMT5Config if model_type == "umt5" else transformers.T5Config
    cfg = cfg_cls(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, dropout_rate=0.0)
    model_cls = transformers.UMT5EncoderModel if model_type == "umt5" else transformers.T5EncoderModel
    model = model_cls(cfg).eval()
    model.save_pretrained(path)
    return fast, model


@pytest.mark.parametrize("model_type", ["t5", "umt5"])
def test_t5_packs_only_real_tokens_and_matches_unpadded_runs(tmp_path, model_type):
    tok, model = _save_tiny_t5(tmp_path, model_type)
    enc = T5TextEncoder(str(tmp_path), max_length=12)
    prompts = ["a red circle moving left", "blue", ""]
    packed = enc.encode(prompts)
    assert enc.dim == 32
    for p, out in zip(prompts, packed.unpack(packed.tokens)):
        ids = tok(p, return_tensors="pt").input_ids                     # real tokens + </s>, no padding
        with torch.no_grad():
            ref = model(ids).last_hidden_state[0]
        assert_close(out, ref, torch.float32, msg=repr(p))

    padded = T5TextEncoder(str(tmp_path), max_length=12, pad_to=16).encode(prompts)
    assert padded.seqlens == [16, 16, 16]
    for full, real in zip(padded.unpack(padded.tokens), packed.unpack(packed.tokens)):
        assert torch.equal(full[: real.shape[0]], real)
        assert torch.count_nonzero(full[real.shape[0]:]) == 0


def test_t5_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="path must be an existing directory"):
        T5TextEncoder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pad_to must be None or an int >= max_length=8"):
        T5TextEncoder(str(tmp_path), max_length=8, pad_to=4)
