"""sora-fast profile: stage times add up, the op breakdown and trace are written, PeakMemory is exact, bad input."""
import json
import re
import time

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


class _FakeNvml:
    """A stand-in for ``pynvml`` whose readings change on every call (so means, minima and maxima differ)."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 1, 0

    def __init__(self, fail_init=False, fail_after=None):
        self.fail_init, self.fail_after, self.reads, self.bus = fail_init, fail_after, 0, None

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("Driver Not Loaded")

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        self.bus = bus
        return "handle"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000  # mW

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"total": 80 * 2**30, "used": (1 + self.reads) * 2**20})()

    def nvmlDeviceGetClockInfo(self, h, kind):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise RuntimeError("GPU is lost")
        return 1000 + self.reads if kind == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000 + 1000 * self.reads  # mW

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("Util", (), {"gpu": 97})()

    def nvmlDeviceGetTemperature(self, h, kind):
        return 55


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device as NVML sees it, on a machine without one: a fake pynvml and device properties."""
    import sys
    import types
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)

    def install(**kw):
        nvml = _FakeNvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml
    return install


def test_nvml_sampler_records_and_summarizes_telemetry(fake_gpu):
    from sora_fast.bench.runner import _telemetry_during
    from sora_fast.profile import _NvmlSampler
    nvml = fake_gpu()
    with _NvmlSampler(torch.device("cuda", 0), interval=0.001) as s:
        deadline = time.monotonic() + 30
        while len(s.samples) < 5 and s._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
    assert nvml.bus == "00000000:1b:00.0"  # found by PCI bus id, which CUDA_VISIBLE_DEVICES cannot renumber
    out = s.summary()
    assert out["available"] is True and out["samples"] == len(s.samples) >= 5
    assert (out["name"], out["max_sm_clock_mhz"], out["power_limit_w"], out["memory_total_mib"]) == (
        "NVIDIA H100 80GB HBM3", 1980, 700.0, 80 * 1024)
    for key in ("sm_clock_mhz", "power_w", "memory_used_mib"):
        vals = [x[key] for x in s.samples]
        assert out[key] == {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        assert out[key]["min"] < out[key]["max"]  # the readings moved: each sample is a fresh read
    assert out["gpu_util_pct"] == {"mean": 97, "min": 97, "max": 97}
    # a benchmark row's telemetry: the mean of the samples taken while it ran
    row = _telemetry_during(s, len(s.samples) - 2)
    assert row["samples"] == 2 and row["power_w"] == sum(x["power_w"] for x in s.samples[-2:]) / 2
    assert _telemetry_during(s, len(s.samples)) is None


def test_nvml_sampler_failures_are_reported_not_raised(fake_gpu):
    from sora_fast.profile import _NvmlSampler
    fake_gpu(fail_init=True)
    with _NvmlSampler(torch.device("cuda", 0)) as s:
        pass
    assert s.summary() == {"available": False, "reason": "NVML failed: Driver Not Loaded"}
    fake_gpu(fail_after=3)  # the GPU drops out mid-run: the samples so far are kept, the reason is said
    with _NvmlSampler(torch.device("cuda", 0), interval=0.001) as s:
        s._thread.join(timeout=10)
    assert s.summary() == {"available": False, "reason": "NVML read failed: GPU is lost"}
    assert len(s.samples) == 1  # read 1 used clock calls 1-2; read 2 failed at call 4
    with _NvmlSampler(torch.device("cpu")) as s:
        pass
    assert s.summary() == {"available": False, "reason": "the pipeline runs on cpu, not a CUDA GPU"}
