"""Conditions: ``generate(..., conditions=[[Condition(...)]])`` (image-to-video, extension, keyframes) and
the per-frame levels of ``sample_euler(..., given=, given_levels=)``."""

import math
import re

import pytest
import torch

import sora_fast
from sora_fast import Condition
from sora_fast.packing import frame_ids, pack_sequences, pack_videos
from sora_fast.sampling import sample_euler
from tests._utils import run_generate_cli

PATCH = (1, 2, 2)


def _video(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((3, *size), generator=g) * 2 - 1).clamp(-1, 1)


def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Spy:
    """A toy velocity model that records what each forward receives."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, text):
        self.calls.append((x, t.clone(), x.tokens.clone()))
        scale = torch.repeat_interleave(t, x.grid[:, 0].long()) if t.shape[0] == x.num_sequences else t
        per_text = torch.stack([s.sum() for s in text.unpack(text.tokens)])     # one number per video
        return (x.tokens * 0.5 + 0.001 * scale[frame_ids(x).long(), None]
                + 1e-3 * per_text[x.seq_ids.long(), None])


def _text(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pack_sequences([torch.randn(3 + i, 8, generator=g) for i in range(b)])


def test_condition_is_exported():
    assert sora_fast.Condition is Condition
    c = Condition(torch.zeros(3, 1, 16, 16))
    assert (c.frame, c.strength) == (0, 1.0)


def test_given_frames_are_held_exactly_and_the_dit_gets_per_frame_timesteps():
    noise = [_noise((4, 5, 4, 6), 0)]
    x0 = _noise((4, 5, 4, 6), 1)
    lv = torch.tensor([0.0, float("nan"), float("nan"), 0.0, float("nan")], dtype=torch.float64)
    spy = Spy()
    out = sample_euler(spy, noise, _text(1), patch=PATCH, steps=4, guidance=1.0, shift=3.0,
                       given=[x0], given_levels=[lv])[0]
    assert len(spy.calls) == 4
    keep = ~torch.isnan(lv)
    for x, t, tokens in spy.calls:
        assert t.shape == (5,)                                  # (F,) per-frame timesteps
        assert torch.all(t[keep] == 0) and torch.all(t[~keep] > 0)
        lat = x.unpack(tokens)[0]
        assert torch.equal(lat[:, keep], x0[:, keep])           # given frames never updated
    assert torch.equal(out[:, keep], x0[:, keep])
    assert not torch.allclose(out[:, ~keep], noise[0][:, ~keep], atol=1e-3)   # the others are denoised


def test_strength_below_one_holds_the_frame_at_its_level():
    noise = [_noise((4, 5, 4, 4), 0)]
    x0 = _noise((4, 5, 4, 4), 1)
    lv = torch.full((5,), float("nan"), dtype=torch.float64)
    lv[0] = 0.25
    spy = Spy()
    out = sample_euler(spy, noise, _text(1), patch=PATCH, steps=3, guidance=1.0, shift=1.0,
                       given=[x0], given_levels=[lv])[0]
    held = ((1 - 0.25) * x0[:, 0] + 0.25 * noise[0][:, 0])
    for x, t, tokens in spy.calls:
        assert float(t[0]) == 250.0
        assert torch.equal(x.unpack(tokens)[0][:, 0], held)
    assert torch.equal(out[:, 0], x0[:, 0])                     # returned as its clean latent


def test_without_conditions_the_dit_still_gets_per_video_timesteps():
    spy = Spy()
    sample_euler(spy, [_noise((4, 3, 4, 4), 0)], _text(1), patch=PATCH, steps=2, guidance=1.0)
    assert all(t.shape == (1,) for _, t, _ in spy.calls)


def test_pack_with_cfg_equals_each_alone_and_one_forward_per_step():
    shapes = [(4, 5, 4, 6), (4, 3, 6, 4), (4, 1, 4, 4)]
    noise = [_noise(s, i) for i, s in enumerate(shapes)]
    x0 = [_noise(s, 10 + i) for i, s in enumerate(shapes)]
    nan = float("nan")
    levels = [torch.tensor([0.0, nan, nan, nan, 0.0], dtype=torch.float64), None,
              torch.tensor([0.0], dtype=torch.float64)]
    given = [x0[0], None, x0[2]]
    text, un = _text(3, 1), _text(3, 2)
    spy = Spy()
    both = sample_euler(spy, noise, text, uncond_text=un, patch=PATCH, steps=3, guidance=4.0, shift="auto",
                        given=given, given_levels=levels)
    assert len(spy.calls) == 3                                  # CFG: one forward per step
    assert spy.calls[0][0].num_sequences == 6
    for i in range(3):
        t_one = pack_sequences([text.unpack(text.tokens)[i]])
        u_one = pack_sequences([un.unpack(un.tokens)[i]])
        alone = sample_euler(Spy(), [noise[i]], t_one, uncond_text=u_one, patch=PATCH, steps=3, guidance=4.0,
                             shift="auto", given=None if given[i] is None else [given[i]],
                             given_levels=None if levels[i] is None else [levels[i]])[0]
        torch.testing.assert_close(both[i], alone, rtol=1e-5, atol=1e-6)


def test_conditions_with_an_edit_in_the_same_pack():
    """A video that joins late (strength < 1) and a conditioned one share the pack."""
    shapes = [(4, 3, 4, 4), (4, 3, 4, 4)]
    noise = [_noise(s, i) for i, s in enumerate(shapes)]
    init = [None, _noise(shapes[1], 7)]
    lv = torch.tensor([0.0, float("nan"), float("nan")], dtype=torch.float64)
    spy = Spy()
    out = sample_euler(spy, noise, _text(2), patch=PATCH, steps=4, guidance=1.0, init=init, strength=[1.0, 0.5],
                       given=[init[1], init[1]], given_levels=[lv, lv])
    assert [c[0].num_sequences for c in spy.calls] == [1, 1, 2, 2]
    assert all(t.shape == (3 * c[0].num_sequences,) for c in spy.calls for t in [c[1]])
    assert torch.equal(out[0][:, 0], init[1][:, 0])


@pytest.mark.parametrize("kw, match", [
    (dict(given=[None]), "go together"),
    (dict(given=[None, None], given_levels=[None, None]), "one per video"),
    (dict(given=[torch.zeros(4, 2, 4, 4)], given_levels=[torch.zeros(2)]), "shape"),
    (dict(given=[torch.zeros(4, 3, 4, 4)], given_levels=[torch.zeros(2)]), r"\(3,\)"),
    (dict(given=[torch.zeros(4, 3, 4, 4)], given_levels=[torch.tensor([0.0, 1.5, 0.0])]), r"\[0, 1\]"),
])
def test_sampler_refuses_bad_given(kw, match):
    with pytest.raises(ValueError, match=match):
        sample_euler(Spy(), [_noise((4, 3, 4, 4), 0)], _text(1), patch=PATCH, steps=2, guidance=1.0, **kw)


def test_sampler_temporal_patch_needs_whole_patch_frames():
    lv = torch.tensor([0.0, float("nan"), float("nan"), float("nan")], dtype=torch.float64)
    with pytest.raises(ValueError, match="temporal patch"):
        sample_euler(Spy(), [_noise((4, 4, 4, 4), 0)], _text(1), patch=(2, 2, 2), steps=2, guidance=1.0,
                     given=[torch.zeros(4, 4, 4, 4)], given_levels=[lv])


# --- the pipeline ---------------------------------------------------------------------------------

def _capture_latents(pipe, monkeypatch):
    import sora_fast.pipeline as pl
    got = []

    def wrapped(*a, **k):
        out = pl_sample(*a, **k)
        got.append(out)
        return out
    pl_sample = pl.sample
    monkeypatch.setattr(pl, "sample", wrapped)
    return got


def _encode(pipe, v):
    with torch.no_grad():
        return pipe.vae.normalize_latents(pipe.vae.encode(v[None]))[0]


def test_image_to_video_first_frame_comes_back_through_the_vae(tiny_pipeline, monkeypatch):
    pipe, _ = tiny_pipeline
    got = _capture_latents(pipe, monkeypatch)
    img = _video((1, 16, 32), 4)
    out = pipe.generate(["a red circle"], (9, 16, 32), conditions=[[Condition(img)]], steps=3, guidance=3.0)[0]
    lat = got[0][0]
    assert torch.equal(lat[:, :1], _encode(pipe, img))          # latent frame 0 = the image's encoding
    with torch.no_grad():
        ref = pipe.vae.decode(pipe.vae.denormalize_latents(_encode(pipe, img)[None]))[0]
    torch.testing.assert_close(out[:, :1], ref, rtol=1e-4, atol=1e-4)   # causal decoder: frame 0 from latent 0
    with torch.no_grad():
        rt = pipe.vae.decode(pipe.vae.encode(img[None]))[0]
    torch.testing.assert_close(out[:, :1], rt, rtol=1e-4, atol=1e-4)


def test_extension_forward_and_backward_latents_equal_the_clips(tiny_pipeline, monkeypatch):
    pipe, _ = tiny_pipeline
    got = _capture_latents(pipe, monkeypatch)
    clip = _video((5, 16, 16), 5)
    spy_t = []
    fwd = pipe.dit.forward
    pipe.dit.forward = lambda x, t, text: spy_t.append(t.clone()) or fwd(x, t, text)
    outs = pipe.generate(["a", "b"], (13, 16, 16), conditions=[[Condition(clip)], [Condition(clip, frame=-5)]],
                         steps=3, guidance=2.0)
    z = _encode(pipe, clip)                                     # (C, 2, h, w)
    fwd_lat, bwd_lat = got[0]
    assert torch.equal(fwd_lat[:, :2], z)                       # first half: the given clip's latents
    assert torch.equal(bwd_lat[:, -2:], z)                      # backward: at the end (latent frames 2, 3)
    assert all(o.shape == (3, 13, 16, 16) for o in outs)
    assert not torch.equal(fwd_lat[:, 2:], bwd_lat[:, 2:])
    # per-frame timesteps: cond copies of both, then uncond copies; 4 latent frames each
    assert len(spy_t) == 3
    for t in spy_t:
        assert t.shape == (16,)
        for half in (t[:8], t[8:]):
            assert torch.all(half[[0, 1, 6, 7]] == 0) and torch.all(half[[2, 3, 4, 5]] > 0)


def test_keyframes_first_and_last(tiny_pipeline, monkeypatch):
    pipe, _ = tiny_pipeline
    got = _capture_latents(pipe, monkeypatch)
    a, b = _video((1, 16, 16), 1), _video((1, 16, 16), 2)
    pipe.generate(["x"], (9, 16, 16), conditions=[[Condition(a, 0), Condition(b, -1)]], steps=2, guidance=1.0)
    lat = got[0][0]
    assert torch.equal(lat[:, :1], _encode(pipe, a)) and torch.equal(lat[:, 2:], _encode(pipe, b))
    assert not torch.equal(lat[:, 1], torch.zeros_like(lat[:, 1]))


def test_pack_of_conditioned_prompts_equals_each_alone(tiny_pipeline):
    pipe, _ = tiny_pipeline
    prompts = ["a red circle", "blue square", "green"]
    sizes = [(9, 16, 32), (5, 16, 16), (9, 16, 16)]
    conds = [[Condition(_video((1, 16, 32), 1))], [], [Condition(_video((5, 16, 16), 2), frame=4, strength=0.7)]]
    calls = []
    fwd = pipe.dit.forward
    pipe.dit.forward = lambda *a, **k: calls.append(1) or fwd(*a, **k)
    together = pipe.generate(prompts, sizes, conditions=conds, steps=3, guidance=3.0, seed=[3, 4, 5])
    assert len(calls) == 3
    for i in range(3):
        alone = pipe.generate([prompts[i]], [sizes[i]], conditions=[conds[i]], steps=3, guidance=3.0, seed=[3 + i])
        torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-4)


def test_empty_conditions_equal_plain_generation(tiny_pipeline):
    pipe, _ = tiny_pipeline
    plain = pipe.generate(["x"], (5, 16, 16), steps=2, guidance=2.0, seed=1)[0]
    empty = pipe.generate(["x"], (5, 16, 16), conditions=[[]], steps=2, guidance=2.0, seed=1)[0]
    assert torch.equal(plain, empty)


def test_size_defaults_to_the_conditions_height_and_width(tiny_pipeline):
    pipe, _ = tiny_pipeline
    out = pipe.generate(["x"], conditions=[[Condition(_video((1, 16, 48)))]], steps=1, guidance=1.0)[0]
    assert out.shape == (3, pipe.DEFAULT_SIZE[0], 16, 48)


def test_condition_from_a_file(tiny_pipeline, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image
    pipe, _ = tiny_pipeline
    arr = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")
    Image.fromarray(arr).save(tmp_path / "a.png")
    got = _capture_latents(pipe, monkeypatch)
    pipe.generate(["x"], (5, 16, 16), conditions=[[Condition(str(tmp_path / "a.png"))]], steps=1, guidance=1.0)
    img = torch.from_numpy(arr).permute(2, 0, 1)[:, None].float() / 127.5 - 1
    assert torch.equal(got[0][0][:, :1], _encode(pipe, img))


def test_a_condition_file_is_read_once(tiny_pipeline, tmp_path, monkeypatch):
    """A prompt whose size is left out takes it from its first condition's file: that file is read once (not
    again by the condition checks), as is a file whose prompt has a size; the caller's list is not changed."""
    import numpy as np
    from PIL import Image

    import sora_fast.conditioning as conditioning
    pipe, _ = tiny_pipeline
    rng = np.random.default_rng()
    for name, (h, w) in (("a.png", (16, 48)), ("b.png", (16, 16))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(tmp_path / name)
    reads, real = [], conditioning.read_media
    monkeypatch.setattr(conditioning, "read_media", lambda path, name="path": reads.append(name) or real(path, name))
    conds = [[Condition(str(tmp_path / "a.png"))], [Condition(str(tmp_path / "b.png"), frame=-1)]]
    out = pipe.generate(["x", "y"], [None, (5, 16, 16)], conditions=conds, steps=1, guidance=1.0)
    assert reads == ["conditions[0][0].media", "conditions[1][0].media"]
    assert out[0].shape == (3, pipe.DEFAULT_SIZE[0], 16, 48) and out[1].shape == (3, 5, 16, 16)
    assert conds[0][0].media == str(tmp_path / "a.png")


IMG = _video((1, 16, 16))


@pytest.mark.parametrize("conds, exc, match", [
    ([[Condition(IMG, frame=9)]], ValueError, r"frame=9 is outside.*\[-9, 8\]"),
    ([[Condition(IMG, frame=-10)]], ValueError, "outside"),
    ([[Condition(_video((1, 16, 32)))]], ValueError, r"16x32.*16x16.*never resized"),
    ([[Condition(IMG, strength=1.5)]], ValueError, r"strength must be a number in \[0, 1\], got 1.5"),
    ([[Condition(IMG, strength=math.nan)]], ValueError, "strength"),
    ([[Condition(IMG, strength="1")]], TypeError, "strength"),
    ([[Condition(_video((13, 16, 16)))]], ValueError, "more than the 9"),
    ([[Condition(IMG), Condition(_video((5, 16, 16)))]], ValueError, r"conditions\[0\]\[1\] overlaps.*\[0\]\[0\]"),
    ([[Condition(IMG, frame=2)]], ValueError, r"frame=2 .*multiple of 4.*nearest valid: 0 or 4"),
    ([[Condition(IMG, frame=-2)]], ValueError, "multiple of 4"),
    ([[Condition(_video((5, 16, 16)), frame=8)]], ValueError, "run past the end"),
    ([[Condition(_video((3, 16, 16)))]], ValueError, r"3 frames; expected 1 \+ 4k"),
    ([[Condition(IMG * 2)]], ValueError, r"\[-1, 1\]"),
    ([[Condition(None)]], TypeError, "media"),
    ([[Condition(IMG, frame=1.0)]], TypeError, "frame must be an int"),
    ([[Condition(IMG)], []], TypeError, "list of 1"),
    ([Condition(IMG)], TypeError, r"conditions\[0\] must be a list"),
    ([[IMG]], TypeError, "must be a sora_fast.Condition"),
])
def test_generate_refuses_bad_conditions_before_any_work(tiny_pipeline, conds, exc, match):
    pipe, _ = tiny_pipeline
    calls = []
    enc = pipe.text_encoder.encode
    pipe.text_encoder.encode = lambda *a, **k: calls.append(1) or enc(*a, **k)
    with pytest.raises(exc, match=match):
        pipe.generate(["x"], (9, 16, 16), conditions=conds, steps=1)
    assert calls == []


def test_pack_videos_frame_rows_match_the_given_mask():
    """The sampler maps given latent frames to tokens through the packing's frame rows."""
    x = pack_videos([torch.zeros(4, 3, 4, 4), torch.zeros(4, 2, 2, 2)], patch=PATCH)
    ids = frame_ids(x)
    assert ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] + [4]


