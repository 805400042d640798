"""Tolerance helpers shared by the op tests (numerical-error based, see the project's style guide)."""
import torch

# Per-dtype (atol, rtol) for one rounding of an fp32-accurate result to the dtype, with slack for
# reductions in a different order. Used when comparing an op to its fp32 reference.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=rtol,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


def assert_within_lowp_error(out, ref_fp32, lowp_peer, factor=2.0, atol=1e-5, msg=""):
    """flash-attn's rule: our error against the fp32 reference is at most ``factor`` times the error
    of PyTorch's own low-precision computation (``lowp_peer``), plus a small ``atol``."""
    err = (out.double() - ref_fp32.double()).abs().max().item()
    peer = (lowp_peer.double() - ref_fp32.double()).abs().max().item()
    assert err <= factor * peer + atol, f"{msg} max error {err:.3e} > {factor} x peer error {peer:.3e} + {atol:.1e}"
