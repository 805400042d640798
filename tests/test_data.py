"""Data layer: synthetic folders read back by VideoFolder, broken files, manifests, downscaling,
latent caches and writers."""
import json
import math
import warnings

import av  # the test extra installs av, Pillow and safetensors: missing ones fail here, never skip
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sora_fast.data import (
    ClipSpec,
    LatentDataset,
    VideoFolder,
    cache_latents,
    caption_for,
    make_synthetic_dataset,
    parse_caption,
    prompts,
    render_clip,
    sample_spec,
    to_uint8,
    write_contact_sheet,
    write_video,
)
from sora_fast.data.synthetic import COLORS, DIRECTIONS, SHAPES, SPEEDS
from sora_fast.data.video_folder import UnreadableFileError, fit_size


def _to_float(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1], as VideoFolder returns it."""
    return torch.from_numpy(frames.copy()).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def _avgpool(video: torch.Tensor) -> torch.Tensor:
    """Stand-in encoder: (3, T, H, W) -> (3, T, H/4, W/4)."""
    return F.avg_pool3d(video[None], (1, 4, 4))[0]


# ----------------------------------------------------------------------------------------------
# synthetic clips and captions


def test_synthetic_folder_round_trip(tmp_path, fresh_seed):
    """Written clips read back through VideoFolder: png exact, mp4 within H.264 error, captions intact."""
    imgs = make_synthetic_dataset(tmp_path / "images", 3, seed=fresh_seed, lengths=(1,), progress=False)
    vids = make_synthetic_dataset(tmp_path / "videos", 4, seed=fresh_seed, lengths=(5, 9, 13), occluder_prob=0.5,
                                  progress=False)
    ds = VideoFolder(tmp_path, progress=False)  # recursive: both subfolders
    assert len(ds) == 7 and ds.skipped == []
    by_path = {str(c.path): c for c in imgs + vids}
    assert sorted(by_path) == sorted(map(str, ds.paths))
    for i in range(len(ds)):
        item = ds[i]
        clip = by_path[item["path"]]
        video = item["video"]
        assert video.dtype == torch.float32 and video.shape == (3, clip.spec.frames, clip.spec.height, clip.spec.width)
        assert ds.shapes[i] == tuple(video.shape)
        assert video.min() >= -1 and video.max() <= 1
        assert item["caption"] == clip.caption == caption_for(clip.spec)
        truth = _to_float(render_clip(clip.spec))
        if clip.spec.frames == 1:
            assert clip.path.suffix == ".png"
            torch.testing.assert_close(video, truth, atol=0, rtol=0)
        else:
            assert clip.path.suffix == ".mp4"
            # H.264 yuv420p halves chroma resolution: saturated edges on tiny frames cost the most
            # (worst of 400 clips: 3.8 levels mean error, 28.5 dB PSNR, red shapes at 32x32)
            err = (video - truth).abs()
            assert err.mean() < 6 / 127.5, f"{clip.path.name}: mean error {err.mean() * 127.5:.2f} levels"
            psnr = 10 * math.log10(4 / ((video - truth) ** 2).mean().item())
            assert psnr > 26, f"{clip.path.name}: PSNR {psnr:.1f} dB"
    rows = [json.loads(line) for line in (tmp_path / "videos" / "manifest.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [c.caption for c in vids]


def test_synthetic_is_deterministic(tmp_path, fresh_seed):
    a = make_synthetic_dataset(tmp_path / "a", 5, seed=fresh_seed, progress=False)
    b = make_synthetic_dataset(tmp_path / "b", 3, seed=fresh_seed, progress=False)  # clip i does not depend on n
    assert [c.spec for c in a[:3]] == [c.spec for c in b]
    for ca, cb in zip(a[:3], b):
        assert ca.path.read_bytes() == cb.path.read_bytes()
    c = make_synthetic_dataset(tmp_path / "c", 5, seed=fresh_seed + 1, progress=False)
    assert [x.spec for x in a] != [x.spec for x in c]
    spec = sample_spec(fresh_seed)
    assert np.array_equal(render_clip(spec), render_clip(spec))
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_dataset(tmp_path / "a", 2, seed=fresh_seed, progress=False)
    (tmp_path / "a" / "keep.md").write_text("not a clip")
    again = make_synthetic_dataset(tmp_path / "a", 2, seed=fresh_seed + 2, lengths=(1,), overwrite=True,
                                   progress=False)  # a smaller run replaces the clips of the larger one
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "00000.png", "00000.txt", "00001.png", "00001.txt", "keep.md", "manifest.jsonl"]
    assert VideoFolder(tmp_path / "a", progress=False).captions == [c.caption for c in again]


def test_mp4_bytes_are_a_function_of_the_frames(tmp_path, fresh_seed):
    """The same frames give the same mp4 bytes however the process's memory was used before: x264's
    macroblock-tree rate control read bytes that are not the input's (about 1 encode in 12 differed)."""
    import hashlib
    import os

    # seed 99735169's clip 1 (5x32x64) differed in most runs of 60 encodes; plus a fresh clip
    clips = [make_synthetic_dataset(tmp_path / "d", 2, seed=99735169, progress=False)[1],
             make_synthetic_dataset(tmp_path / "e", 1, seed=fresh_seed, lengths=(5,), progress=False)[0]]
    for k, clip in enumerate(clips):
        frames = render_clip(clip.spec)
        digests = set()
        for i in range(60):
            churn = [os.urandom(n) for n in (4096, 65536, 1 << 20)]  # freed memory that holds other bytes
            del churn
            digests.add(hashlib.sha256(write_video(tmp_path / f"{k}_{i}.mp4", frames, 8).read_bytes()).hexdigest())
        assert len(digests) == 1, f"{clip.spec}: {len(digests)} different files from the same frames in 60 encodes"


