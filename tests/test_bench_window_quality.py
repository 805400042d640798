"""``bench/_window_quality.py`` on a tiny random pipeline: the dense row first, a window covering the grid
scores as dense, a small one changes the clips, the kept fraction of pairs counted exactly; bad input; the CLI."""
import itertools
import json
import math

import pytest
import torch

from bench import _window_quality as wq

SIZES = [(9, 32, 48), (5, 32, 32)]            # tiny VAE (4x, 8x), patch (1, 2, 2): grids (3, 2, 3), (2, 2, 2)


def _count(grid, window):
    cells = list(itertools.product(*(range(n) for n in grid)))
    return sum(all(abs(a - b) <= w for a, b, w in zip(p, q, window)) for p in cells for q in cells)


@pytest.mark.parametrize("window", [(0, 0, 0), (1, 0, 1), (0, 1, 2), (5, 5, 5)])
def test_pairs_kept_counts_pairs(window):
    grids = [(3, 2, 3), (2, 2, 2), (1, 4, 1)]
    expect = sum(_count(g, window) for g in grids) / sum(math.prod(g) ** 2 for g in grids)
    assert wq.pairs_kept(grids, window) == pytest.approx(expect)
    assert wq.pairs_kept(grids, None) == 1.0


def test_demo_windows_keep_about_half_and_a_quarter():
    demo = [(5, 4, 4), (5, 4, 6), (5, 6, 4)]                # the demo's three generation grids
    half, quarter = (wq.pairs_kept(demo, w) for w in wq.DEFAULT_WINDOWS)
    assert 0.4 < half < 0.55 and 0.2 < quarter < 0.3


def test_rows(tiny_pipeline):
    pipe, _ = tiny_pipeline
    with torch.no_grad():   # random std-0.05 weights leave self-attention a small share of the output: make it
        for block in pipe.dit.blocks:                   # count, so a window's change is far above rounding
            block.attn1.to_out.weight.mul_(20)
    lines = []
    rows = wq.window_quality(pipe, [(2, 1, 2), (0, 0, 0)], prompts=2, seed=3, sizes=SIZES, steps=2, log=lines.append)
    dense, full, small = rows
    assert [r["label"] for r in rows] == ["dense", "2,1,2", "0,0,0"] and len(lines) == 3
    assert dense["window"] is None and dense["psnr_vs_dense"] == math.inf and dense["pairs_kept"] == 1.0
    assert full["pairs_kept"] == 1.0 and full["psnr_vs_dense"] > 80          # covers both grids: dense up to rounding
    assert small["pairs_kept"] == pytest.approx((18 + 8) / (18**2 + 8**2)) and small["psnr_vs_dense"] < 60
    assert all(r["clips"] == 2 and 0 <= r["pass_rate"] <= 1 and r["denoise_s"] > 0 for r in rows)
    table = wq.report(rows).splitlines()
    assert table[0].split()[:3] == ["window", "pairs", "kept"] and len(table) == 5 and "inf" in table[1]


@pytest.mark.parametrize("windows,exc,match", [
    ([(1, 2)], ValueError, r"windows\[0\] must be None or \(wt, wh, ww\)"),
    ([(1, 1, 1), "1,2,3"], TypeError, r"windows\[1\] must be"),
    ([None], ValueError, "the dense run is always the first row"),
    ("1,1,1", TypeError, "windows must be a list"),
])
def test_bad_windows(tiny_pipeline, windows, exc, match):
    with pytest.raises(exc, match=match):
        wq.window_quality(tiny_pipeline[0], windows, prompts=1)


def test_cli(tiny_pipeline, tmp_path, capsys, monkeypatch):
    _, path = tiny_pipeline
    monkeypatch.setattr(wq, "window_quality",
                        lambda *a, _f=wq.window_quality, **k: _f(*a, **k, sizes=SIZES[1:], steps=1))
    out = tmp_path / "rows.json"
    assert wq.main(["--pipeline", str(path), "--windows", "1,0,1", "0,0,0", "--prompts", "1", "--threads", "1",
                    "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 held-out prompts, seed 100" in text and "1,0,1" in text and "0,0,0" in text
    assert [r["window"] for r in json.loads(out.read_text())["rows"]] == [None, [1, 0, 1], [0, 0, 0]]
    with pytest.raises(SystemExit):
        wq.main(["--pipeline", str(path), "--windows", "1,1"])
    assert "an attention window is WT,WH,WW" in capsys.readouterr().err
