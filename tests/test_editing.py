"""Editing (SDEdit): ``generate(..., init_videos=, strength=)`` and ``sora-fast generate --edit --strength``."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sora_fast import cli
from sora_fast.pipeline import read_media


def _video(size, seed=0):
    """A smooth (3, T, H, W) clip in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((3, *size), generator=g) * 2 - 1).clamp(-1, 1)


def test_strength_zero_is_the_vae_round_trip(tiny_pipeline):
    pipe, _ = tiny_pipeline
    v = _video((5, 16, 32))
    calls = []
    dit_forward = pipe.dit.forward
    pipe.dit.forward = lambda *a, **k: calls.append(1) or dit_forward(*a, **k)
    out = pipe.generate(["a red circle"], init_videos=[v], strength=0.0, steps=4, guidance=3.0)[0]
    assert calls == []                                        # no denoising step
    with torch.no_grad():
        ref = pipe.vae.decode(pipe.vae.encode(v[None]))[0]
    assert out.shape == v.shape and torch.equal(out, ref)
    assert pipe.last_timings["steps"] == []


def test_strength_one_is_plain_generation_bit_for_bit(tiny_pipeline):
    pipe, _ = tiny_pipeline
    v = _video((5, 16, 32))
    plain = pipe.generate(["a red circle"], (5, 16, 32), steps=3, guidance=3.0, seed=11)[0]
    edit = pipe.generate(["a red circle"], init_videos=[v], strength=1.0, steps=3, guidance=3.0, seed=11)[0]
    assert torch.equal(plain, edit)


