"""`sora-fast caption DATA_DIR`: sidecar captions VideoFolder reads back, captions.jsonl, kept vs --overwrite,
failures that keep the old caption and are named, exit status 0 / 1 / 2, atomic writes; with the chat captioner
against a real local server (tests/_chat_server.py) and with a fake captioner."""
import json
from pathlib import Path

import numpy as np
import pytest
from _chat_server import GOOD, ChatServer, Reply, closed_port_url

from sora_fast import cli
from sora_fast.captions import Captioner, CaptionOutcome, CaptionSchema
from sora_fast.commands import caption as caption_cmd
from sora_fast.data import VideoFolder
from sora_fast.data.io import write_video

RENDERED = CaptionSchema.from_json(GOOD).render()


def _media(path: Path, frames: int) -> Path:
    video = np.random.default_rng().integers(0, 256, (frames, 16, 24, 3), dtype=np.uint8)
    return write_video(path, video, fps=8)


@pytest.fixture
def folder(tmp_path):
    """a.mp4 (9 frames), sub/b.png, c.png with a caption, a hidden file and a stray text file."""
    d = tmp_path / "data"
    _media(d / "a.mp4", 9)
    _media(d / "sub" / "b.png", 1)
    _media(d / "c.png", 1)
    (d / "c.txt").write_text("an old caption\n")
    _media(d / ".hidden" / "h.png", 1)
    (d / "notes.md").write_text("not media")
    return d


@pytest.fixture
def srv():
    with ChatServer() as s:
        yield s


def _chat(d, srv, *extra):
    return cli.main(["caption", str(d), "--captioner", "chat", "--base-url", srv.base_url, "--model", "test-vlm",
                     "--no-progress", *extra])


def _jsonl(d) -> list:
    return [json.loads(line) for line in (d / "captions.jsonl").read_text().splitlines()]


def _temp_files(d) -> list:
    return [p for p in d.rglob("*") if ".tmp" in p.name]


def test_chat_captions_missing_files_keeps_the_rest_and_videofolder_reads_them(folder, srv, capsys):
    assert _chat(folder, srv) == 0
    out = capsys.readouterr().out
    assert "caption: 2 captioned, 1 kept" in out and "0 failed" in out and "captions.jsonl" in out
    assert len(srv.requests) == 2                                              # the hidden file is not media
    assert (folder / "a.txt").read_text() == RENDERED + "\n"
    assert (folder / "sub" / "b.txt").read_text() == RENDERED + "\n"
    assert (folder / "c.txt").read_text() == "an old caption\n"                # kept

    rows = _jsonl(folder)
    assert [r["file"] for r in rows] == ["a.mp4", "sub/b.png"]
    a = rows[0]
    assert set(a) == {"file", "captioner", "model", "frames", "seconds", "cached", "schema", "caption"}
    assert a["captioner"] == "chat" and a["model"] == "test-vlm" and a["frames"] == [0, 4, 8]
    assert a["cached"] is False and isinstance(a["seconds"], float) and a["caption"] == RENDERED
    assert CaptionSchema.from_json(a["schema"]) == CaptionSchema.from_json(GOOD)
    assert rows[1]["frames"] == [0]

    vf = VideoFolder(folder, progress=False)
    assert {p.relative_to(folder).as_posix(): c for p, c in zip(vf.paths, vf.captions)} == {
        "a.mp4": RENDERED, "c.png": "an old caption", "sub/b.png": RENDERED}
    assert not _temp_files(folder)
    assert len(list((folder / ".caption_cache").rglob("*.json"))) == 2         # the cache lives with the data

    assert _chat(folder, srv) == 0                                             # nothing left to do
    assert "0 captioned, 3 kept" in capsys.readouterr().out and len(srv.requests) == 2


def test_overwrite_recaptions_everything_from_the_cache_and_updates_jsonl_in_place(folder, srv, capsys):
    assert _chat(folder, srv) == 0
    (folder / "captions.jsonl").write_text((folder / "captions.jsonl").read_text()
                                           + '{"file": "gone.mp4", "caption": "kept as is"}\nnot json at all\n')
    capsys.readouterr()
    assert _chat(folder, srv, "--overwrite") == 0
    assert "3 captioned (2 from the cache), 0 kept" in capsys.readouterr().out
    assert len(srv.requests) == 3                                              # only c.png was sent
    assert (folder / "c.txt").read_text() == RENDERED + "\n"
    lines = (folder / "captions.jsonl").read_text().splitlines()
    assert lines[2:4] == ['{"file": "gone.mp4", "caption": "kept as is"}', "not json at all"]
    rows = [json.loads(x) for x in lines[:2] + lines[4:]]
    assert [(r["file"], r["cached"]) for r in rows] == [("a.mp4", True), ("sub/b.png", True), ("c.png", False)]
    assert not _temp_files(folder)


