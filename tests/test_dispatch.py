"""Backend selection: explicit, environment, auto; clear errors for backends that cannot run."""
import pytest
import torch

import sora_fast.ops as O
from sora_fast import _ext
from sora_fast.ops import _dispatch
from sora_fast.ops._dispatch import BackendUnavailableError


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the kernel registry, restored after the test."""
    monkeypatch.setattr(_dispatch, "_KERNELS", dict(_dispatch._KERNELS))
    monkeypatch.setattr(_dispatch, "_LOADED", {})
    return _dispatch


def _adaln_inputs():
    x = torch.randn(5, 8)
    return x, torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)


def test_resolve_explicit_env_and_auto(monkeypatch, registry):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("SORA_FAST_BACKEND", raising=False)
    registry._KERNELS.pop(("adaln_modulate", "cuda"), None)  # the real CUDA kernel registers at import
    assert registry.resolve_backend("adaln_modulate", "cuda", cpu) == "cuda"
    assert registry.resolve_backend("adaln_modulate", None, cpu) == "torch"
    # auto on CUDA tensors: torch until a kernel registers, then the first registered kernel
    assert registry.resolve_backend("adaln_modulate", None, cuda) == "torch"
    registry.register_kernel("adaln_modulate", "cuda", lambda *a, **k: None)
    registry.register_kernel("adaln_modulate", "triton", lambda *a, **k: None)
    assert registry.resolve_backend("adaln_modulate", None, cuda) == "cuda"
    assert registry.resolve_backend("adaln_modulate", None, cpu) == "torch"
    monkeypatch.setenv("SORA_FAST_BACKEND", "triton")
    assert registry.resolve_backend("adaln_modulate", None, cpu) == "triton"
    assert registry.resolve_backend("adaln_modulate", "torch", cpu) == "torch"  # explicit beats the env


def test_bad_backend_names(monkeypatch):
    x, shift, scale, ids = _adaln_inputs()
    with pytest.raises(ValueError, match=r"backend must be one of .*'torch'.*got 'cudnn'"):
        O.adaln_modulate(x, shift, scale, ids, backend="cudnn")
    monkeypatch.setenv("SORA_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"SORA_FAST_BACKEND environment variable must be one of .*got 'gpu'"):
        O.adaln_modulate(x, shift, scale, ids)
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.register_kernel("adaln_modulate", "opencl", lambda: None)
    with pytest.raises(ValueError, match="'module:attr'"):
        _dispatch.register_kernel("adaln_modulate", "cuda", "no_colon_here")


def test_env_var_selects_backend_for_every_call(monkeypatch, registry):
    x, shift, scale, ids = _adaln_inputs()
    calls = []

    def fake_cuda(*args, **kwargs):
        calls.append(args[0].shape)
        return O.adaln_modulate_ref(*args, **kwargs)

    registry.register_kernel("adaln_modulate", "cuda", fake_cuda)
    monkeypatch.setattr(registry, "_check_runnable", lambda *a: None)
    monkeypatch.setenv("SORA_FAST_BACKEND", "cuda")
    y = O.adaln_modulate(x, shift, scale, ids)
    assert calls == [x.shape]
    torch.testing.assert_close(y, O.adaln_modulate_ref(x, shift, scale, ids))


def test_no_kernel_registered_says_which(registry):
    x, shift, scale, ids = _adaln_inputs()
    with pytest.raises(BackendUnavailableError,
                       match=r"triton backend of adaln_modulate cannot run: no triton kernel is registered .*torch"):
        O.adaln_modulate(x, shift, scale, ids, backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch, registry):
    registry.register_kernel("adaln_modulate", "triton", lambda *a, **k: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, shift, scale, ids = _adaln_inputs()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        O.adaln_modulate(x, shift, scale, ids, backend="triton")


def test_cuda_backend_without_extension_says_why(monkeypatch, registry):
    registry.register_kernel("adaln_modulate", "cuda", lambda *a, **k: None)
    monkeypatch.setattr(_ext, "load_extension", lambda: None)
    monkeypatch.setattr(_ext, "extension_error", lambda: "ImportError: libfoo.so: cannot open shared object file")
    x, shift, scale, ids = _adaln_inputs()
    with pytest.raises(BackendUnavailableError, match=r"sora_fast\._C is not available .*libfoo\.so"):
        O.adaln_modulate(x, shift, scale, ids, backend="cuda")


def test_cuda_backend_on_cpu_needs_emulation_build(monkeypatch, registry):
    class FakeExt:
        @staticmethod
        def build_info():
            return {"cuda_compiled": True, "emulation": False}

    registry.register_kernel("adaln_modulate", "cuda", lambda *a, **k: None)
    monkeypatch.setattr(_ext, "load_extension", lambda: FakeExt)
    x, shift, scale, ids = _adaln_inputs()
    with pytest.raises(BackendUnavailableError, match="without the host emulation"):
        O.adaln_modulate(x, shift, scale, ids, backend="cuda")


def test_lazy_target_import_failure_is_reported(monkeypatch, registry):
    registry.register_kernel("adaln_modulate", "triton", "sora_fast.no_such_module:kernel")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, shift, scale, ids = _adaln_inputs()
    with pytest.raises(BackendUnavailableError, match=r"importing sora_fast\.no_such_module:kernel failed: "
                                                      r"ModuleNotFoundError"):
        O.adaln_modulate(x, shift, scale, ids, backend="triton")


def test_a_new_kernel_plugs_in_without_touching_call_sites(monkeypatch, registry):
    """What a later issue does: register a target by name; the public op (and its backward) use it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    registry.register_kernel("adaln_modulate", "triton", "sora_fast.ops.adaln:adaln_modulate_ref")
    registry.register_kernel("adaln_modulate_backward", "triton", "sora_fast.ops.adaln:_modulate_backward_ref")
    x, shift, scale, ids = _adaln_inputs()
    x.requires_grad_(True)
    y = O.adaln_modulate(x, shift, scale, ids, backend="triton")
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    O.adaln_modulate_ref(x_ref, shift, scale, ids).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert "triton" in O.registered_backends("adaln_modulate")


