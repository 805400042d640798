"""``accelerate(pipe_or_model)``: which supported models a pipeline holds, each family's plan of patches,
validated in full before the first patch and rolled back if one fails."""
from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import nn

from ...ops._common import check_window
from ...ops._dispatch import resolve_backend, resolve_family_backends
from . import wan
from .cogvideox import _plan_cogvideox
from .dispatch import _plan_dispatch
from .patching import HANDLE_ATTR, AccelerationHandle, _Patcher
from .wan import _plan_wan
from .wan_vae import _plan_wan_vae

__all__ = ["accelerate", "SUPPORTED_MODELS", "OP_FAMILIES", "WINDOW_MODELS"]

OP_FAMILIES = ("attention", "adaln", "causal_conv3d", "channel_rms_norm_silu")
SUPPORTED_MODELS = {
    "WanTransformer3DModel": "attention (RoPE fused) + adaLN chain",
    "AutoencoderKLWan": "causal convs + RMS norm/SiLU",
    "HunyuanVideoTransformer3DModel": "attention backend",
    "LTXVideoTransformer3DModel": "attention backend",
    "CogVideoXTransformer3DModel": "attention processors",
}
Backend = Union[None, str, Mapping[str, Optional[str]]]
# Models whose self-attention takes accelerate(window=...): the processor knows each token's latent (t, h, w)
# (Wan's RoPE grid). HunyuanVideo and LTX-Video reach sora_fast through diffusers' dispatcher, which hands over
# q and k without their grid; CogVideoX joins text and video tokens in one sequence. AutoencoderKLWan has no
# attention that sora_fast routes: a window leaves it as it is.
WINDOW_MODELS = ("WanTransformer3DModel",)
_NO_ROUTED_ATTENTION = ("AutoencoderKLWan",)


# Which op families each model's patches route, given accelerate()'s flags, and the op each family dispatches.
_FAMILIES = {
    "WanTransformer3DModel": (("attention", "attention"), ("norms", "adaln")),
    "AutoencoderKLWan": (("vae", "causal_conv3d"), ("vae+norms", "channel_rms_norm_silu")),
    "HunyuanVideoTransformer3DModel": (("attention", "attention"),),
    "LTXVideoTransformer3DModel": (("attention", "attention"),),
    "CogVideoXTransformer3DModel": (("attention", "attention"),),
}
_OPS = {"attention": "spacetime_attention", "adaln": "gated_residual_adaln", "causal_conv3d": "causal_conv3d",
        "channel_rms_norm_silu": "channel_rms_norm_silu"}
# What the torch backend runs for each family: on a CPU the fastest correct path measured for that op, at least
# as fast as diffusers' own code at the benchmark's sizes (bench/bench_diffusers_accelerate.py, numbers in
# docs/benchmarks.md; at a few dozen tokens per call the patched blocks' Python work still costs more).
TORCH_PATHS = {
    "attention": "torch's fused SDPA (fp32 math) on views of the batch, one call per run of equal-length "
                 "sequences (one padded call only for many small runs), local windows by frame blocks; RoPE from a "
                 "table made once per latent grid and reused by every layer and step",
    "adaln": "torch's fused LayerNorm/RMSNorm; modulation tables broadcast over each element's tokens (no per-token "
             "copy), gated adds in place, no zero/one tables; the block's FFN in L2-sized row chunks, its tanh "
             "GELU as x·sigmoid(2u) (torch's CPU sigmoid is faster than its tanh)",
    "causal_conv3d": "oneDNN conv3d (torch's own CPU heuristic skips it at batch 1)",
    "channel_rms_norm_silu": "channel RMS norm and SiLU in plain torch",
}


