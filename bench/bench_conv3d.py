"""Causal Conv3d: sora_fast's Triton implicit GEMM against cuDNN (F.conv3d, channels_last_3d), TFLOP/s, % of floor.

On a GPU, at Wan-VAE decoder shapes (one chunk of 4 frames, the cache holding the previous chunk's last
kt-1 frames), each provider is timed with ``triton.testing.do_bench`` (median):

- ``sora_fast``: ``causal_conv3d(..., cache=..., backend="triton")`` — causal padding and the cache are read
  inside the kernel, channels-last in and out;
- ``cudnn``: ``F.conv3d`` on an input that is already padded (the conv alone, channels_last_3d): the
  number to beat for the math;
- ``eager``: what a chunked decoder does in PyTorch (``torch.cat`` of cache and chunk, ``F.pad``, then
  ``F.conv3d``, all in the input dtype): the conv plus its copies.

FLOPs = 2·B·Cin·Cout·kt·kh·kw·T_out·H_out·W_out; the floor is the dense bf16/fp16 datasheet number
(989 TFLOP/s for H100 SXM and H200). Rows (kernel, provider, shape, dtype, metric, value, gpu, versions,
note) go to ``OUT/bench_conv3d.json`` and ``OUT/bench_conv3d.csv``.

Without a GPU (or with ``--cpu``) it says so, runs a tiny smoke of the same kernel under the Triton
interpreter against the reference, and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sora_fast.bench import FLOORS

KERNEL = "causal_conv3d"
FLOOR_TFLOPS = {gpu: f["TFLOP/s"] for gpu, f in FLOORS.items()}   # dense bf16/fp16 datasheet numbers (SXM)


@dataclass(frozen=True)
class Case:
    name: str
    cin: int
    cout: int
    t: int
    h: int
    w: int
    k: tuple[int, int, int] = (3, 3, 3)
    b: int = 1

    @property
    def shape(self) -> str:
        return f"{self.name} B={self.b} {self.cin}->{self.cout} k={self.k} THW={self.t}x{self.h}x{self.w}"

    def flops(self) -> float:
        kt, kh, kw = self.k
        return 2.0 * self.b * self.cin * self.cout * kt * kh * kw * self.t * self.h * self.w  # stride 1, same pad


# Wan2.1 VAE decoder at 480p (latent 60x104), chunks of 4 frames; up-sampled stages double H and W.
CASES = [
    Case("mid_60x104", 384, 384, 4, 60, 104),
    Case("up1_120x208", 384, 384, 4, 120, 208),
    Case("up2_240x416", 192, 192, 4, 240, 416),
    Case("up3_480x832", 96, 96, 4, 480, 832),
    Case("time_up_60x104", 384, 768, 4, 60, 104, (3, 1, 1)),
    Case("head_480x832", 96, 3, 4, 480, 832),
]
QUICK = CASES[:2]


def versions() -> str:
    import torch
    import triton
    return f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"


class Rows:
    def __init__(self, gpu: str, dtype: str):
        self.gpu, self.dtype, self.rows = gpu, dtype, []

    def add(self, provider, shape, metric, value, note=""):
        self.rows.append(dict(kernel=KERNEL, provider=provider, shape=shape, dtype=self.dtype, metric=metric,
                              value=value, gpu=self.gpu, versions=versions(), note=note))

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_conv3d.json").write_text(json.dumps(self.rows, indent=1))
        with (out / "bench_conv3d.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]) if self.rows else ["kernel"])
            writer.writeheader()
            writer.writerows(self.rows)


def run_gpu(args, rows: Rows) -> None:
    import torch
    import torch.nn.functional as F
    import triton

    from sora_fast.ops import causal_conv3d

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gpu = torch.cuda.get_device_name()
    floor = next((v for k, v in FLOOR_TFLOPS.items() if k in gpu), None)
    cl = torch.channels_last_3d
    for case in (QUICK if args.quick else CASES):
        kt, kh, kw = case.k
        x = torch.randn(case.b, case.cin, case.t, case.h, case.w, device="cuda", dtype=dtype)
        x = x.contiguous(memory_format=cl)
        cache = torch.randn(case.b, case.cin, kt - 1, case.h, case.w, device="cuda", dtype=dtype).contiguous(
            memory_format=cl) if kt > 1 else None
        weight = torch.randn(case.cout, case.cin, kt, kh, kw, device="cuda", dtype=dtype)
        weight = weight / (case.cin * kt * kh * kw) ** 0.5
        weight_cl = weight.contiguous(memory_format=cl)
        bias = torch.randn(case.cout, device="cuda", dtype=dtype)
        stream = x if cache is None else torch.cat([cache, x], dim=2)
        padded = F.pad(stream, (kw // 2, kw // 2, kh // 2, kh // 2)).contiguous(memory_format=cl)
        providers = {
            "sora_fast": lambda: causal_conv3d(x, weight, bias, cache=cache, backend="triton"),
            "cudnn": lambda: F.conv3d(padded, weight_cl, bias),
            "eager": lambda: F.conv3d(F.pad(x if cache is None else torch.cat([cache, x], dim=2),
                                            (kw // 2, kw // 2, kh // 2, kh // 2)), weight_cl, bias),
        }
        ref = providers["cudnn"]().float()
        err = (providers["sora_fast"]().float() - ref).abs().max().item()
        rows.add("sora_fast", case.shape, "max_abs_err_vs_cudnn", err)
        for name, fn in providers.items():
            ms = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
            tflops = case.flops() / ms / 1e9
            rows.add(name, case.shape, "ms", ms)
            rows.add(name, case.shape, "tflops", tflops)
            if floor:
                rows.add(name, case.shape, "pct_of_floor", 100.0 * tflops / floor, note=f"floor {floor} TFLOP/s")
            print(f"{case.shape:60s} {name:10s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s"
                  + (f" {100 * tflops / floor:5.1f}% of floor" if floor else ""), flush=True)
        torch.cuda.empty_cache()


def run_cpu_smoke(rows: Rows) -> None:
    """The same kernel under the Triton interpreter on a tiny input, against the reference."""
    os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported
    import torch

    from sora_fast.ops import causal_conv3d
    from sora_fast.ops.conv3d import causal_conv3d_ref

    shape = "smoke B=1 5->7 k=(3, 3, 3) THW=3x5x7 cache=2"
    x = torch.randn(1, 5, 3, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    weight, bias, cache = torch.randn(7, 5, 3, 3, 3), torch.randn(7), torch.randn(1, 5, 2, 5, 7)
    t0 = time.perf_counter()
    out = causal_conv3d(x, weight, bias, cache=cache, backend="triton")
    t1 = time.perf_counter()
    ref = causal_conv3d_ref(x.double(), weight.double(), bias.double(), cache=cache.double())
    err = (out.double() - ref).abs().max().item()
    rows.add("sora_fast", shape, "max_abs_err_vs_fp64_ref", err, note="Triton interpreter")
    rows.add("sora_fast", shape, "interpreter_s", t1 - t0, note="Triton interpreter (not a performance number)")
    print(f"interpreter smoke: {shape}: max |err| vs fp64 reference {err:.2e} ({t1 - t0:.2f} s interpreted)")
    if not err < 1e-4:
        raise SystemExit(f"interpreter smoke failed: error {err:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GPU: only the first two decoder shapes")
    parser.add_argument("--cpu", action="store_true", help="skip GPU timings even when a GPU is present")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="GPU input dtype (default bf16)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup in milliseconds (default 25)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time in ms (default 100)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for bench_conv3d.json/.csv (default bench/results)")
    args = parser.parse_args(argv)

    import torch
    has_gpu = torch.cuda.is_available() and not args.cpu
    rows = Rows(torch.cuda.get_device_name() if has_gpu else "none", args.dtype if has_gpu else "fp32")
    if has_gpu:
        run_gpu(args, rows)
    else:
        print("no GPU (or --cpu): GPU timings are skipped; running the interpreter smoke only")
        run_cpu_smoke(rows)
    rows.write(args.out)
    print(f"{len(rows.rows)} rows -> {args.out / 'bench_conv3d.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
