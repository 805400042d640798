"""Packed spacetime attention: sora_fast against SDPA, FlexAttention and flash-attn, in TFLOP/s and % of floor.

On a GPU, for each case (Wan 480p, Wan 720p, a packed batch of four videos of different sizes, 3D-windowed
attention) and each provider (sora_fast Triton, SDPA flash backend, FlexAttention with a document/window
block mask, flash-attn varlen / FA3 where importable), forward and backward are timed with
``triton.testing.do_bench`` (median) and reported as ms, TFLOP/s and % of the dense bf16 floor
(989 TFLOP/s for H100 SXM and H200 by datasheet). FLOPs: forward 4·Sq·Sk·H·D per sequence, summed over the
pack; backward 2.5x forward; windowed cases are scaled by the fraction of (query block, key block) pairs
the kernel visits (forward: the forward kernel's tiles; backward: the dK/dV kernel's), so every provider is
credited with the same useful work. Windowed cases run in t-major and in tile-major packs (``order="tile"``).

Sliding-tile windows (GPU or not): at Wan 480p and 720p, for our default window and STA's, in t-major and
tile-major packs, the fraction of key blocks the kernels visit, the share of them that are full (no mask),
the FLOPs executed against the dense kernel and the share of executed pairs inside the window; on a GPU,
the projection of each from the measured dense kernel. With ``--pipeline DIR`` (a trained demo pipeline):
the checker's pass rate and PSNR against dense attention of training-free windows on held-out prompts.

Without a GPU (or with ``--cpu``) it says so and runs the CPU-side parts: reference timings on a small
pack (sora_fast's torch reference against an SDPA per-sequence loop, interleaved in one process), the
visited / skipped block fraction of the window masks for the benchmark shapes, and packed vs padded FLOPs
of the packed batch.

Rows (kernel, provider, shape, dtype, metric, value, gpu, versions, note) go to ``OUT/bench_attention.json``
and ``OUT/bench_attention.csv``.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from sora_fast.bench import args as cli
from sora_fast.bench.floors import floor_for, pct_of_floor, throughput
from sora_fast.bench.report import Rows as _Rows
from sora_fast.bench.report import cpu_name
from sora_fast.bench.report import versions as _versions
from sora_fast.bench.suites import Skip
from sora_fast.bench.timing import do_bench_median, interleaved_times

KERNEL = "spacetime_attention"
DEFAULT_BLOCK_M, DEFAULT_BLOCK_N = 128, 64       # used when the kernel module does not expose its own
DEFAULT_BWD_BLOCK_M, DEFAULT_BWD_BLOCK_N = 32, 64
DEFAULT_WINDOW = (3, 8, 8)                       # +-3 latent frames, +-8 patches: a typical local 3D window


@dataclass(frozen=True)
class Case:
    name: str
    grids: tuple[tuple[int, int, int], ...]      # (T', H', W') patch grid per packed video
    heads: int
    head_dim: int = 128
    window: Optional[tuple[int, int, int]] = None
    order: str = "t-major"                       # token order of the pack: "t-major" or "tile" (TILE)

    @property
    def seqlens(self) -> list[int]:
        return [t * h * w for t, h, w in self.grids]

    @property
    def shape(self) -> str:
        grids = "+".join(f"{t}x{h}x{w}" for t, h, w in self.grids)
        win = f" window={self.window}" if self.window else ""
        order = f" order=tile{TILE}" if self.order == "tile" else ""
        return f"{self.name} [{grids}] N={sum(self.seqlens)} H={self.heads} D={self.head_dim}{win}{order}"

    def coords(self, device) -> torch.Tensor:
        """(N, 3) int32 (t, h, w) of the pack's tokens in its order."""
        from sora_fast.triton._blocks import pack_coords

        return pack_coords(self.grids, device, self.order, TILE if self.order == "tile" else None)


