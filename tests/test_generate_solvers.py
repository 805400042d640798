"""``generate`` / ``generate_long`` / ``sora-fast generate`` / ``profile`` / ``calibrate-cache`` with solvers and
caches: the same sampler as ``sample``, evaluation counts reported, bad names refused before any work."""
import pytest
import torch

from sora_fast.cli import main

KW = dict(steps=3, guidance=2.0, seed=3)


def test_generate_uses_the_solver_and_reports_evaluations(tiny_pipeline, monkeypatch):
    pipe, _ = tiny_pipeline
    import sora_fast.pipeline as pl
    seen, real = [], pl.sample

    def spy(*a, **kw):
        seen.append({k: kw[k] for k in ("solver", "order", "cache")})
        return real(*a, **kw)

    monkeypatch.setattr(pl, "sample", spy)
    euler = pipe.generate(["a red circle", "a blue square"], [(5, 16, 16), (1, 16, 32)], **KW)
    assert pipe.last_timings["evaluations"] == [6, 6]
    uni = pipe.generate(["a red circle", "a blue square"], [(5, 16, 16), (1, 16, 32)], solver="unipc", order=3,
                        cache="first-block:0", **KW)
    assert seen == [dict(solver="euler", order=None, cache=None), dict(solver="unipc", order=3, cache="first-block:0")]
    assert pipe.last_timings["evaluations"] == [6, 6]
    assert all(e.shape == u.shape and not torch.equal(e, u) for e, u in zip(euler, uni))
    pipe.generate_long("a red circle", 13, window=9, overlap=1, size=(16, 16), solver="dpm++", cache="teacache:0",
                       **KW)
    assert pipe.last_timings["evaluations"] == 2 * 6             # two windows, 3 steps x 2 CFG halves


@pytest.mark.parametrize("kw, err, match", [
    (dict(solver="ddim"), ValueError, r"solver must be one of 'euler', 'unipc', 'dpm\+\+', got 'ddim'"),
    (dict(solver="dpm++", order=3), ValueError, r"order must be in 1..2 for solver 'dpm\+\+', got 3"),
    (dict(cache="first-block"), ValueError, r"cache must be 'first-block:THRESH'"),
    (dict(cache="first-block:0.05", denoiser=lambda x, t, c: x.tokens), TypeError, r"needs denoise to be a sora_fast"),
])
def test_generate_refuses_bad_solver_arguments_before_work(tiny_pipeline, monkeypatch, kw, err, match):
    pipe, _ = tiny_pipeline
    calls = []
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda *a, **k: calls.append(1))
    with pytest.raises(err, match=match):
        pipe.generate(["a red circle"], (5, 16, 16), **kw)
    assert not calls
    with pytest.raises(err, match=match):
        pipe.generate_long("a red circle", 13, window=9, overlap=1, size=(16, 16), **kw)


def test_cli_generate_with_solver_and_cache(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    rc = main(["generate", "--pipeline", str(path), "--prompt", "a red circle", "--size", "5x16x16", "--steps", "3",
               "--solver", "unipc", "--order", "2", "--cache", "first-block:0.05", "--out", str(tmp_path / "o"),
               "--format", "gif"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 unipc steps" in out and "DiT evaluations per video [" in out
    import json
    meta = json.loads((tmp_path / "o" / "generate.json").read_text())   # the output's metadata
    assert meta["solver"] == "unipc" and meta["order"] == 2 and meta["cache"] == "first-block:0.05"
    assert meta["prompts"] == ["a red circle"] and meta["sizes"] == [[5, 16, 16]] and meta["files"][0].endswith(".gif")
    evals = meta["evaluations"]
    assert len(evals) == 1 and 0 < evals[0] <= 2 * 3 and f"DiT evaluations per video {evals}" in out


@pytest.mark.parametrize("flags, match", [
    (["--solver", "unipc", "--order", "4"], r"--order/--solver: order must be in 1..3 for solver 'unipc', got 4"),
    (["--cache", "teacache"], r"--cache: cache must be 'first-block:THRESH'"),
    (["--cache", "first-block:0.1", "--cfg-parallel"], r"--cache runs the DiT block by block"),
])
def test_cli_refuses_bad_flags_before_loading(tmp_path, capsys, flags, match):
    rc = main(["generate", "--pipeline", str(tmp_path / "missing"), "--prompt", "x", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    import re
    assert re.search(match, err), err


def test_cli_solver_choices(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--pipeline", "p", "--prompt", "x", "--solver", "heun"])
    assert "invalid choice: 'heun'" in capsys.readouterr().err


def test_calibrate_cache_command_and_profile(tiny_pipeline, capsys):
    _, path = tiny_pipeline
    rc = main(["calibrate-cache", "--pipeline", str(path), "--prompts", "2", "--size", "5x16x16", "--steps", "4",
               "--degree", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "use: --cache teacache:0.1:" in out
    spec = out.strip().splitlines()[-1].split("--cache ")[1]
    from sora_fast.sampling import TeaCache, parse_cache
    assert isinstance(parse_cache(spec), TeaCache) and len(parse_cache(spec).coefficients) == 3
    rc = main(["profile", "--pipeline", str(path), "--size", "5x16x16", "--steps", "2", "--warmup", "0",
               "--solver", "dpm++", "--cache", spec, "--top", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 steps (dpm++)" in out and "DiT evaluations per prompt [4]" in out
