"""Nothing the data layer reads is stale, silent or outside the data folder: the latent cache is keyed on the
data (files, captions, settings) and the VAE, skipped files are named with their reasons, and files outside
the data root, FIFOs and devices are skipped by name (never opened)."""
import contextlib
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from sora_fast import cli
from sora_fast.data import (
    ClipSpec,
    LatentDataset,
    VideoFolder,
    cache_latents,
    ensure_latent_cache,
    make_synthetic_dataset,
    module_key,
    render_clip,
    write_skip_report,
    write_video,
)
from sora_fast.models.dit import VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.models.vae import CausalVAE
from sora_fast.pipeline import VideoPipeline


def _avgpool(video: torch.Tensor) -> torch.Tensor:
    """Stand-in encoder: (3, T, H, W) -> (3, T, H/4, W/4)."""
    return F.avg_pool3d(video[None], (1, 4, 4))[0]


def _clip(path, color="red", frames=5, h=16, w=16):
    spec = ClipSpec(shape="square", color=color, height=h, width=w, frames=frames, size=6, start=(8.0, 8.0),
                    direction="right", speed="slow")
    write_video(path, render_clip(spec))
    path.with_suffix(".txt").write_text(f"a {color} square")
    return path


@contextlib.contextmanager
def _deadline(seconds=30):
    """Fail instead of hanging when something opens a FIFO."""
    def fail(*_):
        raise TimeoutError(f"blocked for {seconds}s: a FIFO was opened")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------
# the latent cache is keyed on the data and the encoder


def test_latent_cache_is_rebuilt_when_the_data_settings_or_vae_change(tmp_path, fresh_seed, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_synthetic_dataset(data, 3, seed=fresh_seed, sizes=((16, 16),), lengths=(1, 5), progress=False)

    def ensure(encoder="vae-a", **kw):
        return ensure_latent_cache(VideoFolder(data, progress=False, **kw), _avgpool, cache, encoder_key=encoder,
                                   progress=False)[1]

    assert "no cache yet" in ensure()
    shards = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert ensure() is None  # unchanged folder: reused, nothing written
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == shards
    capsys.readouterr()

    # a changed data file: new content under the same name
    target = sorted(p for p in data.iterdir() if p.suffix in (".png", ".mp4"))[0]
    write_video(target, render_clip(ClipSpec(shape="circle", color="blue", height=16, width=16,
                                             frames=5 if target.suffix == ".mp4" else 1, size=6, start=(8.0, 8.0),
                                             direction="left", speed="slow")))
    os.utime(target, ns=(1, 1))  # whatever the clock's resolution, the mtime differs
    reason = ensure()
    assert f"1 data file(s) changed (size or mtime): {target.name}" in reason
    assert f"re-encoding it: {reason}" in capsys.readouterr().err  # said on stderr
    ds = VideoFolder(data, progress=False)
    i = ds.paths.index(target)
    torch.testing.assert_close(LatentDataset(cache)[i]["latent"], _avgpool(ds.load(i)["video"]), atol=0, rtol=0)
    assert ensure() is None

    _clip(data / "zz_added.mp4")  # an added file
    assert "1 data file(s) added: zz_added.mp4" in ensure()
    assert len(LatentDataset(cache)) == 4
    (data / "zz_added.txt").write_text("another caption")  # a changed caption
    assert "the captions differ" in ensure()
    assert LatentDataset(cache).captions[-1] == "another caption"
    assert "max_frames None -> 1" in ensure(max_frames=1)  # changed settings
    assert "size_multiple 1 -> 8" in ensure(max_frames=1, size_multiple=8)
    assert ensure(max_frames=1, size_multiple=8) is None
    assert "the encoder (VAE config or weights) differs" in ensure("vae-b", max_frames=1, size_multiple=8)
    (data / "zz_added.mp4").unlink()
    assert "1 data file(s) removed: zz_added.mp4" in ensure("vae-b", max_frames=1, size_multiple=8)

    # a cache written without a key (older versions) is not trusted
    cache_latents(VideoFolder(data, progress=False), _avgpool, cache, overwrite=True, progress=False)
    assert "written without a key" in ensure()


def test_module_key_follows_weights_and_config():
    a, b = CausalVAE("tiny"), CausalVAE("tiny")
    b.load_state_dict(a.state_dict())
    assert module_key(a) == module_key(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert module_key(a) != module_key(b)
    assert module_key(a) != module_key(a, config={"other": 1})


def test_manifest_change_rebuilds_the_cache(tmp_path, fresh_seed):
    clips = make_synthetic_dataset(tmp_path, 3, seed=fresh_seed, sizes=((16, 16),), lengths=(1,), progress=False)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"path": c.path.name, "caption": "x"}) + "\n" for c in clips))
    ensure_latent_cache(VideoFolder(tmp_path, manifest=manifest, progress=False), _avgpool, tmp_path / "c",
                        encoder_key="k", progress=False)
    manifest.write_text("".join(json.dumps({"path": c.path.name, "caption": "y"}) + "\n" for c in clips))
    _, reason = ensure_latent_cache(VideoFolder(tmp_path, manifest=manifest, progress=False), _avgpool,
                                    tmp_path / "c", encoder_key="k", progress=False)
    assert reason == "the manifest differs"
    assert LatentDataset(tmp_path / "c").captions == ["y"] * 3


