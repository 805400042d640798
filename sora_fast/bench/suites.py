"""What ``sora-fast bench`` measures: every op's cases, its providers, its roofline work and its reference.

An op suite (:class:`OpSuite`) holds:

- cases per device kind (``cpu`` sizes run in seconds; ``cuda`` sizes are the Wan shapes of docs/kernels.md §4),
  each with the work one call does (FLOPs for attention and conv, bytes for the norms) and the abscissa of
  its plot (sequence length, hidden size, channels);
- an independent plain-PyTorch reference (``F.layer_norm``, ``F.group_norm``, ``F.conv3d``, a per-sequence
  softmax loop), written here and not taken from ``sora_fast.ops``, so that sora_fast's own reference is
  checked too. It is also the ``eager`` provider (what a model written in PyTorch runs), and
  ``torch_compile`` compiles it;
- providers: a builder ``(inputs, ctx) -> (fn, canon)``; ``fn()`` is what gets timed and ``canon`` maps its
  output to the reference's layout for the correctness check. A builder raises :class:`Skip` when the
  provider cannot run here; the message is the reason written to the row.

A provider's work count is the op's, the same for every provider: a provider that moves more bytes than
the op needs (eager torch) is charged for its extra traffic in its GB/s, not credited for it.
"""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Skip", "BenchCase", "OpSuite", "SUITES", "PROVIDERS", "OP_ALIASES", "KERNEL_BACKENDS"]


class Skip(Exception):
    """The provider cannot run this case here; the message is the reason written to the row."""


@dataclass(frozen=True)
class BenchCase:
    """One shape of one op. ``params`` are what the suite's ``make_inputs`` needs."""

    name: str
    shape: str
    x: float          # the plot's abscissa (sequence length, hidden size, channels)
    work: float       # FLOPs (attention, conv) or bytes (norms) of one call, at the benchmark dtype
    params: dict = field(default_factory=dict)


ProviderFn = Callable[[dict, dict], tuple[Callable[[], Any], Callable[[Any], tuple]]]


@dataclass
class OpSuite:
    name: str
    unit: str                                     # "TFLOP/s" or "GB/s"
    x_label: str
    cases: Callable[[str, bool, torch.dtype], list[BenchCase]]   # (device kind, quick, dtype) -> cases
    make_inputs: Callable[[BenchCase, torch.device, torch.dtype], dict]
    reference: Callable[[dict], tuple]            # plain PyTorch, computes in the inputs' dtype
    providers: dict[str, ProviderFn]
    work_note: str


def _es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _sora_fast(op_call: Callable[[dict, str], Any], backend: str) -> ProviderFn:
    def build(a: dict, ctx: dict):
        return (lambda: op_call(a, backend)), _tuple
    return build


def _compiled(reference: Callable[[dict], tuple]) -> ProviderFn:
    """``torch.compile`` of the plain-PyTorch reference (what compile makes of the eager code; compiled for
    each case's shapes on its first call, which the correctness check makes)."""
    def build(a: dict, ctx: dict):
        fn = torch.compile(reference, dynamic=False)
        return (lambda: fn(a)), _tuple
    return build


def _eager(reference: Callable[[dict], tuple]) -> ProviderFn:
    def build(a: dict, ctx: dict):
        return (lambda: reference(a)), _tuple
    return build


def _needs_gpu(what: str) -> Callable[[dict], None]:
    def check(ctx: dict) -> None:
        if ctx["device"].type != "cuda":
            raise Skip(f"{what} runs on a CUDA GPU only")
    return check


def _import(module: str, pip: str):
    try:
        return importlib.import_module(module)
    except Exception as e:
        raise Skip(f"{module} not importable ({type(e).__name__}: {e}); pip install {pip}") from None


# --- attention -------------------------------------------------------------------------------------
ATTN_SAMPLE = 256   # query rows per sequence checked against the reference (all rows of shorter sequences)


