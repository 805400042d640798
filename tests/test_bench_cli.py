"""``sora-fast bench``: one quick CPU run of every op writes JSON, CSV and plots that agree; skipped providers say
why; the correctness gate keeps a wrong provider from being timed; bad names are clear errors."""
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

from sora_fast import cli
from sora_fast.bench import run_bench
from sora_fast.bench.report import COLUMNS
from sora_fast.bench.suites import SUITES, Skip

OPS = tuple(SUITES)


# --- injected providers: one slightly wrong, one grossly wrong, one that raises, one correct -------------------
def _slightly_wrong(a, ctx):
    """The right attention, 0.1% too large: far above fp32 rounding (~1e-7), small enough for a loose check."""
    from sora_fast import ops

    return (lambda: ops.spacetime_attention(a["q"], a["k"], a["v"], a["cu"], backend="torch") * 1.001,
            lambda out: (out[a["rows"]],))


def _shifted_rows(a, ctx):
    """Every token gets its neighbour's output (an off-by-one in the packing)."""
    x, ids = a["x"], a["seq_ids"].long()
    y = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + a["scale"][ids]) + a["shift"][ids]
    return (lambda: y.roll(1, dims=0)), lambda out: (out,)


def _raises(a, ctx):
    def fn():
        raise RuntimeError("kernel launch failed: too many resources requested")
    return fn, lambda out: (out,)


def _unavailable(a, ctx):
    raise Skip("needs a library that is not installed here")


def _correct_conv(a, ctx):
    """The causal conv through F.conv3d with explicit padding arguments instead of F.pad: a correct peer."""
    x = torch.cat([a["cache"], a["x"]], dim=2)
    return (lambda: torch.nn.functional.conv3d(x, a["weight"], a["bias"], padding=(0, 1, 1))), lambda out: (out,)


EXTRA = {"attention": {"slightly_wrong": _slightly_wrong}, "adaln_modulate": {"shifted_rows": _shifted_rows},
         "group_norm_silu": {"raises": _raises, "unavailable": _unavailable},
         "conv3d": {"correct_conv": _correct_conv}}


def _work(op: str, shape: str) -> float:
    """FLOPs or bytes of one call, recomputed from the row's shape text (fp32 on a CPU: 4 bytes)."""
    if op == "attention":
        heads, d = (int(v) for v in re.search(r"H=(\d+) D=(\d+)", shape).groups())
        lens = [math.prod(int(v) for v in g.split("x")) for g in re.search(r"\[([\dx+]+)\]", shape).group(1).split("+")]
        return sum(4 * n * n * heads * d for n in lens)
    if op in ("adaln_modulate", "gated_residual_adaln"):
        n, d = (int(v) for v in re.search(r"N=(\d+) D=(\d+)", shape).groups())
        return (2 if op == "adaln_modulate" else 4) * n * d * 4
    t, h, w = (int(v) for v in re.search(r"THW=(\d+)x(\d+)x(\d+)", shape).groups())
    if op == "conv3d":
        cin, cout = (int(v) for v in re.search(r"(\d+)->(\d+)", shape).groups())
        return 2 * cin * cout * 27 * t * h * w
    c = int(re.search(r"C=(\d+)", shape).group(1))
    return 2 * c * t * h * w * 4


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_bench(quick=True, device="cpu", out=str(out), extra_providers=EXTRA, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return result, out


def test_outputs_exist_and_agree(quick_run):
    result, out = quick_run
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))       # what was returned is what was written
    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and tuple(table[0]) == COLUMNS
    for r, c in zip(rows, table):
        assert json.loads(c["versions"]) == r["versions"]
        for k in ("kernel", "case", "provider", "status", "unit", "shape", "dtype", "device", "note"):
            assert c[k] == str(r[k])
        for k in ("ms", "throughput", "max_error"):
            assert (c[k] == "") if r[k] is None else float(c[k]) == r[k]
    # Every op ran every case with every provider of its suite (plus the injected ones), one row each.
    for op in OPS:
        cases = {r["case"] for r in rows if r["kernel"] == op}
        provs = [*SUITES[op].providers, *EXTRA.get(op, {})]
        assert len(cases) >= 2 and len([r for r in rows if r["kernel"] == op]) == len(cases) * len(provs)
        png = out / f"bench_{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timed_rows_carry_roofline_numbers(quick_run):
    result, out = quick_run
    rows = result["rows"]
    timed = [r for r in rows if r["status"] == "ok"]
    # On a CPU: sora_fast's torch backend and eager torch run for every op, SDPA for attention.
    for op in OPS:
        assert {"sora_fast_torch", "eager"} <= {r["provider"] for r in timed if r["kernel"] == op}
    assert any(r["provider"] == "sdpa" for r in timed)
    for r in timed:
        assert r["ms"] > 0 and r["ms_min"] <= r["ms"] and r["rounds"] >= 3 and r["timer"] == "pytest-benchmark"
        scale = 1e12 if r["unit"] == "TFLOP/s" else 1e9
        assert r["unit"] == ("TFLOP/s" if r["kernel"] in ("attention", "conv3d") else "GB/s")
        assert math.isclose(r["throughput"], _work(r["kernel"], r["shape"]) / (r["ms"] * 1e-3) / scale, rel_tol=1e-9)
        assert r["pct_of_floor"] is None and "no floor on a CPU" in r["note"]
        assert r["max_error"] <= r["tolerance"]
        eager = next(e for e in rows if (e["kernel"], e["case"], e["provider"]) == (r["kernel"], r["case"], "eager"))
        assert math.isclose(r["vs_eager"], eager["ms"] / r["ms"], rel_tol=1e-9)
        assert r["device"].startswith("cpu") and r["dtype"] == "float32" and "torch" in r["versions"]
    # pytest-benchmark timed exactly the rows that passed, and the row's ms is the median of its rounds.
    raw = json.loads((out / "pytest_benchmark.json").read_text())["benchmarks"]
    data = {}
    for b in raw:
        data.setdefault(b["extra_info"]["key"], []).extend(b["stats"]["data"])
    assert set(data) == {f"{r['kernel']}/{r['case']}/{r['provider']}" for r in timed}
    for r in timed:
        d = data[f"{r['kernel']}/{r['case']}/{r['provider']}"]
        assert math.isclose(r["ms"], 1e3 * statistics.median(d)) and r["rounds"] == len(d)
    meta = result["meta"]
    assert meta["telemetry"] == {"available": False, "reason": "a CPU run: NVML reads NVIDIA GPUs"}
    assert meta["versions"]["torch"] == torch.__version__ and "pytest-benchmark" in meta["timer"]