def test_resolve_family_backends():
    """One resolver for every model's ``backend`` argument: None, a name for all, or a partial mapping."""
    fams = ("attention", "adaln")
    assert _dispatch.resolve_family_backends(None, fams) == {"attention": None, "adaln": None}
    assert _dispatch.resolve_family_backends("triton", fams) == {"attention": "triton", "adaln": "triton"}
    assert _dispatch.resolve_family_backends({"adaln": "cuda"}, fams) == {"attention": None, "adaln": "cuda"}
    assert _dispatch.resolve_family_backends({"attention": None}, iter(fams)) == {"attention": None, "adaln": None}
    assert list(_dispatch.resolve_family_backends({"adaln": "cuda", "attention": "torch"}, fams)) == list(fams)
    assert "resolve_family_backends" in _dispatch.__all__


@pytest.mark.parametrize("backend,error,match", [
    ("gpu", ValueError, r"backend must be None, one of \('torch', 'triton', 'cuda'\) or a mapping with keys in "
                        r"\('attention', 'adaln'\); a backend must be one of .* got 'gpu'"),
    ({"attn": "triton"}, ValueError, r"a backend mapping must have keys in \('attention', 'adaln'\), got "
                                     r"\{'attn': 'triton'\}: backend mapping has unknown ops \['attn'\]; "
                                     r"valid keys: attention, adaln$"),
    ({"attention": "gpu"}, ValueError, r"got \{'attention': 'gpu'\}: attention: 'gpu' is not one of "
                                       r"\('torch', 'triton', 'cuda'\) or None$"),
    (3, TypeError, r"backend must be None, a backend name or a mapping with keys in \('attention', 'adaln'\), "
                   r"got int$"),
    (["triton"], TypeError, r"a mapping with keys in .* got list$"),
])
def test_resolve_family_backends_rejects_bad_input(backend, error, match):
    with pytest.raises(error, match=match):
        _dispatch.resolve_family_backends(backend, ("attention", "adaln"))
