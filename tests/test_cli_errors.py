"""The sora-fast CLI keeps what a user saved and fails early and clearly: existing run directories,
--overwrite, SIGTERM, broken run files, non-finite arguments, output names, oversized requests."""
import json
import signal

import pytest
import torch

from sora_fast import cli
from sora_fast.data import make_synthetic_dataset
from sora_fast.pipeline import VideoPipeline
from sora_fast.training.checkpoint import latest_checkpoint, list_checkpoints


def _run_file(tmp_path, pipe_path, **train):
    data = tmp_path / "data"
    if not data.exists():
        make_synthetic_dataset(data, 4, seed=1, sizes=((16, 16),), lengths=(1, 5), progress=False)
    cfg = {"data": str(data), "out": str(tmp_path / "run"), "pipeline": str(pipe_path),
           "train": {"steps": 2, "token_budget": 64, "save_every": 1, "log_every": 1, "lr": 1e-3, **train}}
    f = tmp_path / "run.json"
    f.write_text(json.dumps(cfg))
    return f


def _steps(run):
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# --- item 1: an existing run is never silently replaced ---------------------------------------------------
def test_train_refuses_an_existing_run_unless_resume_or_overwrite(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    f, run = _run_file(tmp_path, path), tmp_path / "run"
    assert cli.main(["train", "--config", str(f)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    pipe_bytes = (run / "pipeline" / "dit.safetensors").read_bytes()
    capsys.readouterr()

    assert cli.main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err, err
    assert "metrics.jsonl" in err and "pipeline" in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before       # nothing was touched
    assert (run / "pipeline" / "dit.safetensors").read_bytes() == pipe_bytes and _steps(run) == [1, 2]

    assert cli.main(["train", "--config", str(f), "--resume", "--overwrite"]) == 2
    assert "at most one of --resume" in capsys.readouterr().err

    # --overwrite deletes the earlier run: a fresh metrics log, fresh checkpoints
    (run / "step_000007").mkdir()                                                # a stray old checkpoint dir
    assert cli.main(["train", "--config", str(f), "--overwrite", "--steps", "1"]) == 0
    assert "--overwrite: deleted the earlier run" in capsys.readouterr().err
    assert _steps(run) == [1]
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"] and not (run / "step_000007").exists()
    assert (run / "latents" / "index.json").is_file()                             # the cache is kept


def test_train_into_an_empty_or_cache_only_directory_needs_no_flag(tiny_pipeline, tmp_path):
    _, path = tiny_pipeline
    f = _run_file(tmp_path, path, steps=1)
    (tmp_path / "run").mkdir()
    assert cli.main(["train", "--config", str(f)]) == 0


# --- item 6: SIGTERM through the CLI -----------------------------------------------------------------------
def test_train_sigterm_writes_a_checkpoint_and_exits_143(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import os

    from sora_fast.training.trainer import Trainer

    _, path = tiny_pipeline
    f = _run_file(tmp_path, path, steps=5, save_every=100)
    real = Trainer.train_step

    def step_then_sigterm(self, step):
        m = real(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return m
    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train", "--config", str(f)]) == 143
    assert "interrupted at step 2" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    assert signal.getsignal(signal.SIGTERM) is before


# --- item 7: broken files are one line naming the file, exit status 2 ---------------------------------------
@pytest.mark.parametrize("content, match", [
    (b'{"data": "d", "out": ', r"run.json' is not valid JSON: Expecting value \(line 1, column 22\)"),
    (b"", r"run.json' is not valid JSON"),
    (b"\xff\xfe{}", r"run.json' is not UTF-8 text \(byte 0\)"),
    (b"[1, 2]", r"run.json' must hold a JSON object / TOML table of settings, got list"),
    (b'{"data": 3, "out": "o", "pipeline": "p"}', r"run.json: 'data' must be a string, got int 3"),
    (b'{"data": "d", "out": "o", "pipeline": "p", "train": {"lr": "fast"}}',
     r"run.json \[train\]: 'lr' must be a number, got str 'fast'"),
    (b'{"data": "d", "out": "o", "pipeline": "p", "train": {"grad_clip": -1}}',
     r"TrainConfig.grad_clip must be >= 0"),
    (b'{"data": "d", "out": "o", "pipeline": "p", "train": {"grad_clip": NaN}}',
     r"TrainConfig.grad_clip must be a finite number, got nan"),
])
def test_broken_run_file_is_one_line_naming_it(tmp_path, capsys, content, match):
    import re

    f = tmp_path / "run.json"
    f.write_bytes(content)
    assert cli.main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sora-fast train: error: ") and "Traceback" not in err, err
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_which_errors_are_user_errors():
    from sora_fast.ops._dispatch import BackendUnavailableError

    assert cli.is_user_error(BackendUnavailableError("no triton"))
    assert cli.is_user_error(IsADirectoryError("x")) and cli.is_user_error(json.JSONDecodeError("m", "", 0))
    assert cli.is_user_error(torch.cuda.OutOfMemoryError("oom"))
    assert not cli.is_user_error(KeyError("x")) and not cli.is_user_error(AssertionError())


def test_project_error_exits_2_without_traceback(tiny_pipeline, tmp_path, monkeypatch, capsys):
    from sora_fast.ops._dispatch import BackendUnavailableError

    _, path = tiny_pipeline

    def fail(*a, **k):
        raise BackendUnavailableError("backend 'triton' is not available here")
    monkeypatch.setattr(VideoPipeline, "generate", fail)
    assert cli.main(["generate", "--pipeline", str(path), "--prompt", "x", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.startswith("sora-fast generate: error: backend 'triton' is not available")


# --- items 4 and 8: arguments checked before any work --------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--guidance", "nan"], r"--guidance must be a finite number, got nan"),
    (["--guidance", "inf"], r"--guidance must be a finite number, got inf"),
    (["--guidance=-inf"], r"--guidance must be a finite number, got -inf"),
    (["--shift", "inf"], r"--shift must be a positive finite number, got inf"),
    (["--shift", "nan"], r"--shift must be a positive finite number, got nan"),
    (["--shift", "0"], r"--shift must be a positive finite number, got 0.0"),
    (["--fps", "0"], r"--fps must be a positive finite number, got 0.0"),
    (["--fps=-8"], r"--fps must be a positive finite number, got -8.0"),
    (["--fps", "nan"], r"--fps must be a positive finite number, got nan"),
    (["--steps", "0"], r"--steps must be >= 1, got 0"),
    (["--size", "5x16x16", "--size", "5x16x16"], r"--size given 2 times; give it once or once per --prompt \(1\)"),
])
def test_generate_arguments_are_checked_before_anything_loads(tmp_path, capsys, args, match):
    import re

    # the pipeline does not exist and the output is not created: the argument is the first thing checked
    rc = cli.main(["generate", "--pipeline", str(tmp_path / "missing"), "--prompt", "a", "--out",
                   str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_generate_api_refuses_non_finite_arguments_before_work(tiny_pipeline):
    pipe, _ = tiny_pipeline
    calls = []
    pipe.text_encoder.encode = lambda *a, **k: calls.append(1)
    for kw, match in [(dict(guidance=float("nan")), "guidance must be a finite number, got nan"),
                      (dict(guidance=float("inf")), "guidance must be a finite number, got inf"),
                      (dict(shift=float("inf")), r"shift\[0\] must be a positive number, finite, got inf"),
                      (dict(steps=0), "steps must be a positive int, got 0")]:
        with pytest.raises(ValueError, match=match):
            pipe.generate(["a"], (1, 16, 16), **kw)
    assert not calls


def test_generate_refuses_nan_weights_instead_of_a_grey_video(tiny_pipeline, tmp_path, capsys):
    pipe, _ = tiny_pipeline
    with torch.no_grad():
        next(pipe.dit.parameters()).fill_(float("nan"))
    path = pipe.save(tmp_path / "nan_pipe")
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "x", "--size", "1x16x16", "--steps", "1",
                   "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert rc == 2 and "the latents after 1 denoising steps are not finite -- video 0:" in err, err
    assert not list((tmp_path / "g").glob("00_*"))


def test_output_names_are_bounded_in_bytes_and_unique():
    zh = "一只红色的狐狸在雪地里奔跑" * 8                                             # 104 characters, 312 bytes
    stems = cli.output_stems([zh, zh, "a red circle", "!!!", "é" * 200])
    assert all(len(s.encode("utf-8")) <= cli.MAX_NAME_BYTES for s in stems)
    assert len(set(stems)) == len(stems)
    assert stems[0].startswith("00_一只红色的狐狸") and stems[2] == "02_a_red_circle" and stems[3] == "03"
    for s in stems:
        s.encode("utf-8").decode("utf-8")                                           # whole characters only
    assert len(stems[0].encode("utf-8")) > cli.MAX_NAME_BYTES - 3                    # cut at the bound


def test_generate_with_a_96_character_chinese_prompt(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    prompt = ("一只红色的狐狸在雪地里奔跑" * 8)[:96]
    out = tmp_path / "g"
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", prompt, "--prompt", prompt, "--size",
                   "1x16x16", "--steps", "1", "--format", "gif", "gif", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir() if p.name not in ("contact_sheet.png", "generate.json"))
    assert len(names) == 2 and names[0].startswith("00_一只") and names[1].startswith("01_一只")
    assert all(len(n.encode("utf-8")) <= cli.MAX_NAME_BYTES + len(".gif") for n in names)


def test_huge_size_is_refused_with_the_estimate_and_the_limit(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "x", "--size", "10001x10000x10000",
                   "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert rc == 2 and "10001x10000x10000: generating needs at least" in err and "but it has" in err, err
    assert "GiB" in err and "Traceback" not in err


def test_more_bad_arguments_are_one_line(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    assert cli.main(["profile", "--guidance", "nan", "--steps", "1"]) == 2
    assert "--guidance must be a finite number, got nan" in capsys.readouterr().err
    f = _run_file(tmp_path, path)
    assert cli.main(["train", "--config", str(f), "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_truncated_weights_exit_2_without_traceback(tiny_pipeline, tmp_path, capsys):
    """A truncated or empty .safetensors file: one line, status 2 (the parser's error is a user error)."""
    _, path = tiny_pipeline
    for content in (b"", (path / "dit.safetensors").read_bytes()[:100]):
        (path / "dit.safetensors").write_bytes(content)
        rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "x", "--out", str(tmp_path / "g")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("sora-fast generate: error: ") and "Traceback" not in err, err


def test_contact_sheet_with_a_latin1_only_font_keeps_a_chinese_caption(tmp_path, monkeypatch):
    """Pillow without FreeType has a Latin-1 bitmap font: a Chinese caption must not fail the sheet (it
    is written escaped) after all the denoising."""
    from PIL import ImageFont

    from sora_fast.data import write_contact_sheet

    monkeypatch.setattr(ImageFont, "load_default", lambda *a, **k: ImageFont.load_default_imagefont())
    p = write_contact_sheet(tmp_path / "sheet.png", [torch.zeros(3, 1, 16, 16)], ["一只红色的狐狸 fox"])
    assert p.stat().st_size > 0