def _attn_cases(kind: str, quick: bool, dtype: torch.dtype) -> list[BenchCase]:
    """Packs of two (CPU) or one-to-four (GPU) videos; FLOPs = 4·L²·H·D per sequence (docs/kernels.md §4)."""
    if kind == "cpu":
        heads, d = 4, 64
        packs = [[(2, 8, 8)] * 2, [(2, 16, 16)] * 2] if quick else \
                [[(2, 8, 8)] * 2, [(4, 8, 16)] * 2, [(4, 16, 16)] * 2, [(4, 16, 32)] * 2]
    else:
        heads, d = 12, 128
        packs = [[(8, 32, 32)], [(21, 30, 52)]] if quick else \
                [[(4, 32, 32)], [(8, 32, 32)], [(16, 32, 32)], [(21, 30, 52)],
                 [(21, 30, 52), (11, 30, 52), (21, 20, 24), (6, 24, 28)]]
    cases = []
    for grids in packs:
        lens = [t * h * w for t, h, w in grids]
        g = "+".join(f"{t}x{h}x{w}" for t, h, w in grids)
        cases.append(BenchCase(f"L{max(lens)}x{len(lens)}", f"[{g}] N={sum(lens)} H={heads} D={d}",
                               x=sum(lens) / len(lens), work=float(sum(4 * n * n * heads * d for n in lens)),
                               params=dict(grids=grids, heads=heads, head_dim=d)))
    return cases


