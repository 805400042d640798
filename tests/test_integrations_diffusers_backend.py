"""HunyuanVideo and LTX-Video through the ``sora_fast`` backend of diffusers' attention dispatcher, CogVideoX
through swapped processors: against the same models before acceleration; the dispatcher backend by name;
packed attention with key-padding masks against SDPA."""
import _diffusers_utils
import pytest
import torch
from _diffusers_utils import (
    FP32_REL,
    check_accelerated,
    cogvideox_inputs,
    hunyuan_inputs,
    ltx_inputs,
    run,
    tiny_cogvideox,
    tiny_hunyuan,
    tiny_ltx,
)
from diffusers.models import attention_dispatch
from test_dit import rel_err

from sora_fast.integrations import diffusers as integ
from sora_fast.integrations.diffusers.dispatch import _dispatch_fn

calls, kernels = _diffusers_utils.calls, _diffusers_utils.kernels  # the shared fixtures


OTHERS = {"hunyuan": (tiny_hunyuan, hunyuan_inputs), "ltx": (tiny_ltx, ltx_inputs),
          "cogvideox": (tiny_cogvideox, cogvideox_inputs)}


@pytest.mark.parametrize("name", list(OTHERS))
@pytest.mark.parametrize("backend", [None, "triton"])
def test_other_transformers_match_and_undo_restores(name, backend, calls, kernels):
    build, inputs = OTHERS[name]
    m, kw = build(), inputs()
    check_accelerated(m, kw, calls, {"spacetime_attention"}, backend=backend)
    if backend == "triton":
        assert ("spacetime_attention", "triton") in kernels


def test_padding_masks_matter():
    """The masked inputs above are a real test: ignoring the padding changes the output."""
    for m, kw in ((tiny_hunyuan(), hunyuan_inputs()), (tiny_ltx(), ltx_inputs())):
        unmasked = {**kw, "encoder_attention_mask": torch.ones_like(kw["encoder_attention_mask"])}
        assert rel_err(run(m, **unmasked), run(m, **kw)) > 1e-3


def test_dispatcher_backend_by_name():
    """The registered backend is an ordinary dispatcher backend: diffusers' own context manager uses it."""
    m, kw = tiny_ltx(), ltx_inputs()
    ref = run(m, **kw)
    assert integ.register_attention_backends() == ["sora_fast", "sora_fast_torch", "sora_fast_triton",
                                                   "sora_fast_cuda"]
    with attention_dispatch.attention_backend(integ.dispatch_backend_name("torch")):
        out = run(m, **kw)
    assert rel_err(out, ref) <= FP32_REL
    assert attention_dispatch.AttentionBackendName("sora_fast").value == "sora_fast"


def test_dispatcher_backend_rejects_what_it_cannot_do():
    fn = _dispatch_fn(None)
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="no dropout, got dropout_p=0.1"):
        fn(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="not causal"):
        fn(q, q, q, is_causal=True)
    with pytest.raises(ValueError, match="context parallelism"):
        fn(q, q, q, _parallel_config=object())
    with pytest.raises(ValueError, match=r"differs between heads or queries"):
        fn(q, q, q, attn_mask=torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"key-padding mask .* got other additive values, e.g. 0.5"):
        fn(q, q, q, attn_mask=torch.full((1, 1, 1, 3), 0.5))
    with pytest.raises(ValueError, match=r"must broadcast to \(B, H, Sq, Sk\) = \(1, 2, 3, 3\), got \(4,\)"):
        fn(q, q, q, attn_mask=torch.ones(4, dtype=torch.bool))


def test_key_padding_mask_forms():
    """Bool (B, 1, 1, Sk), additive (B, H, 1, Sk) with -inf, an all-masked additive row (= no mask):
    each equals SDPA on the same mask."""
    q, k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4)
    keep = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    additive = torch.zeros(2, 2, 1, 6).masked_fill(~keep[:, None, None], float("-inf"))
    all_masked = torch.full((2, 1, 1, 6), -10000.0)
    all_masked[0, ..., :2] = 0
    all_masked[1] = -10000.0
    same_softmax = all_masked.clone()
    same_softmax[1] = 0      # a constant bias does not change a softmax, but in fp32 it rounds the scores
    for mask, ref_mask in ((keep[:, None, None], None), (additive, None), (all_masked, same_softmax)):
        ref = F_sdpa(q, k, v, mask if ref_mask is None else ref_mask)
        assert rel_err(integ.packed_attention(q, k, v, mask), ref) <= FP32_REL


def F_sdpa(q, k, v, mask):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask)
    return out.transpose(1, 2)