def test_failures_keep_the_old_caption_are_named_and_exit_1(folder, srv, capsys):
    # one request at a time so the script meets the files in order (a.mp4, c.png, sub/b.png): a.mp4 fine,
    # c.png twice unparseable, sub/b.png refused
    srv.push(Reply.caption(), Reply.text("no json here"), Reply.text("still none"), Reply.error(400, "no images"))
    assert _chat(folder, srv, "--overwrite", "--concurrency", "1", "--no-cache") == 1
    out = capsys.readouterr().out
    assert "1 captioned, 0 kept" in out and "2 failed" in out
    assert "failed c.png: the model's reply is not a valid caption, also after a repair turn" in out
    assert "failed sub/b.png: the chat server refused the request to " in out and "HTTP 400: no images" in out
    assert out.index("failed c.png") < out.index("failed sub/b.png")
    assert (folder / "c.txt").read_text() == "an old caption\n" and not (folder / "sub" / "b.txt").exists()
    assert [r["file"] for r in _jsonl(folder)] == ["a.mp4"]
    assert not (folder / ".caption_cache").exists() and not _temp_files(folder)


def test_a_server_that_is_down_fails_every_file_with_its_url(folder, capsys):
    url = closed_port_url()
    assert cli.main(["caption", str(folder), "--captioner", "chat", "--base-url", url, "--model", "m",
                     "--max-retries", "0", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert out.count(f"cannot reach the chat server at {url}") == 2 and "0 captioned, 1 kept, 2 failed" in out
    assert not (folder / "captions.jsonl").exists() and (folder / "c.txt").read_text() == "an old caption\n"


class _Fake(Captioner):
    """Schemas from the file name; a file named bad* raises."""

    name = "fake"

    def __init__(self):
        self.seen = []

    def caption_file(self, path):
        self.seen.append(path.name)
        if path.stem.startswith("bad"):
            raise RuntimeError("the fake captioner cannot read this one")
        doc = json.loads(json.dumps(GOOD))
        doc["spans"][0]["subjects"][0]["colour"] = {"a": "blue", "b": "green"}.get(path.stem, "yellow")
        return CaptionOutcome(path, CaptionSchema.from_json(doc), [0], 0.01)


def test_an_injected_captioner_writes_sidecars_and_its_failures_exit_1(folder, monkeypatch, capsys):
    fake = _Fake()
    monkeypatch.setitem(caption_cmd.CAPTIONERS, "fake", lambda args: fake)
    _media(folder / "bad.png", 1)
    (folder / "empty.txt").write_text("  \n")                                  # an empty caption is missing
    _media(folder / "empty.png", 1)
    assert cli.main(["caption", str(folder), "--captioner", "fake", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "3 captioned, 1 kept, 1 failed" in out
    assert "failed bad.png: RuntimeError: the fake captioner cannot read this one" in out
    assert fake.seen == ["a.mp4", "bad.png", "empty.png", "b.png"]
    assert (folder / "a.txt").read_text().startswith("a blue circle")
    assert (folder / "sub" / "b.txt").read_text().startswith("a green circle")
    assert (folder / "empty.txt").read_text().startswith("a yellow circle") and not (folder / "bad.txt").exists()
    rows = _jsonl(folder)
    assert [(r["file"], r["captioner"], r["model"]) for r in rows] == [
        ("a.mp4", "fake", None), ("empty.png", "fake", None), ("sub/b.png", "fake", None)]


def test_files_sharing_a_sidecar_are_failed_not_guessed(tmp_path, monkeypatch, capsys):
    d = tmp_path / "d"
    _media(d / "x.mp4", 5)
    _media(d / "x.png", 1)
    monkeypatch.setitem(caption_cmd.CAPTIONERS, "fake", lambda args: _Fake())
    assert cli.main(["caption", str(d), "--captioner", "fake", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "failed x.png: shares its caption file x.txt with x.mp4" in out and "1 captioned" in out


@pytest.mark.parametrize("argv, match", [
    (["--captioner", "chat"], "--captioner chat needs --base-url and --model"),
    (["--captioner", "chat", "--base-url", "http://127.0.0.1:9/v1"], "needs --model"),
    (["--captioner", "chat", "--base-url", "127.0.0.1:9", "--model", "m"], "base_url must be an http"),
    (["--captioner", "chat", "--base-url", "http://x/v1", "--model", "m", "--every-n", "0"],
     "--every-n must be >= 1, got 0"),
    (["--captioner", "chat", "--base-url", "http://x/v1", "--model", "m", "--max-side", "4"],
     "--max-side must be >= 16, got 4"),
    (["--captioner", "pixel", "--max-side", "64", "--no-cache"],
     "--max-side, --no-cache apply to --captioner chat only"),
])
def test_bad_flags_exit_2_with_a_clear_message(folder, argv, match, capsys):
    assert cli.main(["caption", str(folder), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    assert not (folder / "a.txt").exists()


def test_data_dir_must_be_a_folder_with_media_and_modes_exclude_each_other(tmp_path, folder, capsys):
    base = ["--captioner", "chat", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    assert cli.main(["caption", str(tmp_path / "nope"), *base]) == 2
    assert "DATA_DIR must be a folder of videos and images" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert cli.main(["caption", str(tmp_path / "empty"), *base]) == 2
    assert "holds no video or image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["caption", str(folder), *base, "--only-missing", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
