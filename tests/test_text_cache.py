"""The text-embedding cache of training: a frozen encoder runs once per caption, the cache answers exactly what
the encoder returns (pad rows included), new captions are appended, another encoder rebuilds it, and the
encoder's weights leave memory."""
import pytest
import torch
from test_text import _save_tiny_t5

from sora_fast.data.text_cache import CachedTextEncoder, ensure_text_cache, release_text_encoder, text_encoder_key
from sora_fast.models.text import T5TextEncoder, TinyTextEncoder

CAPTIONS = ["a red circle moving left", "blue square", "a red circle moving left", "up"]


def _tiny_t5(path, model_type):
    _save_tiny_t5(path, model_type)
    return path


def per_caption(enc, captions):
    return [enc.encode([c]).tokens for c in captions]


@pytest.mark.parametrize("kind", ["tiny", "t5"])
def test_cache_answers_what_the_encoder_does(kind, tmp_path):
    if kind == "tiny":
        enc = TinyTextEncoder(dim=32, layers=1, heads=2)
    else:
        enc = T5TextEncoder(str(_tiny_t5(tmp_path / "t5", "umt5")), max_length=12, pad_to=16)
    out, n = ensure_text_cache(enc, CAPTIONS, tmp_path / "text", batch_size=1, progress=False)
    assert n == 4                                     # three distinct captions and the empty one
    cached = CachedTextEncoder(out, pad_to=getattr(enc, "pad_to", None))
    assert cached.dim == enc.dim
    prompts = CAPTIONS + [""]
    got = cached.encode(prompts)
    assert all(torch.equal(a, b) for a, b in zip(got.unpack(got.tokens), per_caption(enc, prompts)))
    with pytest.raises(KeyError, match="prompt 'a green cone' is not in the text cache"):
        cached.encode(["a green cone"])


def test_new_captions_append_and_another_encoder_rebuilds(tmp_path, capsys):
    enc = TinyTextEncoder(dim=32, layers=1, heads=2)
    ensure_text_cache(enc, CAPTIONS, tmp_path / "text", progress=False)
    assert ensure_text_cache(enc, CAPTIONS, tmp_path / "text", progress=False)[1] == 0
    assert ensure_text_cache(enc, CAPTIONS + ["a green cone"], tmp_path / "text", progress=False)[1] == 1
    assert len(list((tmp_path / "text").glob("text_*.safetensors"))) == 2
    other = TinyTextEncoder(dim=32, layers=1, heads=2)                 # other random weights: another key
    assert text_encoder_key(other) != text_encoder_key(enc)
    assert ensure_text_cache(other, CAPTIONS, tmp_path / "text", batch_size=1, progress=False)[1] == 4
    assert "made by another text encoder; re-encoding it" in capsys.readouterr().err
    got = CachedTextEncoder(tmp_path / "text").encode(["blue square"]).tokens
    assert torch.equal(got, other.encode(["blue square"]).tokens)


def test_release_frees_the_t5_and_keeps_its_description(tmp_path):
    enc = T5TextEncoder(str(_tiny_t5(tmp_path / "t5", "umt5")), max_length=12, pad_to=16)
    key = text_encoder_key(enc)
    release_text_encoder(enc)
    assert all(p.device.type == "meta" for p in enc.model.parameters())
    assert text_encoder_key(enc) == key and enc.path == str(tmp_path / "t5")
