"""sora-fast profile: stage times add up, the op breakdown and trace are written, PeakMemory is exact, bad input."""
import json
import re

import pytest
import torch

from sora_fast import cli
from sora_fast.profile import build_preset_pipeline
from sora_fast.tools.memory import PeakMemory


def test_peak_memory_counts_a_known_allocation_pattern():
    x = torch.randn(100)  # created before the mode: never counted, nor views of it
    w = torch.randn(64)
    with PeakMemory(exclude=[w]) as mem:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # +4000 B -> 8000 live (the peak)
        del a  # -> 4000 live
        c = torch.empty(250, dtype=torch.int32)  # +1000 -> 5000 live
        views = (w.view(8, 8), w[:10], x.view(10, 10), x.add_(1), c.view(25, 10))  # no new storage
        y = x + 1  # +400 -> 5400 live
        torch.mul(x, 2, out=y)  # writes into y: no new storage
    assert (mem.peak, mem.live) == (8000, 5400)
    del b
    assert mem.live == 1400
    mem.reset_peak()
    assert mem.peak == 1400
    del c, views, y
    assert mem.live == 0


def test_peak_memory_exclude():
    """Excluded tensors are not counted even when an op hands them back as a new-looking output."""
    w = torch.randn(64)
    with PeakMemory(exclude=[w]) as mem:
        z = w.detach()  # shares w's storage
        y = z * 2  # 256 B
        del y
        y = torch.randn(10, dtype=torch.float64)  # 80 B
    assert (mem.peak, mem.live) == (256, 80)
    del z, y


def _run(tmp_path, *extra):
    out = tmp_path / "profile.json"
    rc = cli.main(["profile", "--preset", "tiny", "--steps", "3", "--json", str(out), *extra])
    return rc, json.loads(out.read_text()) if rc == 0 else None


def test_profile_tiny_preset_writes_consistent_json(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    rc, r = _run(tmp_path, "--trace", str(trace), "--top", "8")
    assert rc == 0
    st = r["stages"]
    assert all(st[k] > 0 for k in ("text_s", "denoise_s", "decode_s", "total_s"))
    assert len(st["step_times_s"]) == 3 and all(s > 0 for s in st["step_times_s"])
    # the steps are the denoise loop; what is left is packing the noise and unpacking the latents
    assert abs(sum(st["step_times_s"]) - st["denoise_s"]) <= 0.05 * st["denoise_s"] + 2e-3
    assert st["steps"]["min_s"] <= st["steps"]["mean_s"] <= st["steps"]["max_s"]
    ops = r["ops"]["ops"]
    assert 0 < len(ops) <= 8 and all(o["calls"] > 0 and o["total_ms"] > 0 for o in ops)
    assert sum(o["percent"] for o in ops) <= 100 + 1e-6
    assert r["memory"]["peak_bytes"] > 0 and r["config"]["warmup_runs"] == 1
    tp = r["throughput"]
    assert tp["latent_tokens"] == 3 * 2 * 2 and tp["cfg_copies"] == 2  # 9x32x32 -> latent 3x4x4, patch 1x2x2
    assert tp["dit_tokens_per_s"] == pytest.approx(12 * 2 * 3 / st["denoise_s"])
    assert r["telemetry"]["available"] is False
    events = json.loads(trace.read_text())
    assert events["traceEvents"]
    text = capsys.readouterr().out
    for word in ("text encode", "denoise", "VAE decode", "warm-up", "tokens/s", "telemetry: unavailable (",
                 "aten::"):
        assert word in text


def test_profile_saved_pipeline_without_cfg(tmp_path):
    path = build_preset_pipeline("tiny").save(tmp_path / "pipe")
    out = tmp_path / "p.json"
    rc = cli.main(["profile", "--pipeline", str(path), "--steps", "2", "--guidance", "1", "--warmup", "0",
                   "--prompts", "2", "--size", "5x16x16", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["throughput"]["cfg_copies"] == 1 and r["config"]["size"] == [5, 16, 16]
    assert r["throughput"]["latent_tokens"] == 2 * (2 * 1 * 1)


@pytest.mark.parametrize("args, match", [
    (["--size", "9x20x32"], r"--size: height=20 must be a multiple of 16"),
    (["--size", "8x32x32"], r"--size: frames=8 must be 1 \+ 4k"),
    (["--preset", "huge"], r"--preset must be one of tiny, demo; got 'huge'"),
    (["--steps", "0"], r"--steps must be >= 1, got 0"),
    (["--preset", "tiny", "--pipeline", "somewhere"], r"at most one of --preset and --pipeline"),
])
def test_profile_bad_input(args, match, capsys):
    assert cli.main(["profile", *args]) == 2
    assert re.search(match, capsys.readouterr().err)