# --- CLI -------------------------------------------------------------------------------------------
def _write(tmp_path, name, clip):
    from sora_fast.data import write_video
    return write_video(tmp_path / name, clip, fps=8)




@pytest.mark.parametrize("flags, conds, size", [
    (["--image", "{img}"], lambda m: [Condition(m["img"], 0)], (9, 16, 32)),
    (["--video", "{clip}", "--extend", "forward"], lambda m: [Condition(m["clip"], 0)], (9, 16, 32)),
    (["--video", "{clip}", "--extend", "backward"], lambda m: [Condition(m["clip"], -5)], (9, 16, 32)),
    (["--keyframe", "{img}@0", "--keyframe", "{img2}@-1", "--size", "13x16x32"],
     lambda m: [Condition(m["img"], 0), Condition(m["img2"], -1)], (13, 16, 32)),
])
def test_cli_conditions_equal_the_api(tiny_pipeline, tmp_path, capsys, monkeypatch, flags, conds, size):
    pipe, path = tiny_pipeline
    media = {"img": str(_write(tmp_path, "img.png", _video((1, 16, 32), 1))),
             "img2": str(_write(tmp_path, "img2.png", _video((1, 16, 32), 2))),
             "clip": str(_write(tmp_path, "clip.gif", _video((5, 16, 32), 3)))}
    rc, written = run_generate_cli(monkeypatch, path, tmp_path, *[f.format(**media) for f in flags])
    assert rc == 0, capsys.readouterr().err
    c = conds(media)
    ref = pipe.generate(["a", "b"], size, conditions=[c, c], steps=2, guidance=4.0, seed=0)
    for name, r in zip(["00_a.gif", "01_b.gif"], ref):
        assert written[name].shape == (3, *size)
        torch.testing.assert_close(written[name], r, atol=2e-5, rtol=0)


