"""generate(attention_window=...): a training-free local self-attention window on a pipeline trained dense. It is
the DiT's own windowed attention (DiTConfig.window) for the call only; a window covering the grid is dense; bad
values raise before any work; the CLI flag reaches it."""
import dataclasses
import json
import re

import pytest
import torch
from test_dit import rel_err

from sora_fast import cli
from sora_fast.models.dit import VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.models.vae import CausalVAE
from sora_fast.pipeline import VideoPipeline, local_attention

SIZE = (9, 48, 64)          # tiny VAE (4x time, 8x space), patch (1, 2, 2): a (3, 3, 4) patch grid
KW = dict(steps=3, guidance=3.0, seed=[5, 6])
PROMPTS = ["a red circle", "a blue square"]


def _pipe(window=None):
    torch.manual_seed(0)
    dit = VideoDiT.from_name("tiny", window=window)
    for p in dit.parameters():          # random everything: a zero-init head would make outputs trivial
        torch.nn.init.normal_(p, std=0.1)
    return VideoPipeline(dit, CausalVAE("tiny"), TinyTextEncoder(dim=dit.config.text_dim))


def test_window_is_the_dits_own_windowed_attention_for_the_call_only():
    pipe = _pipe()
    dense = pipe.generate(PROMPTS, SIZE, **KW)
    out = pipe.generate(PROMPTS, SIZE, **KW, attention_window=(0, 1, 1))
    trained = _pipe(window=(0, 1, 1))                   # the same weights, built with the window in its config
    trained.load_state_dict(pipe.state_dict())
    ref = trained.generate(PROMPTS, SIZE, **KW)
    for o, r, d in zip(out, ref, dense):
        assert torch.equal(o, r)
        assert rel_err(o, d) > 1e-2                     # a small window changes the video
    assert all(b.cfg is pipe.dit.config and b.cfg.window is None for b in pipe.dit.blocks)   # put back
    assert all(torch.equal(a, b) for a, b in zip(pipe.generate(PROMPTS, SIZE, **KW), dense))


@pytest.mark.parametrize("window", [(2, 2, 3), (10**9, 10**9, 10**9)], ids=["exact", "huge"])
def test_window_covering_the_grid_is_dense(window):
    pipe = _pipe()
    dense = pipe.generate(PROMPTS, SIZE, **KW)
    out = pipe.generate(PROMPTS, SIZE, **KW, attention_window=window)
    for o, d in zip(out, dense):
        assert rel_err(o, d) <= 1e-5                    # the same attention, blocked by frames: rounding only


def test_window_overrides_a_trained_window_and_none_keeps_it():
    pipe = _pipe(window=(0, 0, 0))
    own = pipe.generate(PROMPTS[:1], SIZE, **{**KW, "seed": 1})
    assert torch.equal(pipe.generate(PROMPTS[:1], SIZE, **{**KW, "seed": 1}, attention_window=None)[0], own[0])
    wider = pipe.generate(PROMPTS[:1], SIZE, **{**KW, "seed": 1}, attention_window=(9, 9, 9))
    assert rel_err(wider[0], own[0]) > 1e-2
    assert all(b.cfg.window == (0, 0, 0) for b in pipe.dit.blocks)


def test_generate_long_takes_the_window():
    """A rollout of one window is generate's video, windowed attention included."""
    pipe = _pipe()
    long = pipe.generate_long("a red circle", 9, window=9, overlap=1, size=SIZE[1:], steps=2, seed=4,
                              attention_window=(1, 0, 1))
    ref = pipe.generate(["a red circle"], SIZE, steps=2, seed=4, attention_window=(1, 0, 1))[0]
    assert torch.equal(long, ref)


@pytest.mark.parametrize("window,exc,got", [
    ("1,4,4", TypeError, "got str '1,4,4'"),
    ((1, 4), ValueError, r"got 2 values \(1, 4\)"),
    ((1, -4, 4), ValueError, r"got \(1, -4, 4\)"),
    ((1, 4.5, 4), TypeError, r"got \(1, 4\.5, 4\) \(a float\)"),
])
def test_bad_windows_raise_before_work(window, exc, got, monkeypatch):
    pipe = _pipe()
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda *a, **k: pytest.fail("work started"))
    expected = r"attention_window must be None or \(wt, wh, ww\): 3 ints >= 0, half-sizes in latent patches, "
    with pytest.raises(exc, match=expected + got):
        pipe.generate(PROMPTS, SIZE, **KW, attention_window=window)
    with pytest.raises(exc, match=expected + got):
        pipe.generate_long("x", 9, window=9, overlap=1, size=SIZE[1:], steps=1, attention_window=window)


def test_local_attention_restores_the_blocks_on_error():
    pipe = _pipe()
    with pytest.raises(RuntimeError, match="stop"):
        with local_attention(pipe.dit, (1, 1, 1)):
            assert all(b.cfg.window == (1, 1, 1) for b in pipe.dit.blocks)
            assert pipe.dit.config.window is None       # the model's config is never changed
            raise RuntimeError("stop")
    assert all(b.cfg is pipe.dit.config for b in pipe.dit.blocks)


def test_cli_attention_window(tmp_path, capsys):
    pipe = _pipe()
    path = pipe.save(tmp_path / "pipe")
    out = tmp_path / "gen"
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a red circle", "--size", "x".join(map(str, SIZE)),
                   "--steps", "2", "--seed", "3", "--attention-window", "0,1,1", "--format", "gif",
                   "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "generate.json").read_text())["attention_window"] == [0, 1, 1]
    for bad in ("1,4", "1,-1,1", "a,b,c"):
        with pytest.raises(SystemExit):
            cli.main(["generate", "--pipeline", str(path), "--prompt", "x", "--attention-window", bad])
        assert re.search(r"an attention window is WT,WH,WW: 3 ints >= 0 .* got " + re.escape(repr(bad)),
                         capsys.readouterr().err)


def test_dataclass_config_unchanged_by_generate():
    pipe = _pipe()
    before = dataclasses.asdict(pipe.dit.config)
    pipe.generate(PROMPTS[:1], SIZE, steps=1, attention_window=(0, 0, 0))
    assert dataclasses.asdict(pipe.dit.config) == before and pipe.describe()["dit"]["window"] is None