def _choices(name: str, model: nn.Module, cls_name: str, flags: dict, backends: dict) -> dict[str, str]:
    """``{"<name>.<family>": "<backend>: <path>"}`` for the families this model's patches route, resolved for the
    model's current device (each call resolves again, so a model moved later follows its new device)."""
    import torch

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    out = {}
    for flag, family in _FAMILIES[cls_name]:
        if not all(flags[f] for f in flag.split("+")):
            continue
        backend = resolve_backend(_OPS[family], backends[family], device)
        path = TORCH_PATHS[family] if backend == "torch" else f"the {backend} kernel"
        if cls_name == "WanTransformer3DModel" and backend == "torch" and device.type == "cpu":
            small = "unwindowed attention calls" if family == "attention" else "blocks"
            path = (f"{small} of fewer than {wan.CPU_MIN_ELEMENTS} hidden-state elements (B·S·D) run diffusers' "
                    f"own code (faster there), larger ones: {path}")
        if family == "attention" and flags.get("window") is not None and cls_name in WINDOW_MODELS:
            path += (f"; self-attention window {flags['window']} (|dt|, |dh|, |dw| in latent patches), "
                     "cross-attention dense")
        out[f"{name}.{family}"] = f"{backend} on {device.type}: {path}"
    return out


def _supported_listing() -> str:
    return "; ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items())


_PLANNERS = {
    "WanTransformer3DModel": _plan_wan,
    "AutoencoderKLWan": _plan_wan_vae,
    "HunyuanVideoTransformer3DModel": _plan_dispatch,
    "LTXVideoTransformer3DModel": _plan_dispatch,
    "CogVideoXTransformer3DModel": _plan_cogvideox,
}


def _supported_class(model) -> Optional[str]:
    """The supported diffusers class ``model`` is exactly an instance of (subclasses may change blocks)."""
    import diffusers

    for cls_name in _PLANNERS:
        cls = getattr(diffusers, cls_name, None)
        if cls is not None and type(model) is cls:
            return cls_name
    return None


def _targets(pipe_or_model) -> tuple[list[tuple[str, nn.Module, str]], list[str]]:
    """(name, model, class name) of every supported model; names of the skipped pipeline components."""
    if isinstance(pipe_or_model, nn.Module):
        cls_name = _supported_class(pipe_or_model)
        if cls_name is None:
            raise TypeError(f"pipe_or_model must be a diffusers pipeline or one of the supported diffusers models "
                            f"({_supported_listing()}), got {type(pipe_or_model).__name__}")
        return [(type(pipe_or_model).__name__, pipe_or_model, cls_name)], []
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(f"pipe_or_model must be a diffusers pipeline (with .components) or a diffusers model, "
                        f"got {type(pipe_or_model).__name__}")
    targets, skipped = [], []
    for name, comp in components.items():
        if not isinstance(comp, nn.Module):
            continue
        cls_name = _supported_class(comp)
        if cls_name is None:
            skipped.append(f"{name} ({type(comp).__name__})")
        else:
            targets.append((name, comp, cls_name))
    if not targets:
        held = ", ".join(skipped) or "no models"
        raise TypeError(f"pipe_or_model ({type(pipe_or_model).__name__}) holds no supported model; supported: "
                        f"{_supported_listing()}; it holds {held}")
    return targets, skipped


def _check_window_targets(window, attention: bool, targets: list) -> None:
    """A window needs attention=True and Wan transformers only (besides models with no routed attention)."""
    if window is None:
        return
    if not attention:
        raise ValueError(f"window={window} needs attention=True: it windows the self-attention sora_fast runs")
    labels = [n if n == type(m).__name__ else f"{n} ({type(m).__name__})" for n, m, c in targets
              if c not in WINDOW_MODELS + _NO_ROUTED_ATTENTION]
    if labels:
        raise ValueError(f"window is supported for {', '.join(WINDOW_MODELS)} (Wan 2.1 / 2.2 self-attention) only, "
                         f"not for {', '.join(labels)}; accelerate it with window=None")
    if not any(c in WINDOW_MODELS for _, _, c in targets):
        raise ValueError(f"window={window} needs a {' or '.join(WINDOW_MODELS)} to window; got "
                         + ", ".join(f"{n} ({type(m).__name__})" for n, m, _ in targets))