def test_strength_runs_only_the_remaining_steps_and_moves_towards_the_input(tiny_pipeline):
    pipe, _ = tiny_pipeline
    v = _video((5, 16, 16), seed=3)
    for st, n in [(0.2, 2), (0.55, 6), (1.0, 10)]:
        pipe.generate(["x"], init_videos=[v], strength=st, steps=10, guidance=2.0, seed=5)
        assert len(pipe.last_timings["steps"]) == n


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_strength_starts_from_the_noised_input(tiny_pipeline, solver):
    """With a DiT that predicts zero velocity every solver stands still, so the latents that reach the
    decoder are the start point ``(1 − σ0)·x0 + σ0·ε``, ``σ0 = s·strength / (1 + (s − 1)·strength)``,
    recomputed here from the VAE and the seed. A lower strength keeps more of the input: the distance to
    ``x0`` is ``σ0·|ε − x0|``, increasing with the strength."""
    pipe, _ = tiny_pipeline
    v, shift, seed = _video((5, 16, 16), seed=3), 3.0, 5
    with torch.no_grad():
        x0 = pipe.vae.normalize_latents(pipe.vae.encode(v[None]))[0]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    timesteps, decoded = [], []
    pipe.dit.forward = lambda x, t, text: timesteps.append(t.clone()) or x.tokens.new_zeros(
        x.tokens.shape[0], pipe.dit.config.out_channels * int(torch.tensor(pipe.dit.config.patch).prod()))
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z: decoded.append(z.clone()) or decode(z)
    dist = []
    for st in (0.2, 0.55, 0.9):
        timesteps.clear()
        decoded.clear()
        pipe.generate(["x"], init_videos=[v], strength=st, steps=10, guidance=2.0, seed=seed, shift=shift,
                      solver=solver)
        sigma0 = shift * st / (1 + (shift - 1) * st)
        start = (1 - sigma0) * x0 + sigma0 * eps
        (z,) = decoded
        torch.testing.assert_close(pipe.vae.normalize_latents(z)[0], start, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(timesteps[0].double(), torch.full_like(timesteps[0].double(), 1000 * sigma0),
                                   atol=1e-3, rtol=0)
        dist.append(float((start - x0).abs().mean()))
    assert dist[0] < dist[1] < dist[2]


def test_packed_mix_of_edited_and_plain_prompts_equals_each_alone(tiny_pipeline):
    """Edited and plain prompts, different strengths and sizes, one pack with CFG: each equals its run alone
    (same seeds: seed + i), and every step is one DiT forward."""
    pipe, _ = tiny_pipeline
    prompts = ["a red circle moving left", "blue square", "green", "yellow"]
    inits = [_video((5, 16, 32), 1), None, _video((1, 32, 16), 2), _video((9, 16, 16), 3)]
    sizes = [None, (9, 16, 16), None, (9, 16, 16)]
    strengths = [0.5, 1.0, 0.25, 0.0]
    calls = []
    dit_forward = pipe.dit.forward
    pipe.dit.forward = lambda x, *a, **k: calls.append(x.num_sequences) or dit_forward(x, *a, **k)
    together = pipe.generate(prompts, sizes, init_videos=inits, strength=strengths, steps=4, guidance=3.0, seed=7)
    assert calls == [2, 2, 4, 6]                            # CFG pairs join as their steps begin
    for i in range(4):
        alone = pipe.generate([prompts[i]], [sizes[i]], init_videos=[inits[i]], strength=strengths[i], steps=4,
                              guidance=3.0, seed=7 + i)[0]
        assert together[i].shape == (3, *(inits[i].shape[1:] if inits[i] is not None else sizes[i]))
        torch.testing.assert_close(together[i], alone, atol=2e-5, rtol=0)


def test_init_video_from_a_file(tiny_pipeline, tmp_path):
    from sora_fast.data import write_video

    pipe, _ = tiny_pipeline
    v = _video((5, 16, 32))
    path = write_video(tmp_path / "in.gif", v, fps=8)
    back = read_media(path)
    assert back.shape == v.shape and back.min() >= -1 and back.max() <= 1
    a = pipe.generate(["x"], init_videos=[path], strength=0.5, steps=2, seed=1)[0]
    b = pipe.generate(["x"], init_videos=[back], strength=0.5, steps=2, seed=1)[0]
    assert torch.equal(a, b)
    png = write_video(tmp_path / "in.png", v[:, :1], fps=8)
    assert pipe.generate(["x"], init_videos=[str(png)], strength=0.3, steps=2)[0].shape == (3, 1, 16, 32)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(init_videos=[_video((5, 16, 16))], sizes=(9, 16, 16)), ValueError,
     r"init_videos\[0\] is 5x16x16 .* but size \(9, 16, 16\) was requested for prompt 0; .*never resized"),
    (dict(init_videos=[_video((5, 16, 32))], sizes=[(5, 16, 16)]), ValueError, r"init_videos\[0\] is 5x16x32"),
    (dict(init_videos=[_video((4, 16, 16))]), ValueError, r"init_videos\[0\]: frames=4 must be 1 \+ 4k"),
    (dict(init_videos=[_video((5, 16, 16)) * 2]), ValueError, r"init_videos\[0\] must have values in \[-1, 1\]"),
    (dict(init_videos=[torch.full((3, 5, 16, 16), float("nan"))]), ValueError, r"init_videos\[0\] has 3840 NaN"),
    (dict(init_videos=[torch.zeros(5, 16, 16)]), ValueError, r"init_videos\[0\] must be a \(3, T, H, W\) float"),
    (dict(init_videos=[torch.zeros(3, 5, 16, 16, dtype=torch.uint8)]), ValueError, r"got torch.uint8"),
    (dict(init_videos=[np.zeros((3, 5, 16, 16))]), TypeError,
     r"init_videos\[0\] must be a \(3, T, H, W\) float tensor .* or None, got ndarray"),
    (dict(init_videos=_video((5, 16, 16))), TypeError, r"init_videos must be a list of 1 entries .* got Tensor"),
    (dict(init_videos=[None, None]), TypeError, r"init_videos must be a list of 1 entries .* got a list of 2"),
    (dict(init_videos=["/nonexistent/clip.mp4"]), FileNotFoundError, r"init_videos\[0\]: cannot read"),
    (dict(init_videos=[_video((5, 16, 16))], strength=1.5), ValueError,
     r"strength must be a number in \[0, 1\], got 1.5"),
    (dict(init_videos=[_video((5, 16, 16))], strength=float("nan")), ValueError, r"strength .* got nan"),
    (dict(init_videos=[_video((5, 16, 16))], strength=[0.5, 0.5]), ValueError,
     r"strength must be a number or a list of 1 numbers .* got a list of 2"),
    (dict(init_videos=[_video((5, 16, 16))], strength="half"), TypeError, r"strength must be a number .* got str"),
    (dict(strength=0.5), ValueError, r"strength 0.5 for prompt 0 needs an init video \(init_videos\[0\] is None"),
])
def test_bad_editing_arguments_fail_before_work(tiny_pipeline, kw, exc, match):
    pipe, _ = tiny_pipeline
    calls = []
    pipe.text_encoder.encode = lambda *a, **k: calls.append(1)
    pipe.vae.encode = lambda *a, **k: calls.append(1)
    with pytest.raises(exc, match=match):
        pipe.generate(["a"], steps=2, **kw)
    assert not calls