# ----------------------------------------------------------------------------------------------
# skipped files are named


def test_skipped_files_are_named_with_reasons(tmp_path, fresh_seed):
    make_synthetic_dataset(tmp_path, 2, seed=fresh_seed, sizes=((16, 16),), lengths=(1,), progress=False)
    (tmp_path / "broken.mp4").write_text("not a video")
    _clip(tmp_path / "latin1.mp4").with_suffix(".txt").write_bytes("une vid\xe9o".encode("latin-1"))
    ds = VideoFolder(tmp_path, progress=False)
    assert len(ds) == 2  # never an empty caption for the latin-1 one
    reasons = {os.path.basename(s.path): s.reason for s in ds.skipped}
    assert set(reasons) == {"broken.mp4", "latin1.mp4"}
    assert reasons["latin1.mp4"].startswith("caption is not valid UTF-8: 'latin1.txt'")
    assert "1 caption is not valid UTF-8" in ds.summary()

    line = write_skip_report(ds.skipped, tmp_path / "skipped.jsonl", first=1)
    rows = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in rows] == [tuple(s) for s in ds.skipped]
    assert line.startswith("skipped 2 file(s) (1 caption is not valid UTF-8, 1 unreadable): ")
    assert f"{ds.skipped[0].path} ({ds.skipped[0].reason}); and 1 more" in line
    assert str(tmp_path / "skipped.jsonl") in line
    assert write_skip_report([], tmp_path / "none.jsonl").startswith("skipped 0 files")
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_manifest_line_that_is_not_utf8_is_a_named_skip(tmp_path):
    _clip(tmp_path / "a.mp4")
    (tmp_path / "m.jsonl").write_bytes(b'{"path": "a.mp4"}\n{"path": "b\xff.mp4"}\n')
    ds = VideoFolder(tmp_path, manifest="m.jsonl", progress=False)
    assert len(ds) == 1 and ds.captions == ["a red square"]
    assert ds.skipped[0].path.endswith("m.jsonl:2") and "not valid UTF-8" in ds.skipped[0].reason


# ----------------------------------------------------------------------------------------------
# confinement to the data root, special files


