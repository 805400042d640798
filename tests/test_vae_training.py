"""VAE training from scratch and latent statistics (the demo's VAE stage)."""
import pytest
import torch

from sora_fast.models.vae import CausalVAE
from sora_fast.training.vae import VAETrainConfig, fit_latent_stats, focus_weights, lr_at, train_vae


def _videos():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(s, generator=g) * 2 - 1
            for s in [(3, 5, 16, 16), (3, 1, 16, 32), (3, 5, 16, 16), (3, 9, 16, 16)]]


def test_training_reduces_reconstruction_error_and_is_reproducible():
    videos = _videos()

    def run():
        torch.manual_seed(1)
        vae = CausalVAE("tiny")
        with torch.no_grad():
            before = sum((vae(v[None]) - v).square().mean().item() for v in videos)
        r = train_vae(vae, videos, VAETrainConfig(steps=25, lr=2e-3, batch_size=2, seed=3), progress=False)
        with torch.no_grad():
            after = sum((vae(v[None]) - v).square().mean().item() for v in videos)
        return before, after, r["losses"]

    before, after, losses = run()
    assert after < 0.8 * before, (before, after)
    assert run()[2] == losses          # same seed, same batches and losses


def test_learning_rate_warms_up_then_drops():
    """Per step, the rate the optimizer used: linear warm-up, the base rate, the dropped rate from
    ``lr_drop_at`` of the steps on (an odd step count puts the drop between two steps)."""
    vae = CausalVAE("tiny")
    cfg = VAETrainConfig(steps=11, lr=3e-3, warmup_steps=4, lr_drop_at=0.5, lr_drop=0.1, batch_size=1, seed=2)
    got = train_vae(vae, _videos(), cfg, progress=False)["lr"]
    expected = [3e-3 * (s + 1) / 4 if s < 4 else (3e-3 if s < 5.5 else 3e-4) for s in range(11)]
    assert got == pytest.approx(expected, rel=1e-12)
    constant = VAETrainConfig(steps=11, lr=3e-3, warmup_steps=0, lr_drop=1.0)
    assert [lr_at(constant, s) for s in range(11)] == [3e-3] * 11


def test_focus_weights_weigh_every_colour_by_its_largest_channel_difference():
    """A red and a white object on a dark background, per-pixel loops as the reference: a one-channel (red)
    difference of the same size as a three-channel (white) one gets the same weight."""
    g = torch.Generator().manual_seed(7)
    video = torch.full((2, 3, 3, 8, 10), -0.8)
    video[:, 0, :, 1:3, 1:4] = 0.8                      # red: R only
    video[:, :, :, 5:7, 5:9] = 0.8                      # white: R, G and B
    video += 0.01 * torch.randn(video.shape, generator=g)
    focus = 3.0
    got = focus_weights(video, focus)
    ref = torch.empty(2, 1, 3, 8, 10, dtype=torch.float64)
    for b in range(2):
        flat = video[b].double().flatten(1)
        bg = [sorted(flat[c].tolist())[(flat.shape[1] - 1) // 2] for c in range(3)]   # torch's lower median
        for t in range(3):
            for y in range(8):
                for x in range(10):
                    ref[b, 0, t, y, x] = 1 + focus * max(abs(video[b, c, t, y, x].item() - bg[c]) for c in range(3))
    ref /= ref.mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    red, white, dark = got[0, 0, 0, 1, 1].item(), got[0, 0, 0, 5, 5].item(), got[0, 0, 0, 0, 0].item()
    assert abs(red - white) < 0.05 * white and red > 3 * dark


def test_latent_stats_match_a_direct_computation():
    videos = _videos()
    vae = CausalVAE("tiny")
    mean, std = fit_latent_stats(vae, videos)
    with torch.no_grad():
        z = torch.cat([vae.encode(v[None])[0].flatten(1) for v in videos], dim=1).double()   # (C, all pixels)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), z.mean(1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), z.std(1, correction=0), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        zn = torch.cat([vae.normalize_latents(vae.encode(v[None]))[0].flatten(1) for v in videos], dim=1)
    torch.testing.assert_close(zn.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(zn.std(1, correction=0), torch.ones(4), atol=1e-5, rtol=1e-5)


def test_bad_input():
    vae = CausalVAE("tiny")
    with pytest.raises(ValueError, match=r"videos\[1\] has \(T, H, W\)=\(4, 16, 16\); the VAE needs T = 1 \+ 4k"):
        train_vae(vae, [torch.zeros(3, 1, 16, 16), torch.zeros(3, 4, 16, 16)], progress=False)
    with pytest.raises(ValueError, match=r"videos\[0\] must be a \(3, T, H, W\) tensor, got \(1, 1, 16, 16\)"):
        fit_latent_stats(vae, [torch.zeros(1, 1, 16, 16)])
    with pytest.raises(ValueError, match="non-empty list"):
        train_vae(vae, [], progress=False)
    with pytest.raises(ValueError, match="VAETrainConfig.batch_size must be an int >= 1"):
        VAETrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"VAETrainConfig.lr_drop must be a number in \(0, 1\], got 0"):
        VAETrainConfig(lr_drop=0)
    with pytest.raises(ValueError, match=r"VAETrainConfig.lr_drop_at must be a number in \[0, 1\], got 1.5"):
        VAETrainConfig(lr_drop_at=1.5)