def test_unreadable_file_names_the_argument(tiny_pipeline, tmp_path):
    pipe, _ = tiny_pipeline
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"init_videos\[0\]: .*broken.mp4' is not a readable video or image"):
        pipe.generate(["a"], init_videos=[bad], strength=0.5)
    with pytest.raises(FileNotFoundError, match=r"init_videos\[0\]: .* is not a regular file"):
        pipe.generate(["a"], init_videos=[tmp_path], strength=0.5)


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_edit_writes_the_edited_clips(tiny_pipeline, tmp_path, capsys, monkeypatch):
    import sora_fast.data as data
    from sora_fast.data import write_video

    pipe, path = tiny_pipeline
    src = write_video(tmp_path / "in.gif", _video((5, 16, 32)), fps=8)
    out = tmp_path / "gen"
    written = {}

    def spy(path, clip, **kw):
        written[Path(path).name] = clip.clone()
        return write_video(path, clip, **kw)

    monkeypatch.setattr(data, "write_video", spy)
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a red circle", "--prompt", "blue",
                   "--edit", str(src), "--strength", "0.5", "--steps", "2", "--out", str(out), "--seed", "3",
                   "--format", "gif"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["00_a_red_circle.gif", "01_blue.gif", "contact_sheet.png",
                                                         "generate.json"]
    # the CLI's clips are the API's: same file, same strength, seed + i, the video's size
    ref = pipe.generate(["a red circle", "blue"], init_videos=[src, src], strength=0.5, steps=2, guidance=4.0,
                        seed=3)
    for name, r in zip(["00_a_red_circle.gif", "01_blue.gif"], ref):
        assert written[name].shape == (3, 5, 16, 32)
        torch.testing.assert_close(written[name], r, atol=2e-5, rtol=0)
    # an explicit --size equal to the video's is fine
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--edit", str(src), "--strength", "0",
                   "--size", "5x16x32", "--steps", "1", "--out", str(tmp_path / "g2"), "--format", "gif"])
    assert rc == 0


@pytest.mark.parametrize("args, match", [
    (["--strength", "0.5"], r"--strength needs --edit VIDEO"),
    (["--edit", "{src}"], r"--edit needs --strength S in \[0, 1\]"),
    (["--edit", "{src}", "--strength", "1.5"], r"--strength must be a number in \[0, 1\], got 1.5"),
    (["--edit", "{src}", "--strength=-0.1"], r"--strength must be a number in \[0, 1\], got -0.1"),
    (["--edit", "{src}", "--strength", "nan"], r"--strength must be a number in \[0, 1\], got nan"),
    (["--edit", "{src}", "--strength", "0.5", "--size", "9x16x32"],
     r"--size #1 9x16x32 differs from the --edit video's size 5x16x32 .* never resized"),
    (["--edit", "{tmp}/missing.mp4", "--strength", "0.5"], r"--edit: cannot read '.*missing.mp4'"),
    (["--edit", "{tmp}/broken.mp4", "--strength", "0.5"], r"--edit: '.*broken.mp4' is not a readable video"),
])
def test_cli_edit_arguments_are_checked_before_anything_loads(tmp_path, capsys, args, match):
    from sora_fast.data import write_video

    src = write_video(tmp_path / "in.gif", _video((5, 16, 32)), fps=8)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    args = [a.format(src=src, tmp=tmp_path) for a in args]
    # the pipeline does not exist and the output is not created: the argument is the first thing checked
    rc = cli.main(["generate", "--pipeline", str(tmp_path / "missing"), "--prompt", "a", "--out",
                   str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_cli_edit_video_of_an_invalid_frame_count(tiny_pipeline, tmp_path, capsys):
    from sora_fast.data import write_video

    _, path = tiny_pipeline
    src = write_video(tmp_path / "in.gif", _video((4, 16, 32)), fps=8)
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--edit", str(src), "--strength", "0.5",
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and re.search(r"--edit .*in.gif: frames=4 must be 1 \+ 4k", capsys.readouterr().err)