@pytest.mark.parametrize("args, match", [
    (["--extend", "forward"], r"--extend needs --video PATH"),
    (["--video", "{clip}"], r"--video needs --extend forward\|backward"),
    (["--video", "{clip}", "--extend", "sideways"], r"invalid choice"),
    (["--image", "{img}", "--video", "{clip}", "--extend", "forward"], r"--image and --video"),
    (["--image", "{img}", "--edit", "{clip}", "--strength", "0.5"], r"--edit cannot be combined"),
    (["--image", "{clip}"], r"has 5 frames; give an image"),
    (["--image", "{img}", "--size", "9x16x16"], r"--image is 16x32 .* --size #1 9x16x16 .* never resized"),
    (["--keyframe", "{img}@9"], r"--keyframe .*@9: frame 9 is outside the video .*-9..8"),
    (["--keyframe", "{img}@-10"], r"outside the video"),
    (["--keyframe", "{img}"], r"a keyframe is PATH@FRAME"),
    (["--keyframe", "{img}@x"], r"a keyframe is PATH@FRAME"),
    (["--video", "{clip}", "--extend", "forward", "--size", "1x16x32"], r"has 5 frames, more than the 1"),
    (["--image", "{tmp}/missing.png"], r"--image: cannot read"),
    (["--image", "{img}", "--cfg-parallel"], r"--cfg-parallel needs 2 processes"),   # taken; needs torchrun
])
def test_cli_condition_arguments_are_checked_before_anything_loads(tmp_path, capsys, args, match):
    from sora_fast import cli
    img = _write(tmp_path, "img.png", _video((1, 16, 32), 1))
    clip = _write(tmp_path, "clip.gif", _video((5, 16, 32), 3))
    args = [a.format(img=img, clip=clip, tmp=tmp_path) for a in args]
    try:
        rc = cli.main(["generate", "--pipeline", str(tmp_path / "missing"), "--prompt", "a", "--out",
                       str(tmp_path / "o"), *args])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_cli_keyframe_off_a_latent_boundary_fails_before_generating(tiny_pipeline, tmp_path, capsys):
    from sora_fast import cli
    _, path = tiny_pipeline
    img = _write(tmp_path, "img.png", _video((1, 16, 32), 1))
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--keyframe", f"{img}@-2",
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and re.search(r"frame=-2 \(pixel frame 7\) must be a multiple of 4", capsys.readouterr().err)


def test_frame_sigmas_takes_the_videos_level_where_not_given():
    from sora_fast.sampling import frame_sigmas
    lv = torch.tensor([0.0, float("nan"), 0.3, float("nan")], dtype=torch.float64)
    assert frame_sigmas(torch.tensor(0.8, dtype=torch.float64), lv).tolist() == [0.0, 0.8, 0.3, 0.8]


def test_conditions_with_an_edit_at_strength_zero(tiny_pipeline, monkeypatch):
    """No step runs; the given frame holds the condition's latent, the others the edited video's."""
    pipe, _ = tiny_pipeline
    got = _capture_latents(pipe, monkeypatch)
    v, img = _video((9, 16, 16), 1), _video((1, 16, 16), 2)
    calls = []
    fwd = pipe.dit.forward
    pipe.dit.forward = lambda *a, **k: calls.append(1) or fwd(*a, **k)
    pipe.generate(["x"], init_videos=[v], strength=0.0, conditions=[[Condition(img, frame=-1)]], steps=3)
    lat = got[0][0]
    assert calls == []
    assert torch.equal(lat[:, 2:], _encode(pipe, img)) and torch.equal(lat[:, :2], _encode(pipe, v)[:, :2])