def test_captions_parse_back(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    for _ in range(200):
        spec = sample_spec(rng, occluder_prob=0.5, bounce_prob=0.3)
        assert parse_caption(spec.caption) == spec.prompt
    p = parse_caption("  A Red   circle moving LEFT slowly. ")
    assert (p.color, p.shape, p.direction, p.axis, p.speed, p.bounce) == ("red", "circle", "left", "x", "slow", False)
    p = parse_caption("a blue square bouncing up and down quickly behind a gray bar")
    assert (p.axis, p.speed, p.bounce, p.occluder, p.direction) == ("y", "fast", True, True, None)
    assert not parse_caption("a white triangle").moving
    for bad in ["a purple circle moving left slowly", "a red circle moving sideways slowly", "red circle", ""]:
        with pytest.raises(ValueError, match="synthetic grammar"):
            parse_caption(bad)
    n_combos = len(COLORS) * len(SHAPES) * len(DIRECTIONS) * len(SPEEDS)
    ps = prompts(n_combos, seed=fresh_seed)
    assert len(set(ps)) == n_combos and all(parse_caption(p).moving for p in ps)
    assert all(not parse_caption(p).moving for p in prompts(4, seed=fresh_seed, images=True))


def test_captioned_directions_never_bounce(fresh_seed):
    """A clip captioned 'moving <dir>' keeps moving that way for its whole length, even for long clips."""
    rng = np.random.default_rng(fresh_seed)
    for _ in range(300):
        spec = sample_spec(rng, lengths=(2, 9, 17, 33, 65), occluder_prob=0.5)
        centers = spec.centers()
        if spec.bounce:  # only when no speed fits; the caption then says "bouncing"
            assert "bouncing" in spec.caption
            continue
        k = 0 if spec.axis == "x" else 1
        steps = np.diff(centers[:, k])
        sign = -1 if spec.direction in ("left", "up") else 1
        assert np.all(sign * steps > 0) and np.allclose(np.diff(centers[:, 1 - k]), 0)
        render_clip(spec)  # raises if the object would leave the frame
    bad = ClipSpec(shape="circle", color="red", height=32, width=32, frames=17, size=8, start=(6.0, 16.0),
                   direction="left", speed="fast")
    with pytest.raises(ValueError, match="leaves the 32x32 frame"):
        render_clip(bad)


# ----------------------------------------------------------------------------------------------
# VideoFolder: broken files, empty folders, manifests, reductions


def _faststart_truncated_mp4(path, spec: ClipSpec):
    """An mp4 whose index sits before the data, cut so that the first frame decodes but a later one fails:
    it passes VideoFolder's probe and breaks only in __getitem__."""
    frames = render_clip(spec)
    full = path.with_suffix(".full")
    with av.open(str(full), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = spec.width, spec.height, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = full.read_bytes()
    full.unlink()
    for frac in np.linspace(0.97, 0.5, 48):
        path.write_bytes(data[: int(len(data) * frac)])
        n = 0
        try:
            with av.open(str(path)) as c:
                for _ in c.decode(c.streams.video[0]):
                    n += 1
        except Exception:
            pass
        if 1 <= n < spec.frames:
            return
    pytest.fail("no truncation point gives a partly decodable mp4")


def test_broken_files_are_skipped_and_counted(tmp_path, fresh_seed):
    good = make_synthetic_dataset(tmp_path, 3, seed=fresh_seed, lengths=(5, 9), progress=False)
    data = good[0].path.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    png = tmp_path / "cut.png"
    write_video(png, render_clip(sample_spec(fresh_seed, lengths=(1,))))
    png.write_bytes(png.read_bytes()[:60])
    late = ClipSpec(shape="square", color="green", height=32, width=32, frames=17, size=8, start=(6.0, 16.0),
                    direction="right", speed="slow")
    _faststart_truncated_mp4(tmp_path / "late.mp4", late)

    ds = VideoFolder(tmp_path, progress=False)
    assert len(ds) == 4  # three good files + the one that breaks only past its first frame
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in ds.skipped}
    assert set(reasons) == {"truncated.mp4", "text.mp4", "empty.mp4", "cut.png"}
    assert reasons["empty.mp4"].startswith("unreadable: empty file")
    assert "4 of 8 files readable" in ds.summary() and "skipped 4" in ds.summary()

    i = [p.name for p in ds.paths].index("late.mp4")
    with pytest.raises(UnreadableFileError, match="truncated|unreadable"):
        ds.load(i)
    with pytest.warns(RuntimeWarning, match="late.mp4"):
        item = ds[i]  # a training loop gets the next readable item instead of an exception
    assert item["index"] != i and item["path"] != str(tmp_path / "late.mp4")
    assert len(ds.skipped) == 5 and "3 of 8 files readable" in ds.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known broken: no second decode attempt, no second warning
        assert ds[i]["index"] == item["index"]

    strict = VideoFolder(tmp_path, verify=True, progress=False)  # full decode at construction
    assert len(strict) == 3 and len(strict.skipped) == 5


def test_empty_or_unreadable_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolder(tmp_path / "nope", progress=False)
    (tmp_path / "notes.txt").write_text("captions without videos")
    with pytest.raises(ValueError, match=f"no video or image files found in '{tmp_path}'"):
        VideoFolder(tmp_path, progress=False)
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.webm").write_text("garbage")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=f"no readable video or image in '{tmp_path}': all 3 files tried"):
        VideoFolder(tmp_path, progress=False)


def test_manifest_captions(tmp_path, fresh_seed):
    clips = make_synthetic_dataset(tmp_path, 4, seed=fresh_seed, progress=False)
    lines = [
        json.dumps({"path": clips[0].path.name, "caption": "from the manifest"}),
        json.dumps({"path": str(clips[1].path)}),  # absolute, no caption: the sidecar .txt is used
        "{not json",
        json.dumps({"caption": "no path"}),
        json.dumps({"path": "missing.mp4", "caption": "x"}),
        "",
        json.dumps({"path": clips[3].path.name, "caption": "last"}),
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    ds = VideoFolder(tmp_path, manifest="list.jsonl", progress=False)  # found inside root
    assert ds.captions == ["from the manifest", clips[1].caption, "last"]
    assert [p.name for p in ds.paths] == [clips[0].path.name, clips[1].path.name, clips[3].path.name]
    assert ds[0]["caption"] == "from the manifest"
    kinds = sorted(s.kind for s in ds.skipped)
    assert kinds == ["bad manifest line", "bad manifest line", "not found"]
    # the synthetic manifest.jsonl works as a manifest too
    assert VideoFolder(tmp_path, manifest=tmp_path / "manifest.jsonl", progress=False).captions == [
        c.caption for c in clips]
    with pytest.raises(FileNotFoundError, match="manifest"):
        VideoFolder(tmp_path, manifest="nope.jsonl", progress=False)


def test_uncaptioned_files_get_empty_caption(tmp_path, fresh_seed):
    clips = make_synthetic_dataset(tmp_path, 2, seed=fresh_seed, progress=False)
    clips[0].path.with_suffix(".txt").unlink()
    ds = VideoFolder(tmp_path, progress=False)
    assert ds.captions == ["", clips[1].caption] and "1 without caption" in ds.summary()


@pytest.mark.parametrize("h,w,max_area,m", [(48, 64, 1024, 16), (1080, 1920, 4096, 16), (36, 64, 2000, 8),
                                            (50, 70, None, 16), (33, 47, None, 1), (64, 48, 10**6, 16),
                                            (17, 300, 1024, 16)])
def test_fit_size(h, w, max_area, m):
    try:
        h2, w2 = fit_size(h, w, max_area, m)
    except UnreadableFileError as e:
        assert "too small" in str(e) and (h, w) == (17, 300)
        return
    assert h2 % m == 0 and w2 % m == 0 and h2 <= h and w2 <= w
    if max_area is not None:
        assert h2 * w2 <= max_area
    # no size of multiples within the budget has a better aspect ratio and is at least as large
    err = abs(math.log((w2 / h2) / (w / h)))
    assert err < 0.35
    if max_area is None or h * w <= max_area:
        assert (h2, w2) == (h // m * m, w // m * m)


def test_downscale_and_frame_rule(tmp_path, fresh_seed):
    spec = ClipSpec(shape="circle", color="yellow", height=48, width=64, frames=17, size=12, start=(10.0, 24.0),
                    direction="right", speed="slow")
    write_video(tmp_path / "clip.mp4", render_clip(spec), fps=8)
    full = VideoFolder(tmp_path, progress=False)[0]["video"]
    ds = VideoFolder(tmp_path, max_area=32 * 40, size_multiple=16, max_frames=12, frame_multiple=4, frame_offset=1,
                     progress=False)
    video = ds[0]["video"]
    assert video.shape == ds.shapes[0] == (3, 9, 32, 32)  # 12 frames cut to 1 + 4k = 9; 48x64 -> 32x32 within 1280 px
    ref = F.interpolate(full[:, :9].permute(1, 0, 2, 3), size=(32, 32), mode="bilinear", antialias=True,
                        align_corners=False).permute(1, 0, 2, 3)
    torch.testing.assert_close(video, ref, atol=1e-5, rtol=0)
    assert "1 downscaled, 1 cut in time" in ds.summary()
    ds = VideoFolder(tmp_path, max_area=24 * 32, size_multiple=8, frames_rule=lambda t: t // 2, progress=False)
    assert ds.shapes[0] == (3, 8, 24, 32)  # exact 3:4 kept
    assert VideoFolder(tmp_path, frame_multiple=4, frame_offset=1, progress=False).shapes[0] == (3, 17, 48, 64)
    assert VideoFolder(tmp_path, frame_multiple=16, progress=False).shapes[0] == (3, 16, 48, 64)
    with pytest.raises(ValueError, match="too short: 17 frames, need at least 32"):
        VideoFolder(tmp_path, frame_multiple=32, progress=False)
    with pytest.raises(ValueError, match="frames_rule must return an int in"):
        VideoFolder(tmp_path, frames_rule=lambda t: t + 1, progress=False)
    for kw, msg in [({"max_area": 0}, "max_area must be an int >= 1"), ({"size_multiple": 0}, "size_multiple"),
                    ({"max_area": 100, "size_multiple": 16}, "max_area must be >= size_multiple"),
                    ({"frame_offset": -1}, "frame_offset must be an int >= 0")]:
        with pytest.raises(ValueError, match=msg):
            VideoFolder(tmp_path, progress=False, **kw)


# ----------------------------------------------------------------------------------------------
# latent caches


def test_latent_cache_round_trip_and_corruption(tmp_path, fresh_seed):
    make_synthetic_dataset(tmp_path / "videos", 7, seed=fresh_seed, progress=False)
    (tmp_path / "videos" / "broken.mp4").write_text("not a video")
    ds = VideoFolder(tmp_path / "videos", progress=False)
    out = cache_latents(ds, _avgpool, tmp_path / "cache", shard_size=3, progress=False)
    lat = LatentDataset(out)
    assert len(lat) == 7 and lat.skipped == []
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors",
                                                     "shard-00001.safetensors", "shard-00002.safetensors"]
    for i in range(7):
        item = lat[i]
        expected = _avgpool(ds.load(i)["video"])
        torch.testing.assert_close(item["latent"], expected, atol=0, rtol=0)
        assert item["caption"] == ds.captions[i] and item["path"] == str(ds.paths[i])
        assert lat.shapes[i] == tuple(expected.shape)

    with pytest.raises(FileExistsError, match="already holds a latent cache"):
        cache_latents(ds, _avgpool, out, progress=False)

    # corrupt one shard inside its tensor data (only the checksum sees it) and truncate another
    s0, s1 = out / "shard-00000.safetensors", out / "shard-00001.safetensors"
    raw = bytearray(s0.read_bytes())
    raw[-8:] = b"\xff" * 8
    s0.write_bytes(bytes(raw))
    s1.write_bytes(s1.read_bytes()[:100])
    lat = LatentDataset(out)
    assert len(lat) == 1 and len(lat.skipped) == 2  # 7 items: shards of 3, 3, 1
    assert all(s.reason.startswith("corrupted shard (3 items lost)") for s in lat.skipped)
    torch.testing.assert_close(lat[0]["latent"], _avgpool(ds.load(6)["video"]), atol=0, rtol=0)
    assert len(LatentDataset(out, verify=False)) == 4  # without checksums only the truncation shows

    out2 = cache_latents(ds, _avgpool, out, shard_size=10, overwrite=True, progress=False)  # stale shards removed
    assert sorted(p.name for p in out2.iterdir()) == ["index.json", "shard-00000.safetensors"]
    assert len(LatentDataset(out2)) == 7
    with pytest.raises(FileNotFoundError, match="holds no latent cache"):
        LatentDataset(tmp_path / "videos")
    with pytest.raises(ValueError, match="encode_fn must return a"):
        cache_latents(ds, lambda v: v.mean(), tmp_path / "bad", progress=False)


# ----------------------------------------------------------------------------------------------
# writers


def test_writers_read_back(tmp_path, fresh_seed):
    spec = sample_spec(fresh_seed, sizes=((33, 47),), lengths=(5,))  # odd sides
    frames = render_clip(spec)
    p = write_video(tmp_path / "out" / "clip.mp4", _to_float(frames), fps=8)  # parent folders created
    back = _decode(p)
    assert back.shape == (5, 34, 48, 3)  # padded to even sides for yuv420p
    assert np.abs(back[:, :33, :47].astype(int) - frames).mean() < 4
    p = write_video(tmp_path / "clip.mp4", frames, fps=8, codec="mpeg4")
    assert np.abs(_decode(p)[:, :33, :47].astype(int) - frames).mean() < 6
    g = write_video(tmp_path / "clip.gif", frames, fps=8)
    assert np.array_equal(_decode(g), frames)  # five colours fit the palette exactly
    img = write_video(tmp_path / "still" / "still.png", frames[:1])
    torch.testing.assert_close(VideoFolder(img.parent, progress=False)[0]["video"], _to_float(frames[:1]),
                               atol=0, rtol=0)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left

    sheet = write_contact_sheet(tmp_path / "sheet.png", [frames, torch.rand(3, 9, 20, 30) * 2 - 1],
                                ["a clip", "noise"], frames_per_clip=3, scale=2)
    from PIL import Image
    with Image.open(sheet) as im:
        assert im.size == (4 + 3 * (94 + 4), 4 + 2 * (66 + 14 + 4))


def test_writer_errors(tmp_path):
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot be written"):
        write_video(tmp_path / "file" / "clip.mp4", frames)
    with pytest.raises(OSError, match="cannot be written"):
        write_contact_sheet(tmp_path / "file" / "sheet.png", [frames])
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="got the existing folder"):
        write_video(tmp_path / "d.mp4", frames)
    with pytest.raises(ValueError, match=r"path must end in one of \('.mp4', '.gif', '.png'\)"):
        write_video(tmp_path / "clip.avi", frames)
    with pytest.raises(ValueError, match="a .png holds one frame, got a video of 3 frames"):
        write_video(tmp_path / "clip.png", frames)
    with pytest.raises(ValueError, match="fps must be a positive"):
        write_video(tmp_path / "clip.mp4", frames, fps=0)
    with pytest.raises(OSError, match="cannot be created"):
        cache_latents([{"video": torch.zeros(3, 1, 8, 8)}], _avgpool, tmp_path / "file" / "cache", progress=False)
    assert not (tmp_path / "clip.mp4").exists()


def test_to_uint8_layouts():
    x = torch.rand(3, 4, 5, 6) * 2 - 1
    u = to_uint8(x)
    assert u.shape == (4, 5, 6, 3) and u.dtype == np.uint8
    assert np.array_equal(u, np.rint((x.permute(1, 2, 3, 0).numpy() + 1) * 127.5).astype(np.uint8))
    assert np.array_equal(to_uint8(u), u) and np.array_equal(to_uint8(torch.from_numpy(u)), u)
    assert to_uint8(x[:, 0]).shape == (1, 5, 6, 3)
    assert np.array_equal(to_uint8(torch.full((3, 1, 2, 2), 7.0)), np.full((1, 2, 2, 3), 255, np.uint8))  # clamped
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        to_uint8(torch.zeros(4, 5, 6, 3))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        to_uint8(np.zeros((3, 4, 5, 6), np.uint8))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        to_uint8([1, 2, 3])


def test_reads_gif_webm_and_jpg(tmp_path, fresh_seed):
    """Containers without a frame count in their metadata (webm) are counted from their packets."""
    spec = sample_spec(fresh_seed, sizes=((32, 48),), lengths=(9,))
    frames = render_clip(spec)
    write_video(tmp_path / "a.gif", frames, fps=8)
    with av.open(str(tmp_path / "b.webm"), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=8)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    from PIL import Image
    Image.fromarray(frames[0]).save(tmp_path / "c.jpg", quality=95)
    ds = VideoFolder(tmp_path, progress=False)
    assert [p.name for p in ds.paths] == ["a.gif", "b.webm", "c.jpg"]
    assert ds.shapes == [(3, 9, 32, 48), (3, 9, 32, 48), (3, 1, 32, 48)]
    truth = _to_float(frames)
    torch.testing.assert_close(ds[0]["video"], truth, atol=0, rtol=0)  # gif: exact for five colours
    for i, ref in ((1, truth), (2, truth[:, :1])):
        assert ds[i]["video"].shape == ref.shape and (ds[i]["video"] - ref).abs().mean() < 6 / 127.5


def test_object_size_scales_the_rendered_object():
    from sora_fast.data.synthetic import render_clip, sample_spec

    areas = []
    for frac in (0.2, 0.4):
        spec = sample_spec(7, sizes=((40, 40),), lengths=(1,), shapes=("square",), object_size=frac)
        frame = render_clip(spec)[0].astype(int)
        background = frame[0, 0]
        areas.append(int((abs(frame - background).sum(axis=-1) > 60).sum()))
    # a square of side s covers ~s^2 pixels: doubling the side is ~4x the area (anti-aliased edges aside)
    assert 3.0 < areas[1] / areas[0] < 5.0, areas
    with pytest.raises(ValueError, match=r"object_size must be a number in \(0, 0.6\], got 0.9"):
        sample_spec(0, object_size=0.9)