def test_manifest_paths_outside_the_root_are_refused_unless_allowed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    _clip(root / "in.mp4")
    _clip(outside / "up.mp4", color="green")
    _clip(outside / "abs.mp4", color="blue")
    _clip(outside / "linked.mp4", color="yellow")
    (root / "link.mp4").symlink_to(outside / "linked.mp4")
    rows = [{"path": "in.mp4"}, {"path": "../outside/up.mp4"}, {"path": str(outside / "abs.mp4")},
            {"path": "link.mp4"}, {"path": str(root / "in.mp4"), "caption": "absolute but inside"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    ds = VideoFolder(root, manifest="m.jsonl", progress=False)
    assert ds.captions == ["a red square", "absolute but inside"]
    out = {os.path.basename(s.path): s.reason for s in ds.skipped}
    assert set(out) == {"up.mp4", "abs.mp4", "link.mp4"}
    for name, reason in out.items():
        assert reason.startswith("outside root: real path ") and "allow_outside_root=True" in reason, reason
        assert str(outside) in reason
    assert "3 outside root" in ds.summary()

    ds = VideoFolder(root, manifest="m.jsonl", allow_outside_root=True, progress=False)
    assert len(ds) == 5 and ds.skipped == []
    # the same rule for a scanned folder: the link is refused, the rest read
    ds = VideoFolder(root, progress=False)
    assert [p.name for p in ds.paths] == ["in.mp4"] and ds.skipped[0].reason.startswith("outside root")
    assert [p.name for p in VideoFolder(root, allow_outside_root=True, progress=False).paths] == ["in.mp4",
                                                                                                 "link.mp4"]
    with pytest.raises(TypeError, match="allow_outside_root must be a bool"):
        VideoFolder(root, allow_outside_root="yes", progress=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifos_and_devices_are_skipped_unopened(tmp_path):
    _clip(tmp_path / "ok.mp4")
    os.mkfifo(tmp_path / "pipe.mp4")
    _clip(tmp_path / "capfifo.mp4")
    (tmp_path / "capfifo.txt").unlink()
    os.mkfifo(tmp_path / "capfifo.txt")
    rows = [{"path": "ok.mp4"}, {"path": "pipe.mp4"}, {"path": os.devnull}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with _deadline():
        ds = VideoFolder(tmp_path, progress=False)
        assert [p.name for p in ds.paths] == ["ok.mp4"]
        reasons = {os.path.basename(s.path): s.reason for s in ds.skipped}
        assert reasons == {"pipe.mp4": "not a regular file: a FIFO (named pipe), not opened",
                           "capfifo.mp4": "not a regular file: caption 'capfifo.txt': a FIFO (named pipe), not opened"}
        ds = VideoFolder(tmp_path, manifest="m.jsonl", allow_outside_root=True, progress=False)
        reasons = {os.path.basename(s.path): s.reason for s in ds.skipped}
        assert reasons["pipe.mp4"].startswith("not a regular file: a FIFO")
        if os.path.exists(os.devnull):
            assert reasons[os.path.basename(os.devnull)] == "not a regular file: a character device, not opened"
        with pytest.raises(FileNotFoundError, match="which is not a regular file"):
            VideoFolder(tmp_path, manifest="pipe.mp4", progress=False)


# ----------------------------------------------------------------------------------------------
# sora-fast train: cache key, skip report, allow_outside_root


def test_train_rebuilds_a_stale_cache_and_names_skipped_files(tmp_path, capsys):
    dit = VideoDiT.from_name("tiny")
    pipe = VideoPipeline(dit, CausalVAE("tiny"), TinyTextEncoder(dim=dit.config.text_dim)).save(tmp_path / "pipe")
    data, other = tmp_path / "data", tmp_path / "other"
    make_synthetic_dataset(data, 3, seed=1, sizes=((16, 16),), lengths=(1, 5), progress=False)
    (data / "broken.mp4").write_text("not a video")
    other.mkdir()
    _clip(other / "linked.mp4")
    (data / "linked.mp4").symlink_to(other / "linked.mp4")

    def train(steps, **extra):
        cfg = {"data": str(data), "out": str(tmp_path / "run"), "pipeline": str(pipe),
               "train": {"steps": steps, "token_budget": 64, "save_every": 1, "log_every": 1}, **extra}
        (tmp_path / "run.json").write_text(json.dumps(cfg))
        args = ["train", "--config", str(tmp_path / "run.json")] + (["--resume"] if steps > 1 else [])
        assert cli.main(args) == 0
        return capsys.readouterr().err

    err = train(1)
    assert len(LatentDataset(tmp_path / "run" / "latents")) == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {os.path.basename(r["path"]): r["reason"].split(":")[0] for r in rows} == {
        "broken.mp4": "unreadable", "linked.mp4": "outside root"}
    assert "skipped 2 file(s) (1 outside root, 1 unreadable): " in err and "broken.mp4" in err

    err = train(2, allow_outside_root=True)  # the run-file key; the cache's data changed: re-encoded
    assert "re-encoding it: 1 data file(s) added: linked.mp4" in err
    assert len(LatentDataset(tmp_path / "run" / "latents")) == 4
    assert "skipped 1 file(s) (1 unreadable)" in err

    err = train(3, allow_outside_root=True)  # nothing changed: reused
    assert "re-encoding" not in err and "up to date" in err
