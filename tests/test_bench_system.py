"""The system benchmark (``bench/bench_system.py --quick``) runs in-process, every row passes its
correctness check, and the JSON/CSV hold the eight sections with positive finite ratios."""
import csv
import json
import math

import torch

from bench import bench_system as bench

SECTIONS = ("packed", "diffusers", "mixed", "train", "cfg", "vae", "sdpa", "gelu")


def test_bench_system_quick(tmp_path, capsys):
    js, cs = tmp_path / "system.json", tmp_path / "system.csv"
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--threads", "1", "--json", str(js), "--csv", str(cs)]) == 0
    assert torch.get_num_threads() == threads  # restored for the rest of the session
    out = capsys.readouterr().out
    assert "0 failed correctness checks" in out
    result = json.loads(js.read_text())
    assert set(SECTIONS) <= set(result)
    meta = result["meta"]
    assert meta["dtype"] == "float32" and meta["cpu_threads"] == 1 and "torch" in meta
    rows = [r for s in SECTIONS for r in result[s]]
    for s in SECTIONS:
        assert result[s], f"section {s} is empty"
    for r in rows:
        assert r["passed"] is True, r
        assert r["max_rel_err_out"] <= bench.REL_TOL, r
        for key in ("ratio", "mem_ratio"):
            if key in r or key == "ratio":
                assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert result["packed"][0]["tokens_padded"] > result["packed"][0]["tokens_real"]
    assert len(result["diffusers"]) == 2 and len(result["vae"]) >= 2
    mixed, train = result["mixed"], result["train"]
    assert [r["diffusers_forwards"] for r in mixed] == [2, 2]     # one diffusers forward per size
    assert [r["diffusers_forwards"] for r in train] == [1, 2, 2]  # same-size batch, then the mixed ones
    assert all(r["max_rel_err_grad"] <= bench.REL_TOL and r["max_rel_err_loss"] <= bench.REL_TOL for r in train)
    sdpa = result["sdpa"]
    assert [r["case"].split(",")[0] for r in sdpa] == ["forward", "forward+backward"] * 2
    assert {r["eager_choice"] for r in sdpa} == {"fused"}   # one thread: the eager path keeps torch's fused SDPA
    gelu = result["gelu"]
    assert [r["case"].split(",")[0] for r in gelu] == ["forward", "forward+backward"]
    assert all(r["max_abs_err_ours"] <= 2 * r["max_abs_err_torch"] + 1e-6 for r in gelu)
    with cs.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_only_rejects_unknown_sections(capsys):
    try:
        bench.main(["--quick", "--only", "packed,video"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--only video should be rejected")
    assert "--only takes sections from" in capsys.readouterr().err
