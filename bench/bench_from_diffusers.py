"""Load time and peak memory of ``VideoPipeline.from_diffusers`` on the tiny random Wan pipeline of the tests
(saved with ``save_pretrained``): time per load (median of ``--reps``), the converted models' bytes, and the
peak resident memory of one load over the memory before it (Linux: the high-water mark ``VmHWM`` reset through
``/proc/self/clear_refs``; includes allocator slack and the modules transformers imports on first use)."""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    """KiB of a /proc/self/status field."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(path: str, reps: int) -> None:
    import torch

    from sora_fast.pipeline import VideoPipeline

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pipe = VideoPipeline.from_diffusers(path)
        times.append(time.perf_counter() - t0)
        del pipe
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                  # VmHWM := VmRSS
    base = _status("VmRSS")
    pipe = VideoPipeline.from_diffusers(path)
    peak = _status("VmHWM") - base
    size = sum(t.nbytes for m in (pipe.dit, pipe.vae, pipe.text_encoder.model) for t in m.state_dict().values())
    print(f"| from_diffusers (tiny Wan, torch {torch.__version__}) | {statistics.median(times) * 1e3:.1f} ms | "
          f"{size / 2**20:.2f} MiB | {peak / 2**10:.1f} MiB |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=5, help="loads timed (default: %(default)s)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.reps)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _diffusers_utils import tiny_wan_pipeline

    with tempfile.TemporaryDirectory() as d:
        tiny_wan_pipeline(two_experts=False).save_pretrained(d)
        print("| what | load time | weights | peak RSS over baseline |\n|---|---|---|---|")
        subprocess.run([sys.executable, __file__, "--child", d, "--reps", str(args.reps)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})


if __name__ == "__main__":
    main()