WAN480 = (21, 30, 52)     # Wan2.1 480p, 81 frames: 32,760 tokens
WAN720 = (21, 45, 80)     # Wan2.1 720p, 81 frames: 75,600 tokens
# Four videos of different sizes and lengths, 64,032 tokens in one pack.
PACKED4 = (WAN480, (11, 30, 52), (21, 20, 24), (6, 24, 28))
TILE = (4, 8, 8)          # pack_videos(..., order="tile")'s default tile, in latent patches
# FastVideo's Sliding Tile Attention: tiles of (6, 8, 8) tokens, a (3, 3, 3)-tile window (the query's tile and
# one tile on each side), tile-granular: every query of a tile sees the same 27 tiles. Our windows are centred
# on each token; the one of about the same reach is +-(6, 8, 8). Both are measured; the kernels run STA's mask
# when given the coordinates // STA_TILE as ``coords`` with window (1, 1, 1).
STA_TILE, STA_WINDOW = (6, 8, 8), (6, 8, 8)


def gpu_cases(window: tuple[int, int, int], quick: bool) -> list[Case]:
    cases = [Case("wan480", (WAN480,), 12), Case("wan720", (WAN720,), 40), Case("packed4", PACKED4, 24),
             Case("wan480-window", (WAN480,), 12, window=window), Case("wan720-window", (WAN720,), 40, window=window),
             Case("wan480-window-tile", (WAN480,), 12, window=window, order="tile"),
             Case("wan720-window-tile", (WAN720,), 40, window=window, order="tile")]
    return [c for c in cases if c.name in ("wan480", "packed4", "wan480-window", "wan480-window-tile")] if quick \
        else cases


# --- environment ----------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    return _versions(("torch", "cuda", "python", "triton", "sora_fast", "flash_attn", "flash_attn_interface"),
                     cuda_as_text=True)


def block_sizes(backward: bool = False) -> tuple[int, int, str]:
    """(BLOCK_M, BLOCK_N, where from): the windowed forward kernel's own block sizes when it exposes them,
    since the skipped fraction depends on them; with ``backward``, the windowed dK/dV kernel's."""
    names = ("BWD_BLOCK_M", "BWD_BLOCK_N") if backward else ("FWD_BLOCK_M", "FWD_BLOCK_N")
    try:
        mod = importlib.import_module("sora_fast.triton.attention")
        return int(getattr(mod, names[0])), int(getattr(mod, names[1])), "sora_fast.triton.attention"
    except Exception as e:
        bm, bn = (DEFAULT_BWD_BLOCK_M, DEFAULT_BWD_BLOCK_N) if backward else (DEFAULT_BLOCK_M, DEFAULT_BLOCK_N)
        return bm, bn, f"defaults ({type(e).__name__}: {e})"


def floor_tflops(gpu_name: str, override: Optional[float]) -> Optional[float]:
    return override or floor_for(gpu_name, "TFLOP/s")


# --- FLOPs and block density (host only) -----------------------------------------------------------
def dense_fwd_flops(seqlens: Sequence[int], heads: int, head_dim: int) -> float:
    return float(sum(4 * n * n * heads * head_dim for n in seqlens))


def window_stats(grids, window, block_m: int, block_n: int, order: str = "t-major", tile=None, granule=None) -> dict:
    """``{"visited", "full", "total"}`` block pairs of the kernels' block lists (``_blocks.window_block_stats``)."""
    from sora_fast.triton._blocks import window_block_stats

    return window_block_stats(grids, window, block_m, block_n, order, tile, granule)


def window_density(grids, window, block_m: int, block_n: int, order: str = "t-major", tile=None) -> tuple[int, int]:
    """(visited, total) block pairs: ``visited / total`` scales the dense FLOPs of a windowed launch."""
    st = window_stats(grids, window, block_m, block_n, order, tile)
    return st["visited"], st["total"]