def accelerate(pipe_or_model, *, attention: bool = True, norms: bool = True, vae: bool = True,
               backend: Backend = None, window=None) -> AccelerationHandle:
    """Make a diffusers pipeline (or one of its models) run on sora_fast kernels; same outputs.

    Args:
        pipe_or_model: a ``DiffusionPipeline`` (every supported component is accelerated, the others,
            e.g. text encoders, are left alone and listed in ``handle.skipped``) or a supported model:
            ``WanTransformer3DModel``, ``AutoencoderKLWan``, ``HunyuanVideoTransformer3DModel``,
            ``LTXVideoTransformer3DModel``, ``CogVideoXTransformer3DModel``.
        attention: route attention through :func:`sora_fast.ops.spacetime_attention`.
        norms: Wan transformer blocks' adaLN chains, and the Wan VAE's RMS norms (+ SiLU) when ``vae``.
        vae: the Wan VAE's causal convs (and its norms when ``norms``).
        backend: None (auto: kernels for CUDA tensors, the torch reference on CPU), a backend name for
            every op, or a mapping from ``"attention"``, ``"adaln"``, ``"causal_conv3d"``,
            ``"channel_rms_norm_silu"`` to a name. A backend without a kernel for an op raises
            :class:`sora_fast.ops.BackendUnavailableError` when the op runs.
        window: None (dense attention, the default) or ``(wt, wh, ww)``, 3 ints >= 0: training-free local
            self-attention for ``WanTransformer3DModel`` (``WINDOW_MODELS``): a token attends only to the
            tokens of its own video with ``|dt| <= wt``, ``|dh| <= wh``, ``|dw| <= ww`` on Wan's latent patch
            grid (latent frames x latent height / 2 x latent width / 2 for patch (1, 2, 2)), with Wan's RoPE
            as before. Cross-attention (text, I2V image) stays dense. The output then differs from diffusers'
            dense one (by design); half-sizes covering the whole grid give the dense result. A window on
            other models raises ValueError saying which (the Wan VAE, which has no routed attention, is
            left as ``vae`` / ``norms`` say).

    Returns an :class:`AccelerationHandle`: ``handle.undo()``, or ``with accelerate(pipe): ...``;
    ``handle.choices`` says, per model and op family, which backend and path runs on the model's device
    (on a CPU the torch backend: for every op the fastest correct path measured, see ``TORCH_PATHS``),
    and, with a window, that window on each Wan transformer's ``"<name>.attention"`` entry.
    Raises TypeError for an unsupported object (listing what is supported) or a window that is not 3 ints,
    ValueError for a model already accelerated or with processors/blocks it does not know, a negative or
    wrong-length window or a window on a model without window support, :class:`DiffusersHooksError` when
    the installed diffusers lacks what a patch needs; in every case nothing has been changed.
    """
    flags = {"attention": attention, "norms": norms, "vae": vae}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{k} must be a bool, got {type(v).__name__}")
    flags["window"] = window = check_window("window", window)
    backends = resolve_family_backends(backend, OP_FAMILIES)
    targets, skipped = _targets(pipe_or_model)
    _check_window_targets(window, attention, targets)
    for name, model, _ in targets:
        prior = getattr(model, HANDLE_ATTR, None)
        if prior is not None and prior.active:
            label = name if name == type(model).__name__ else f"{name} ({type(model).__name__})"
            raise ValueError(f"{label} is already accelerated by sora_fast ({prior!r}); "
                             f"call that handle's undo() first")
    plans = [(model, _PLANNERS[cls_name](name, model, flags, backends)) for name, model, cls_name in targets]
    if not any(steps for _, steps in plans):
        raise ValueError(f"nothing to accelerate with attention={attention}, norms={norms}, vae={vae} in "
                         + ", ".join(f"{n} ({type(m).__name__})" for n, m, _ in targets))
    plans = [(model, steps) for model, steps in plans if steps]
    choices = {k: v for name, model, cls_name in targets for k, v in _choices(name, model, cls_name, flags,
                                                                              backends).items()}
    patchers = [_Patcher() for _ in plans]      # one per model: its handle undoes it alone (and its copies')
    handle = AccelerationHandle(patchers, [desc for _, steps in plans for desc, _ in steps], skipped, choices)
    try:
        for patcher, (model, steps) in zip(patchers, plans):
            patcher.set(model, HANDLE_ATTR, AccelerationHandle([patcher], [desc for desc, _ in steps], []))
            for _, apply in steps:
                apply(patcher)
    except BaseException:
        for patcher in reversed(patchers):
            patcher.restore_all()
        raise
    return handle
