"""Helpers shared by the tests: tolerances (numerical-error based, see the project's style guide) and
running a benchmark's CPU path."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

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


def run_bench_cpu(bench, name: str, out_dir, columns: set, *flags: str, timeout: int = 300) -> list:
    """Runs ``bench --cpu --out out_dir *flags`` as a user would and returns its rows: the run succeeds,
    says that GPU timings are skipped, writes the same rows to ``name``.json and ``name``.csv, and every
    row has exactly ``columns``."""
    proc = subprocess.run([sys.executable, str(bench), *flags, "--cpu", "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU timings are skipped" in proc.stdout
    rows = json.loads((Path(out_dir) / f"{name}.json").read_text())
    with (Path(out_dir) / f"{name}.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert rows and all(set(r) == columns for r in rows)
    return rows



def assert_resume_bit_identical(setup, tmp_path):
    """``setup(tmp_path, name, **cfg)`` builds a Trainer of 6 steps: a run split at step 3 and resumed gives the
    uninterrupted run's losses and weights bit for bit. Returns the uninterrupted run's result."""
    import torch

    from sora_fast.training.checkpoint import latest_checkpoint

    full = setup(tmp_path, "full").train()
    first = setup(tmp_path, "split", steps=3).train()
    resumed = setup(tmp_path, "split")
    assert resumed.resume() == 3
    second = resumed.train()
    assert first["losses"] + second["losses"] == full["losses"]
    a = setup(tmp_path, "a")
    a.resume(latest_checkpoint(tmp_path / "full"))
    for (n, p), (_, q) in zip(a.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    return full


def run_generate_cli(monkeypatch, pipeline, tmp_path, *args):
    """``sora-fast generate`` on ``pipeline`` for the prompts "a" and "b" (2 steps, gif, out under ``tmp_path``)
    with ``args`` more: ``(exit code, {file name: the clip written})``."""
    import sora_fast.data as data
    from sora_fast import cli
    real, written = data.write_video, {}

    def spy(p, clip, **kw):
        written[Path(p).name] = clip.clone()
        return real(p, clip, **kw)
    monkeypatch.setattr(data, "write_video", spy)
    rc = cli.main(["generate", "--pipeline", str(pipeline), "--prompt", "a", "--prompt", "b", "--steps", "2",
                   "--out", str(tmp_path / "gen"), "--format", "gif", *args])
    return rc, written