def _attn_inputs(case: BenchCase, device, dtype) -> dict:
    p = case.params
    lens = [t * h * w for t, h, w in p["grids"]]
    n = sum(lens)
    q, k, v = (torch.randn(n, p["heads"], p["head_dim"], device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    # Query rows the check looks at: up to ATTN_SAMPLE per sequence, random, sorted.
    rows = [s + torch.randperm(n_i)[:ATTN_SAMPLE].sort().values for s, n_i in zip(cu.tolist(), lens)]
    return dict(q=q, k=k, v=v, cu=cu, lens=lens, max_len=max(lens), rows=torch.cat(rows).to(device))


def attention_reference(a: dict) -> tuple:
    """softmax(q kᵀ / √D) v for the sampled query rows, one sequence at a time, in q's dtype."""
    q, k, v, rows = a["q"], a["k"], a["v"], a["rows"]
    scale = q.shape[-1] ** -0.5
    out = []
    for s, n in zip(a["cu"].tolist(), a["lens"]):
        r = rows[(rows >= s) & (rows < s + n)]
        qs, ks, vs = q[r].transpose(0, 1), k[s:s + n].transpose(0, 1), v[s:s + n].transpose(0, 1)   # (H, ., D)
        p = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1)
        out.append((p @ vs).transpose(0, 1))
    return (torch.cat(out),)


def _attention_full(q, k, v, starts: list[int], lens: list[int]) -> torch.Tensor:
    """Every query row, the way a PyTorch model without SDPA writes it (offsets as Python ints)."""
    scale = q.shape[-1] ** -0.5
    outs = []
    for s, n in zip(starts, lens):
        qs, ks, vs = (t[s:s + n].transpose(0, 1) for t in (q, k, v))
        outs.append((torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def _attn_eager(compiled: bool) -> ProviderFn:
    def build(a: dict, ctx: dict):
        fn = torch.compile(_attention_full, dynamic=False) if compiled else _attention_full
        starts = a["cu"].tolist()[:-1]
        return (lambda: fn(a["q"], a["k"], a["v"], starts, a["lens"])), lambda out: (out[a["rows"]],)
    return build


def _attn_sora_fast(backend: str) -> ProviderFn:
    def build(a: dict, ctx: dict):
        from sora_fast import ops

        def fn():
            return ops.spacetime_attention(a["q"], a["k"], a["v"], a["cu"], max_seqlen_q=a["max_len"],
                                           backend=backend)
        return fn, lambda out: (out[a["rows"]],)
    return build




def _per_sequence(a: dict) -> list[tuple[torch.Tensor, ...]]:
    """(1, H, L, D) contiguous copies per sequence, made before timing (SDPA has no varlen entry point)."""
    return [tuple(t[s:s + n].transpose(0, 1).unsqueeze(0).contiguous() for t in (a["q"], a["k"], a["v"]))
            for s, n in zip(a["cu"].tolist(), a["lens"])]


def _attn_sdpa(a: dict, ctx: dict):
    seqs = _per_sequence(a)
    fn = lambda: [F.scaled_dot_product_attention(q, k, v) for q, k, v in seqs]  # noqa: E731
    return fn, lambda outs: (torch.cat([o[0].transpose(0, 1) for o in outs])[a["rows"]],)


def _attn_flex(a: dict, ctx: dict):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Skip(f"torch.nn.attention.flex_attention not importable: {e}") from None
    dev, n = a["q"].device, a["q"].shape[0]
    ids = torch.repeat_interleave(torch.arange(len(a["lens"]), device=dev), torch.tensor(a["lens"], device=dev))

    def document(b, h, qi, ki):
        return ids[qi] == ids[ki]

    mask = create_block_mask(document, None, None, n, n, device=dev)
    q, k, v = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (a["q"], a["k"], a["v"]))
    if dev.type == "cuda":
        flex = torch.compile(flex_attention, dynamic=False)
    else:   # on a CPU compiled flex is minutes of compile; eager flex materializes the scores (noted on the row)
        ctx["note"] = "eager FlexAttention (unfused: materializes the scores)"
        flex = flex_attention

    def fn():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return flex(q, k, v, block_mask=mask)
    return fn, lambda out: (out[0].transpose(0, 1)[a["rows"]],)


def _attn_flash(a: dict, ctx: dict):
    _needs_gpu("flash-attn")(ctx)
    mod = _import("flash_attn", "flash-attn")

    def fn():
        out = mod.flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu"], a["cu"], a["max_len"], a["max_len"])
        return out[0] if isinstance(out, tuple) else out
    return fn, lambda out: (out[a["rows"]],)


# --- adaLN family ----------------------------------------------------------------------------------
def _adaln_cases(bytes_per_elem: int) -> Callable[[str, bool, torch.dtype], list[BenchCase]]:
    """N tokens in two packed sequences, hidden size D varied; bytes = k·N·D·s (docs/kernels.md §4)."""
    def cases(kind: str, quick: bool, dtype: torch.dtype) -> list[BenchCase]:
        if kind == "cpu":
            n, dims = (1024, (256, 1536)) if quick else (4096, (256, 512, 1024, 1536, 3072))
        else:
            n, dims = (32760, (1536, 5120)) if quick else (32760, (1024, 1536, 3072, 5120))
        s = _es(dtype)
        return [BenchCase(f"D{d}", f"N={n} D={d} (2 sequences)", x=d, work=float(bytes_per_elem * n * d * s),
                          params=dict(n=n, d=d)) for d in dims]
    return cases


def _adaln_inputs(case: BenchCase, device, dtype) -> dict:
    n, d = case.params["n"], case.params["d"]
    ids = torch.cat([torch.zeros(n // 2, dtype=torch.int32), torch.ones(n - n // 2, dtype=torch.int32)]).to(device)
    table = lambda: 0.1 * torch.randn(2, d, device=device)  # noqa: E731  (fp32 conditioning tables)
    return dict(x=torch.randn(n, d, device=device, dtype=dtype), branch=torch.randn(n, d, device=device, dtype=dtype),
                shift=table(), scale=table(), gate=table(), seq_ids=ids)


def _modulate(a: dict, xn: torch.Tensor) -> torch.Tensor:
    ids = a["seq_ids"].long()
    return xn * (1 + a["scale"][ids].to(xn.dtype)) + a["shift"][ids].to(xn.dtype)


def adaln_modulate_reference(a: dict) -> tuple:
    x = a["x"]
    return (_modulate(a, F.layer_norm(x, x.shape[-1:], eps=1e-6)),)


def gated_residual_adaln_reference(a: dict) -> tuple:
    x = a["x"]
    x_new = x + a["gate"][a["seq_ids"].long()].to(x.dtype) * a["branch"]
    return x_new, _modulate(a, F.layer_norm(x_new, x.shape[-1:], eps=1e-6))


def _adaln_call(a: dict, backend: str):
    from sora_fast import ops

    return ops.adaln_modulate(a["x"], a["shift"], a["scale"], a["seq_ids"], backend=backend)


def _gated_call(a: dict, backend: str):
    from sora_fast import ops

    return ops.gated_residual_adaln(a["x"], a["branch"], a["gate"], a["shift"], a["scale"], a["seq_ids"],
                                    backend=backend)


def _liger_layer_norm(a: dict, ctx: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    _needs_gpu("Liger's Triton LayerNorm")(ctx)
    mod = _import("liger_kernel.ops.layer_norm", "liger-kernel")
    d = a["x"].shape[-1]
    w, b = torch.ones(d, device=a["x"].device, dtype=a["x"].dtype), torch.zeros(d, device=a["x"].device,
                                                                                 dtype=a["x"].dtype)
    ctx["note"] = "Liger LayerNorm + PyTorch modulation"
    return lambda x: mod.LigerLayerNormFunction.apply(x, w, b, 1e-6)


def _adaln_liger(a: dict, ctx: dict):
    ln = _liger_layer_norm(a, ctx)
    return (lambda: _modulate(a, ln(a["x"]))), _tuple


def _gated_liger(a: dict, ctx: dict):
    ln = _liger_layer_norm(a, ctx)

    def fn():
        x_new = a["x"] + a["gate"][a["seq_ids"].long()].to(a["x"].dtype) * a["branch"]
        return x_new, _modulate(a, ln(x_new))
    return fn, _tuple






# --- VAE norms -------------------------------------------------------------------------------------
def _vae_norm_cases(kind: str, quick: bool, dtype: torch.dtype) -> list[BenchCase]:
    """(1, C, T, H, W) feature maps, channels C varied; bytes = 2·numel·s (read x, write y: docs/kernels.md §4)."""
    if kind == "cpu":
        thw, chans = ((2, 16, 16), (64, 256)) if quick else ((4, 32, 32), (64, 128, 256, 384))
    else:
        # 8 frames: the smallest map (C=96, bf16) reads 38 MB and writes as much, past the 50 MB L2 together
        thw, chans = ((8, 120, 208), (96, 384)) if quick else ((8, 120, 208), (96, 192, 384))
    s = _es(dtype)
    t, h, w = thw
    return [BenchCase(f"C{c}", f"B=1 C={c} THW={t}x{h}x{w}", x=c, work=float(2 * c * t * h * w * s),
                      params=dict(c=c, thw=thw)) for c in chans]


def _vae_norm_inputs(case: BenchCase, device, dtype) -> dict:
    c, (t, h, w) = case.params["c"], case.params["thw"]
    return dict(x=torch.randn(1, c, t, h, w, device=device, dtype=dtype), groups=32,
                weight=1 + 0.1 * torch.randn(c, device=device, dtype=dtype),
                bias=0.1 * torch.randn(c, device=device, dtype=dtype))


def group_norm_silu_reference(a: dict) -> tuple:
    return (F.silu(F.group_norm(a["x"], a["groups"], a["weight"], a["bias"], eps=1e-6)),)


def channel_rms_norm_silu_reference(a: dict) -> tuple:
    """Wan-VAE's RMS_norm as diffusers writes it: F.normalize over channels, times √C, gamma, plus bias."""
    x = a["x"]
    y = F.normalize(x, dim=1) * x.shape[1] ** 0.5 * a["weight"].view(1, -1, 1, 1, 1) + a["bias"].view(1, -1, 1, 1, 1)
    return (F.silu(y),)


def _gn_call(a: dict, backend: str):
    from sora_fast import ops

    return ops.group_norm_silu(a["x"], a["groups"], a["weight"], a["bias"], backend=backend)


def _rms_call(a: dict, backend: str):
    from sora_fast import ops

    return ops.channel_rms_norm_silu(a["x"], a["weight"], a["bias"], backend=backend)






def _gn_liger(a: dict, ctx: dict):
    _needs_gpu("Liger's Triton GroupNorm")(ctx)
    mod = _import("liger_kernel.ops.group_norm", "liger-kernel")
    x = a["x"]
    ctx["note"] = "Liger GroupNorm + PyTorch SiLU"
    return (lambda: F.silu(mod.LigerGroupNormFunction.apply(x, a["weight"], a["bias"], x.shape[1], a["groups"],
                                                            1e-6))), _tuple


# --- causal conv3d ---------------------------------------------------------------------------------
def _conv_cases(kind: str, quick: bool, dtype: torch.dtype) -> list[BenchCase]:
    """One decoder chunk with the previous chunk's last kt-1 frames as cache, channels varied;
    FLOPs = 2·B·Cin·Cout·kt·kh·kw·T·H·W (docs/kernels.md §4)."""
    if kind == "cpu":
        thw, chans = ((3, 16, 16), (16, 32)) if quick else ((4, 24, 24), (16, 32, 64))
    else:
        thw, chans = ((4, 120, 208), (96, 384)) if quick else ((4, 120, 208), (96, 192, 384))
    t, h, w = thw
    return [BenchCase(f"C{c}", f"B=1 {c}->{c} k=3x3x3 THW={t}x{h}x{w} cache=2", x=c,
                      work=2.0 * c * c * 27 * t * h * w, params=dict(c=c, thw=thw)) for c in chans]


def _conv_inputs(case: BenchCase, device, dtype) -> dict:
    c, (t, h, w) = case.params["c"], case.params["thw"]
    cl = torch.channels_last_3d
    x = torch.randn(1, c, t, h, w, device=device, dtype=dtype).contiguous(memory_format=cl)
    cache = torch.randn(1, c, 2, h, w, device=device, dtype=dtype).contiguous(memory_format=cl)
    weight = (torch.randn(c, c, 3, 3, 3, device=device, dtype=dtype) / math.sqrt(27 * c)).contiguous(memory_format=cl)
    return dict(x=x, cache=cache, weight=weight, bias=torch.randn(c, device=device, dtype=dtype))


def causal_conv3d_reference(a: dict) -> tuple:
    """What a chunked decoder does in PyTorch: cache and chunk concatenated, H and W zero-padded, conv."""
    stream = F.pad(torch.cat([a["cache"], a["x"]], dim=2), (1, 1, 1, 1))
    return (F.conv3d(stream, a["weight"], a["bias"]),)


def _conv_call(a: dict, backend: str):
    from sora_fast import ops

    return ops.causal_conv3d(a["x"], a["weight"], a["bias"], cache=a["cache"], backend=backend)




def _conv_cudnn(a: dict, ctx: dict):
    """F.conv3d alone on an input padded beforehand (channels_last_3d): the number to beat for the math."""
    _needs_gpu("cuDNN (eager shows the CPU convolution)")(ctx)
    padded = F.pad(torch.cat([a["cache"], a["x"]], dim=2), (1, 1, 1, 1)).contiguous(
        memory_format=torch.channels_last_3d)
    ctx["note"] = "convolution of a pre-padded input only (no cat/pad)"
    return (lambda: F.conv3d(padded, a["weight"], a["bias"])), _tuple


# --- the registry ----------------------------------------------------------------------------------
# The registered kernel backend of each op (sora_fast.ops registers them; the torch backend is its reference).
KERNEL_BACKENDS = {"attention": "triton", "adaln_modulate": "cuda", "gated_residual_adaln": "cuda",
                   "group_norm_silu": "cuda", "channel_rms_norm_silu": "cuda", "conv3d": "triton"}


def _sora_fast_providers(call: Callable[[dict, str], Any], kernel_backend: str) -> dict[str, ProviderFn]:
    return {"sora_fast_torch": _sora_fast(call, "torch"),
            f"sora_fast_{kernel_backend}": _sora_fast(call, kernel_backend)}


def _peers(reference: Callable[[dict], tuple], **others: ProviderFn) -> dict[str, ProviderFn]:
    """eager torch (the plain-PyTorch reference), torch.compile of it, and the op's other peers."""
    return {"eager": _eager(reference), "torch_compile": _compiled(reference), **others}


SUITES: dict[str, OpSuite] = {
    "attention": OpSuite(
        "attention", "TFLOP/s", "sequence length (tokens per sequence)", _attn_cases, _attn_inputs,
        attention_reference,
        {"sora_fast_torch": _attn_sora_fast("torch"), "sora_fast_triton": _attn_sora_fast("triton"),
         "eager": _attn_eager(False), "torch_compile": _attn_eager(True), "sdpa": _attn_sdpa, "flex": _attn_flex,
         "flash_attn": _attn_flash},
        "forward FLOPs 4·L²·H·D per sequence, summed over the pack"),
    "adaln_modulate": OpSuite(
        "adaln_modulate", "GB/s", "hidden size D", _adaln_cases(2), _adaln_inputs, adaln_modulate_reference,
        {**_sora_fast_providers(_adaln_call, "cuda"), **_peers(adaln_modulate_reference, liger=_adaln_liger)},
        "bytes 2·N·D·s (read x, write y)"),
    "gated_residual_adaln": OpSuite(
        "gated_residual_adaln", "GB/s", "hidden size D", _adaln_cases(4), _adaln_inputs,
        gated_residual_adaln_reference,
        {**_sora_fast_providers(_gated_call, "cuda"), **_peers(gated_residual_adaln_reference, liger=_gated_liger)},
        "bytes 4·N·D·s (read x, branch; write x_new, y)"),
    "group_norm_silu": OpSuite(
        "group_norm_silu", "GB/s", "channels C", _vae_norm_cases, _vae_norm_inputs, group_norm_silu_reference,
        {**_sora_fast_providers(_gn_call, "cuda"), **_peers(group_norm_silu_reference, liger=_gn_liger)},
        "bytes 2·numel·s (read x, write y; a group fits on chip)"),
    "channel_rms_norm_silu": OpSuite(
        "channel_rms_norm_silu", "GB/s", "channels C", _vae_norm_cases, _vae_norm_inputs,
        channel_rms_norm_silu_reference,
        {**_sora_fast_providers(_rms_call, "cuda"), **_peers(channel_rms_norm_silu_reference)},
        "bytes 2·numel·s (read x, write y)"),
    "conv3d": OpSuite(
        "conv3d", "TFLOP/s", "channels Cin = Cout", _conv_cases, _conv_inputs, causal_conv3d_reference,
        {**_sora_fast_providers(_conv_call, "triton"), **_peers(causal_conv3d_reference, cudnn=_conv_cudnn)},
        "FLOPs 2·B·Cin·Cout·27·T·H·W"),
}

OP_ALIASES = {"adaln": ("adaln_modulate", "gated_residual_adaln"),
              "vae_norm": ("group_norm_silu", "channel_rms_norm_silu")}

PROVIDERS: tuple[str, ...] = tuple(dict.fromkeys(p for s in SUITES.values() for p in s.providers))


def expand_ops(names: Optional[Sequence[str]]) -> list[str]:
    """``--op`` values (op names or the aliases adaln / vae_norm) -> op names in suite order."""
    if not names:
        return list(SUITES)
    chosen = set()
    for n in names:
        if n in SUITES:
            chosen.add(n)
        elif n in OP_ALIASES:
            chosen.update(OP_ALIASES[n])
        else:
            valid = ", ".join([*SUITES, *OP_ALIASES])
            raise ValueError(f"--op must be one of {valid}; got {n!r}")
    return [op for op in SUITES if op in chosen]
