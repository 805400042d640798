"""torch.compile(fullgraph=True) of every accelerated diffusers family matches eager: no data-dependent
guard (the key-padding masks of HunyuanVideo / LTX-Video are handled with tensor ops and an opaque check)."""
import _diffusers_utils
import pytest
import torch
from _diffusers_utils import FAMILIES, FP32_REL
from test_dit import rel_err

from sora_fast.integrations import diffusers as integ
from sora_fast.integrations.diffusers import accelerate

calls = _diffusers_utils.calls  # the shared fixture


def _handle(model):
    return getattr(model, integ.HANDLE_ATTR)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fullgraph_compile(family, calls):
    """torch.compile(fullgraph=True) of the accelerated model equals its eager output (and the plain
    model's) within fp32 error. A family is skipped only if the plain diffusers model fails the same
    compile here, with that failure as the reason."""
    make, _ = FAMILIES[family]
    model, fwd = make()
    ref = fwd(model)
    accelerate(model)
    eager = fwd(model)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
        calls.clear()
        out = compiled(model)
    except Exception as e:                                        # is it ours, or diffusers' own?
        _handle(model).undo()
        torch._dynamo.reset()
        try:
            torch.compile(fwd, fullgraph=True, backend="aot_eager")(model)
        except Exception as plain_error:
            pytest.skip(f"the plain diffusers model fails fullgraph compile too: {type(plain_error).__name__}: "
                        f"{str(plain_error)[:300]}")
        raise AssertionError(f"the accelerated {family} fails fullgraph compile where the plain model "
                             f"compiles: {type(e).__name__}: {e}") from e
    finally:
        torch._dynamo.reset()
    assert calls, "the compiled model did not run the sora_fast ops"
    assert rel_err(out, eager) <= FP32_REL, rel_err(out, eager)
    assert rel_err(out, ref) <= FP32_REL, rel_err(out, ref)


def test_compiled_mask_checks_still_raise():
    """The key-padding checks run on the mask's values inside the compiled graph."""
    q = torch.randn(2, 3, 2, 4)
    compiled = torch.compile(integ.packed_attention, fullgraph=True, backend="aot_eager")
    try:
        with pytest.raises(ValueError, match=r"key-padding mask .* got other additive values, e.g. 0.5"):
            compiled(q, q, q, torch.full((2, 1, 1, 3), 0.5))
        keep = torch.tensor([[True, False, True], [False, False, True]])
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)),
                                                               attn_mask=keep[:, None, None]).transpose(1, 2)
        assert rel_err(compiled(q, q, q, keep[:, None, None]), ref) <= FP32_REL
    finally:
        torch._dynamo.reset()