def window_pairs(grid, window, granule=None) -> int:
    """(query, key) pairs inside a window on one video: a product over the axes of the summed per-coordinate
    counts (a window clipped at the video's edges). ``granule``: the window counted in whole cells of that
    size (``|i // g - j // g| <= w``, STA's tile-granular mask); None: centred on each token."""
    count = 1
    for axis, (n, w) in enumerate(zip(grid, window)):
        g = 1 if granule is None else granule[axis]
        count *= sum(sum(1 for j in range(n) if abs(i // g - j // g) <= w) for i in range(n))
    return count


class Rows(_Rows):
    """The shared result rows (:class:`sora_fast.bench.report.Rows`), written to bench_attention.json/.csv."""

    def __init__(self, gpu: str, dtype: str):
        super().__init__(gpu, dtype, versions(), kernel=KERNEL)

    def write(self, out: Path) -> tuple[Path, Path]:
        return super().write(out, "bench_attention")


def analysis_rows(rows: Rows, window, block_m: int, block_n: int, block_src: str, heads_packed: int = 24,
                  bwd_blocks: Optional[tuple[int, int]] = None):
    """Host-side facts the GPU numbers are read against: skipped-block fraction of the window masks for
    every benchmark shape (forward tiles; ``bwd_blocks`` adds the dK/dV kernel's density, which credits
    the backward), and the FLOPs a padded batch would waste on the packed one."""
    shapes = (("wan480", (WAN480,), 12), ("wan720", (WAN720,), 40), ("packed4", PACKED4, heads_packed))
    for name, grids, heads in shapes:
        case = Case(name, grids, heads, window=window)
        if bwd_blocks:
            bm, bn = bwd_blocks
            visited, total = window_density(grids, window, bm, bn)
            rows.add("sora_fast", case.shape, "block_density_bwd", visited / total, kernel=KERNEL + "_window",
                     note=f"dK/dV kernel BLOCK_M={bm} BLOCK_N={bn}: {visited}/{total}", dtype="-")
            print(f"  window {window} on {name}: backward (dK/dV tiles {bm}x{bn}) visits {visited / total:.1%}")
        t0 = time.perf_counter()
        visited, total = window_density(grids, window, block_m, block_n)
        note = f"BLOCK_M={block_m} BLOCK_N={block_n} from {block_src}; {time.perf_counter() - t0:.1f} s on host"
        rows.add("sora_fast", case.shape, "visited_blocks", visited, kernel=KERNEL + "_window", note=note, dtype="-")
        rows.add("sora_fast", case.shape, "total_blocks", total, kernel=KERNEL + "_window", note=note, dtype="-")
        rows.add("sora_fast", case.shape, "block_density", visited / total, kernel=KERNEL + "_window", note=note,
                 dtype="-")
        rows.add("sora_fast", case.shape, "skipped_block_fraction", 1 - visited / total, kernel=KERNEL + "_window",
                 note=note, dtype="-")
        print(f"  window {window} on {name}: visits {visited}/{total} block pairs = {visited / total:.1%} "
              f"(skips {1 - visited / total:.1%})")
    case = Case("packed4", PACKED4, heads_packed)
    packed = dense_fwd_flops(case.seqlens, case.heads, case.head_dim)
    padded = dense_fwd_flops([max(case.seqlens)] * len(case.seqlens), case.heads, case.head_dim)
    for metric, value in (("fwd_flops_packed", packed), ("fwd_flops_padded", padded),
                          ("padded_over_packed", padded / packed)):
        rows.add("sora_fast", case.shape, metric, value, kernel=KERNEL + "_flops", dtype="-",
                 note="padded: every video padded to the longest, as a (B, S_max) batch would be")
    print(f"  packed4 forward FLOPs: packed {packed / 1e12:.1f} T vs padded {padded / 1e12:.1f} T "
          f"({padded / packed:.2f}x)")


def sliding_tile_rows(rows: Rows, windows, block_m: int, block_n: int, bwd_blocks: tuple[int, int],
                      heads: int = 12, head_dim: int = 128) -> list[dict]:
    """t-major vs tile-major packs at Wan 480p and 720p, for each window: the fraction of key blocks the
    kernels visit (forward tiles and the dK/dV kernel's), the share of visited blocks that are full (run
    without a mask), the FLOPs executed against the dense kernel and the share of executed (query, key)
    pairs that are inside the window. ``windows``: ``[(label, window, tile for the tile-major pack, granule)]``
    (``granule``: the window in whole cells of that size, STA's tile-granular mask; None: token-centred).
    Returns the table as dicts (also written as rows)."""
    table = []
    for shape, grid in (("wan480", WAN480), ("wan720", WAN720)):
        for label, window, tile, granule in windows:
            pairs = window_pairs(grid, window, granule)
            for order in ("t-major", "tile"):
                t = tile if order == "tile" else None
                fwd = window_stats((grid,), window, block_m, block_n, order, t, granule)
                bwd = window_stats((grid,), window, *bwd_blocks, order, t, granule)
                executed = fwd["visited"] * block_m * block_n
                entry = dict(shape=shape, window=label, order=order if t is None else f"tile{t}",
                             visited=fwd["visited"] / fwd["total"], full=fwd["full"] / max(fwd["visited"], 1),
                             visited_bwd=bwd["visited"] / bwd["total"], full_bwd=bwd["full"] / max(bwd["visited"], 1),
                             flops_vs_dense=fwd["visited"] / fwd["total"], useful=pairs / executed)
                table.append(entry)
                case = Case(shape, (grid,), heads, head_dim, window=window, order=order)
                note = (f"{label}; {order}{'' if t is None else f' tile {t}'}; forward tiles {block_m}x{block_n}, "
                        f"dK/dV {bwd_blocks[0]}x{bwd_blocks[1]}")
                for metric in ("visited", "full", "visited_bwd", "full_bwd", "flops_vs_dense", "useful"):
                    rows.add("sora_fast", f"{case.shape} {entry['order']}", f"sliding_tile_{metric}", entry[metric],
                             kernel=KERNEL + "_window", note=note, dtype="-")
                print(f"  {shape} {label:<34} {entry['order']:<14} visits {entry['visited']:6.1%} of key blocks "
                      f"({entry['full']:5.1%} full; backward {entry['visited_bwd']:6.1%}, {entry['full_bwd']:5.1%} "
                      f"full), executes {entry['flops_vs_dense']:6.1%} of dense FLOPs, {entry['useful']:5.1%} useful")
    return table


def project_windowed_ms(dense_ms: dict, table: list[dict]) -> list[dict]:
    """The GPU projection of each windowed configuration from the measured dense kernel: dense ms times
    the fraction of blocks visited (forward tiles for ``fwd``, the dK/dV kernel's for ``bwd``). A block
    costs what a dense block costs (the same tile loop), so this is the time at equal per-block speed;
    partial blocks' masks make it a lower bound. ``dense_ms``: ``{(shape, mode): ms}``."""
    out = []
    for e in table:
        for mode, frac in (("fwd", e["visited"]), ("bwd", e["visited_bwd"])):
            ms = dense_ms.get((e["shape"], mode))
            if ms is not None:
                out.append(dict(shape=e["shape"], window=e["window"], order=e["order"], mode=mode,
                                dense_ms=ms, projected_ms=ms * frac, speedup=1 / frac))
    return out


def quality_rows(rows: Rows, pipeline, windows, prompts: int, **kw) -> list[dict]:
    """Training-free windows on a trained pipeline (``bench/_window_quality.py``): per window, the checker's
    pass rate on held-out prompts and PSNR against the dense run, written as rows. ``kw`` goes to
    ``window_quality`` (sizes, steps, ...)."""
    from bench._window_quality import report, window_quality

    table = window_quality(pipeline, windows, prompts, **kw)
    for r in table:
        shape = f"demo {r['label']} ({r['clips']} held-out prompts)"
        note = f"pairs kept {r['pairs_kept']:.1%}; {r['passed']}/{r['clips']} pass"
        for metric in ("pass_rate", "psnr_vs_dense", "pairs_kept"):
            rows.add("sora_fast", shape, metric, r[metric], kernel=KERNEL + "_window_quality", note=note, dtype="-")
    print(report(table))
    return table


# --- inputs --------------------------------------------------------------------------------------
def make_inputs(case: Case, dtype, device, requires_grad=False):
    """Packed (N, H, D) q, k, v with N(0, 1) entries (never zeros), cu_seqlens, grid, and per-sequence
    (1, H, L, D) contiguous copies for the per-sequence peers (made up front, not inside the timing)."""
    n = sum(case.seqlens)
    q, k, v = (torch.randn(n, case.heads, case.head_dim, device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    grid = torch.tensor(case.grids, dtype=torch.int32, device=device)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, cu, grid


def per_sequence(t: torch.Tensor, seqlens: Sequence[int], requires_grad: bool) -> list[torch.Tensor]:
    """(N, H, D) -> [(1, H, L, D)] contiguous leaves, the layout SDPA's flash path wants."""
    return [x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(requires_grad)
            for x in t.split(list(seqlens))]


# --- providers (GPU) -------------------------------------------------------------------------------
# A provider raises Skip (sora_fast.bench.suites) when it cannot run a case; the message is the row's note.
def provider_sora_fast(case: Case, q, k, v, cu, grid):
    from sora_fast import ops

    coords = case.coords(q.device) if case.window else None
    return lambda: ops.spacetime_attention(q, k, v, cu, max_seqlen_q=max(case.seqlens), window=case.window,
                                           grid=grid, coords=coords, backend="triton"), [q, k, v]


def provider_sdpa(case: Case, q, k, v, cu, grid):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if case.window:
        raise Skip("SDPA's flash backend takes no mask (a dense 3D-window mask is O(N^2) memory)")
    rg = q.requires_grad
    qs, ks, vs = (per_sequence(t, case.seqlens, rg) for t in (q, k, v))

    def fn():   # one launch per sequence: SDPA has no varlen entry point
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return [sdpa(a, b, c) for a, b, c in zip(qs, ks, vs)]
    return fn, qs + ks + vs


_FLEX = {}


def provider_flex(case: Case, q, k, v, cu, grid):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Skip(f"torch.nn.attention.flex_attention not importable: {e}")
    import inspect

    n, dev = q.shape[0], q.device
    seq_ids = torch.repeat_interleave(torch.arange(len(case.seqlens), device=dev),
                                      torch.tensor(case.seqlens, device=dev))
    if case.window:
        coords = case.coords(dev)                                        # (N, 3) in the pack's order
        wt, wh, ww = case.window

        def mask_mod(b, h, qi, ki):
            d = (coords[qi] - coords[ki]).abs()
            return (seq_ids[qi] == seq_ids[ki]) & (d[0] <= wt) & (d[1] <= wh) & (d[2] <= ww)
    else:
        def mask_mod(b, h, qi, ki):
            return seq_ids[qi] == seq_ids[ki]
    kw = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=dev, **kw)
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    rg = q.requires_grad
    qf, kf, vf = (t.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(rg) for t in (q, k, v))
    return lambda: flex(qf, kf, vf, block_mask=block_mask), [qf, kf, vf]


def provider_flash_attn(case: Case, q, k, v, cu, grid, module="flash_attn"):
    if case.window:
        raise Skip(f"{module}'s window is 1D over the token order, not a 3D box")
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise Skip(f"{module} not importable: {type(e).__name__}: {e}")
    m = max(case.seqlens)
    rg = q.requires_grad
    qd, kd, vd = (t.detach().clone().requires_grad_(rg) for t in (q, k, v))

    def fn():
        out = mod.flash_attn_varlen_func(qd, kd, vd, cu, cu, m, m)
        return out[0] if isinstance(out, tuple) else out   # FA3 returns (out, lse) in some versions
    return fn, [qd, kd, vd]


PROVIDERS: dict[str, Callable] = {
    "sora_fast": provider_sora_fast,
    "sdpa_flash": provider_sdpa,
    "flex": provider_flex,
    "flash_attn": provider_flash_attn,
    "fa3": lambda *a: provider_flash_attn(*a, module="flash_attn_interface"),
}


def _outputs(res) -> list[torch.Tensor]:
    return res if isinstance(res, list) else [res]


def run_gpu(args, rows: Rows, block_m: int, block_n: int, bwd_blocks: tuple[int, int],
            sliding_table: Optional[list] = None) -> None:
    dtype = cli.GPU_DTYPES[args.dtype]
    dense_ms = {}
    floor = floor_tflops(rows.gpu, args.floor_tflops)
    if floor is None:
        print(f"  no datasheet floor known for {rows.gpu!r}: pass --floor-tflops to get % of floor")
    providers = [p for p in PROVIDERS if p in args.providers]
    for case in gpu_cases(args.window, args.quick):
        flops_dense = dense_fwd_flops(case.seqlens, case.heads, case.head_dim)
        flops_fwd, flops_bwd, notes = flops_dense, 2.5 * flops_dense, {"fwd": "", "bwd": ""}
        if case.window:
            # each direction credited with the density its own tiles visit (the dK/dV kernel's for backward)
            tile = TILE if case.order == "tile" else None
            visited, total = window_density(case.grids, case.window, block_m, block_n, case.order, tile)
            flops_fwd *= visited / total
            notes["fwd"] = f"FLOPs scaled by block density {visited}/{total}"
            visited, total = window_density(case.grids, case.window, *bwd_blocks, case.order, tile)
            flops_bwd *= visited / total
            notes["bwd"] = f"FLOPs scaled by the dK/dV kernel's block density {visited}/{total}"
        print(f"{case.shape}: {flops_fwd / 1e12:.2f} TFLOP forward")
        ref_out = None
        for mode in args.modes:
            kernel = f"{KERNEL}_{mode}"
            flops, note = (flops_bwd, notes["bwd"]) if mode == "bwd" else (flops_fwd, notes["fwd"])
            for name in providers:
                torch.cuda.empty_cache()
                try:
                    q, k, v, cu, grid = make_inputs(case, dtype, "cuda", requires_grad=mode == "bwd")
                    fn, leaves = PROVIDERS[name](case, q, k, v, cu, grid)
                    if mode == "fwd":
                        bench = fn
                        with torch.no_grad():
                            outs = _outputs(fn())
                        if name in ("sora_fast", "sdpa_flash") and not case.window:
                            out = torch.cat([o[0].transpose(0, 1) if o.dim() == 4 else o for o in outs])
                            if ref_out is None:
                                ref_out = (name, out.float())
                            else:
                                rows.add(name, case.shape, f"max_abs_diff_vs_{ref_out[0]}",
                                         (out.float() - ref_out[1]).abs().max().item(), kernel=kernel)
                    else:
                        outs = _outputs(fn())
                        douts = [torch.randn_like(o) for o in outs]

                        def bench(outs=outs, douts=douts, leaves=leaves):
                            torch.autograd.grad(outs, leaves, douts, retain_graph=True)
                    # Inputs are >= 100 MB per tensor at these shapes, past the 50 MB L2: no rotation needed.
                    ms = do_bench_median(bench, warmup=args.warmup_ms, rep=args.rep_ms)
                except Skip as e:
                    rows.add(name, case.shape, "skipped", None, kernel=kernel, note=str(e))
                    print(f"  {mode} {name:<11} skipped: {e}")
                    continue
                except Exception as e:   # e.g. backend not registered yet, out of memory: report, keep going
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    rows.add(name, case.shape, "skipped", None, kernel=kernel, note=reason)
                    print(f"  {mode} {name:<11} skipped: {reason}")
                    continue
                finally:
                    fn = bench = outs = leaves = None   # free the case's activations before the next provider
                tflops = throughput(flops, ms, "TFLOP/s")
                if name == "sora_fast" and not case.window:
                    dense_ms[(case.name, mode)] = ms
                rows.add(name, case.shape, "ms", ms, kernel=kernel, note=note)
                rows.add(name, case.shape, "tflops", tflops, kernel=kernel, note=note)
                pct = pct_of_floor(tflops, floor)
                rows.add(name, case.shape, "pct_of_floor", pct, kernel=kernel,
                         note=f"floor {floor} TFLOP/s" if floor else "no floor known")
                pct_s = "" if pct is None else f"  {pct:5.1f}% of floor"
                print(f"  {mode} {name:<11} {ms:9.3f} ms  {tflops:7.1f} TFLOP/s{pct_s}")
    for p in project_windowed_ms(dense_ms, sliding_table or []):
        rows.add("sora_fast", f"{p['shape']} {p['window']} {p['order']}", "projected_ms", p["projected_ms"],
                 kernel=f"{KERNEL}_{p['mode']}", note=f"measured dense {p['dense_ms']:.3f} ms x visited blocks "
                 f"(1/{p['speedup']:.1f}); a lower bound: partial blocks also pay their masks")
        print(f"  projected {p['mode']} {p['shape']} {p['window']} {p['order']}: {p['projected_ms']:.3f} ms "
              f"({p['speedup']:.1f}x under dense)")


# --- CPU-side parts ------------------------------------------------------------------------------
def run_cpu_reference(args, rows: Rows) -> None:
    """Reference timings on a small pack: sora_fast's torch backend (its fp32 reference) against an SDPA
    loop, interleaved in one process so machine noise hits both alike; reported as the ratio."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from sora_fast import ops

    grids = ((2, 8, 8), (3, 6, 10), (1, 12, 12), (4, 5, 5)) if args.quick else ((4, 16, 16), (3, 12, 20), (2, 24, 24))
    heads, d = (4, 64) if args.quick else (8, 64)
    reps = 3 if args.quick else 15
    for window in (None, args.window):
        case = Case("cpu-small" + ("-window" if window else ""), grids, heads, d, window)
        q, k, v, cu, grid = make_inputs(case, torch.float32, "cpu")
        qs, ks, vs = (per_sequence(t, case.seqlens, False) for t in (q, k, v))
        fns = {"sora_fast_torch_ref": lambda: ops.spacetime_attention(q, k, v, cu, window=window, grid=grid,
                                                                      backend="torch")}
        if window is None:
            fns["sdpa_loop"] = lambda: [sdpa(a, b, c) for a, b, c in zip(qs, ks, vs)]
        with torch.no_grad():
            times = {p: [1e3 * t for t in ts] for p, ts in interleaved_times(fns, reps, warmup=1).items()}   # ms
            if "sdpa_loop" in fns:
                a = fns["sora_fast_torch_ref"]()
                b = torch.cat([o[0].transpose(0, 1) for o in fns["sdpa_loop"]()])
                rows.add("sora_fast_torch_ref", case.shape, "max_abs_diff_vs_sdpa_loop", (a - b).abs().max().item(),
                         kernel=KERNEL + "_fwd", dtype="fp32")
        for p, ts in times.items():
            ms = statistics.median(ts)
            rows.add(p, case.shape, "ms", ms, kernel=KERNEL + "_fwd", dtype="fp32",
                     note=f"CPU, median of {reps} interleaved runs")
            print(f"  {case.name:<17} {p:<20} {ms:8.2f} ms")
        if "sdpa_loop" in times:
            ratio = statistics.median(times["sora_fast_torch_ref"]) / statistics.median(times["sdpa_loop"])
            rows.add("sora_fast_torch_ref", case.shape, "ratio_vs_sdpa_loop", ratio, kernel=KERNEL + "_fwd",
                     dtype="fp32", note="time ratio, >1 means the reference is slower")
            print(f"  {case.name:<17} reference / SDPA loop time ratio {ratio:.2f}")


def parse_window(s: str) -> tuple[int, int, int]:
    try:
        w = tuple(int(x) for x in s.split(","))
    except ValueError:
        w = ()
    if len(w) != 3 or min(w) < 0:
        raise argparse.ArgumentTypeError(f"--window must be three integers >= 0 like 3,8,8, got {s!r}")
    return w


def main(argv=None) -> int:
    parser = cli.script_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (Wan 480p, packed4, windowed 480p) and shorter timing; on CPU a smaller "
                             "reference pack")
    cli.add_out_flag(parser, "directory for bench_attention.json and .csv (default: bench/results, git-ignored)",
                     Path(__file__).resolve().parent / "results")
    cli.add_cpu_flag(parser, "run only the CPU-side parts even when a GPU is present")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS), metavar="P",
                        help=f"GPU providers to run, side by side (default: all of {', '.join(PROVIDERS)}); one "
                             "that cannot run is reported as skipped with the reason")
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"],
                        help="forward and/or backward (default both)")
    cli.add_dtype_flag(parser)
    parser.add_argument("--window", type=parse_window, default=DEFAULT_WINDOW, metavar="WT,WH,WW",
                        help="3D window half-sizes for the windowed cases and the density report (default 3,8,8)")
    cli.add_do_bench_flags(parser, warmup_help="do_bench warm-up in ms (default 100, 25 with --quick)",
                           rep_help="do_bench measuring time in ms (default 500, 100 with --quick)")
    parser.add_argument("--pipeline", type=Path, default=None, metavar="DIR",
                        help="a trained pipeline (a demo's OUT/pipeline): also report training-free windows' checker "
                             "pass rate and PSNR against dense attention on held-out prompts")
    parser.add_argument("--quality-windows", type=parse_window, nargs="+", default=None, metavar="WT,WH,WW",
                        help="windows for --pipeline (default: bench/_window_quality.py's two, about half and a "
                             "quarter of the pairs on the demo's grids)")
    parser.add_argument("--quality-prompts", type=int, default=24, metavar="N",
                        help="held-out prompts per window for --pipeline (default 24)")
    parser.add_argument("--floor-tflops", type=float, default=None,
                        help="dense floor in TFLOP/s for %% of floor (default: 989 for H100/H200, else none)")
    args = parser.parse_args(argv)
    cli.resolve_do_bench(args)

    on_gpu = cli.on_gpu(args)
    gpu = torch.cuda.get_device_name() if on_gpu else f"cpu ({cpu_name()})"
    rows = Rows(gpu, args.dtype if on_gpu else "fp32")
    block_m, block_n, block_src = block_sizes()
    bwd_blocks = block_sizes(backward=True)[:2]
    t0 = time.perf_counter()
    if on_gpu:
        print(f"GPU: {gpu}; {args.dtype}; providers {', '.join(args.providers)}")
    else:
        why = "--cpu given" if args.cpu else "no CUDA GPU"
        print(f"{why}: GPU timings are skipped; running the CPU-side parts (reference timings, window block "
              "density, packed vs padded FLOPs)")
    print(f"window block density (BLOCK_M={block_m}, BLOCK_N={block_n} from {block_src}):")
    analysis_rows(rows, args.window, block_m, block_n, block_src, bwd_blocks=bwd_blocks)
    print(f"sliding-tile windows: t-major vs tile-major packs (tile {TILE}; STA's window on its own tile {STA_TILE}):")
    table = sliding_tile_rows(rows, [(f"ours {args.window}", args.window, TILE, None),
                                     (f"STA-sized, token-centred {STA_WINDOW}", STA_WINDOW, STA_TILE, None),
                                     ("STA (3,3,3) tiles, tile-granular", (1, 1, 1), STA_TILE, STA_TILE)],
                              block_m, block_n, bwd_blocks)
    if args.pipeline is not None:
        from bench._window_quality import DEFAULT_WINDOWS

        print(f"training-free windows on {args.pipeline}:")
        quality_rows(rows, args.pipeline, args.quality_windows or DEFAULT_WINDOWS, args.quality_prompts)
    if on_gpu:
        run_gpu(args, rows, block_m, block_n, bwd_blocks, table)
    else:
        print("CPU reference timings:")
        run_cpu_reference(args, rows)
    jpath, cpath = rows.write(args.out)
    print(f"{len(rows.rows)} rows -> {jpath}, {cpath} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
