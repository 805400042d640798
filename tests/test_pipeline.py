"""VideoPipeline: packed multi-prompt generation equals one prompt at a time; save/load; size errors."""
import pytest
import torch

from sora_fast.models.dit import VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.models.vae import CausalVAE
from sora_fast.pipeline import VideoPipeline


def _pipe():
    dit = VideoDiT.from_name("tiny")
    for p in dit.parameters():          # random everything: a zero-init head would make outputs trivial
        torch.nn.init.normal_(p, std=0.1)
    vae = CausalVAE("tiny")
    return VideoPipeline(dit, vae, TinyTextEncoder(dim=dit.config.text_dim))


def test_prompts_at_different_sizes_in_one_call_equal_each_alone():
    pipe = _pipe()
    prompts, sizes = ["a red circle moving left", "blue square", "green"], [(5, 16, 32), (1, 32, 16), (9, 16, 16)]
    together = pipe.generate(prompts, sizes, steps=3, guidance=3.0, seed=[7, 8, 9])
    assert pipe.last_timings["text"] >= 0 and len(pipe.last_timings["steps"]) == 3
    for i, (p, s) in enumerate(zip(prompts, sizes)):
        alone = pipe.generate([p], [s], steps=3, guidance=3.0, seed=[7 + i])[0]
        assert together[i].shape == (3, *s)
        assert together[i].abs().max() <= 1
        torch.testing.assert_close(together[i], alone, atol=2e-5, rtol=0)
    # guidance changes the result (the unconditional branch is really used)
    other = pipe.generate(prompts[:1], sizes[:1], steps=3, guidance=1.0, seed=[7])[0]
    assert (other - together[0]).abs().max() > 1e-3


def test_save_load_round_trip(tmp_path):
    pipe = _pipe()
    ref = pipe.generate(["x"], (5, 16, 16), steps=2, seed=1)[0]
    pipe.save(tmp_path / "p")
    pipe.save(tmp_path / "p")                      # overwriting an existing pipeline is atomic too
    back = VideoPipeline.load(tmp_path / "p")
    assert torch.equal(back.generate(["x"], (5, 16, 16), steps=2, seed=1)[0], ref)
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == [
        "dit.safetensors", "pipeline.json", "text.safetensors", "vae.safetensors"]
    with pytest.raises(FileNotFoundError, match="pipeline.json is missing"):
        VideoPipeline.load(tmp_path / "nothing")


@pytest.mark.parametrize("size, match", [
    ((4, 16, 16), r"frames=4 must be 1 \+ 4k .*nearest valid: 1 or 5"),
    ((5, 20, 16), r"height=20 must be a multiple of 16 .*nearest valid: 16 or 32"),
    ((5, 16, 8), r"width=8 must be a multiple of 16"),
    ((5, 16), r"must be \(frames, height, width\)"),
])
def test_bad_sizes(size, match):
    with pytest.raises(ValueError, match=match):
        _pipe().generate(["x"], [size], steps=1)


def test_mismatched_models():
    dit = VideoDiT.from_name("tiny")
    with pytest.raises(ValueError, match="must equal the VAE's latent channels"):
        VideoPipeline(dit, CausalVAE("demo"), TinyTextEncoder(dim=dit.config.text_dim))
    with pytest.raises(ValueError, match="text_dim=32 must equal the text encoder's dim=16"):
        VideoPipeline(dit, CausalVAE("tiny"), TinyTextEncoder(dim=16))


def test_sizes_default_to_the_default_size_or_the_init_videos():
    pipe = _pipe()
    assert pipe.generate(["x"], steps=1, guidance=1.0)[0].shape == (3, *VideoPipeline.DEFAULT_SIZE) == (3, 9, 32, 32)
    init = torch.zeros(3, 5, 16, 32)
    out = pipe.generate(["x", "y"], [None, (1, 16, 16)], init_videos=[init, None], strength=[0.5, 1.0], steps=2)
    assert [tuple(o.shape) for o in out] == [(3, 5, 16, 32), (3, 1, 16, 16)]
    steps = []
    pipe.generate(["x"], init_videos=[init], strength=0.5, steps=4, progress=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 2), (2, 2)]                       # only the remaining steps run