def test_skipped_providers_say_why(quick_run):
    rows = quick_run[0]["rows"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all(r["ms"] is None and r["throughput"] is None and len(r["note"]) > 10 for r in skipped)
    why = {(r["kernel"], r["provider"]): r["note"] for r in skipped}
    assert "Triton interpreter" in why[("attention", "sora_fast_triton")]
    assert "host emulation" in why[("adaln_modulate", "sora_fast_cuda")]
    assert "--quick leaves out torch.compile" in why[("conv3d", "torch_compile")]
    assert "CUDA GPU" in why[("attention", "flash_attn")] and "CUDA GPU" in why[("conv3d", "cudnn")]
    assert why[("group_norm_silu", "unavailable")] == "needs a library that is not installed here"


def test_correctness_gate_blocks_wrong_providers(quick_run):
    rows = quick_run[0]["rows"]
    by = {}
    for r in rows:
        by.setdefault((r["kernel"], r["provider"]), []).append(r)
    for key in (("attention", "slightly_wrong"), ("adaln_modulate", "shifted_rows")):
        for r in by[key]:
            assert r["status"] == "failed" and "correctness check failed" in r["note"]
            assert r["max_error"] > r["tolerance"]
            assert r["ms"] is None and r["throughput"] is None and r["rounds"] is None and r["vs_eager"] is None
    # 0.1% of the largest attention output is the error: the gate is tighter than that.
    for r in by[("attention", "slightly_wrong")]:
        assert r["tolerance"] < 1e-3 * 0.5
    for r in by[("group_norm_silu", "raises")]:
        assert r["status"] == "failed" and r["ms"] is None and "too many resources" in r["note"]
    for r in by[("conv3d", "correct_conv")]:   # a correct injected provider passes and is timed
        assert r["status"] == "ok" and r["ms"] > 0


@pytest.mark.parametrize("argv, expected", [
    (["--op", "attention", "nope"], "--op must be one of attention, adaln_modulate, gated_residual_adaln, "
                                    "group_norm_silu, channel_rms_norm_silu, conv3d, adaln, vae_norm; got 'nope'"),
    (["--provider", "fa9"], "--provider must be among sora_fast_torch,"),
    (["--op", "conv3d", "--provider", "sdpa"], "sdpa applies to attention"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda; got 'tpu'"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_bad_names_are_clear_errors(argv, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())    # nothing ran


def test_bad_arguments_of_the_function():
    with pytest.raises(TypeError, match="providers must be a list of names, got the string 'eager'"):
        run_bench("conv3d", "eager", out=None)
    with pytest.raises(ValueError, match="providers must name at least one provider"):
        run_bench("conv3d", [], out=None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda needs a CUDA GPU"):
            run_bench("conv3d", device="cuda", out=None)


def test_command_in_a_fresh_process(tmp_path):
    """The console entry point on one op: exit 0, the rows on disk, the help lists every flag."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sora_fast.cli", "bench", "--quick", "--op", "channel_rms_norm_silu",
                           "--provider", "sora_fast_torch", "eager", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["provider"], r["status"]) for r in rows] == [("sora_fast_torch", "ok"), ("eager", "ok")] * 2
    assert "4 rows: 4 timed, 0 skipped, 0 failed" in proc.stdout
    help_text = subprocess.run([sys.executable, "-m", "sora_fast.cli", "bench", "--help"], capture_output=True,
                               text=True, timeout=60, env=env).stdout
    for flag in ("--quick", "--op", "--provider", "--device", "--out", "--threads", "--no-plots"):
        assert flag in help_text

