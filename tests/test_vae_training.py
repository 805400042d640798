"""VAE training from scratch and latent statistics (the demo's VAE stage)."""
import pytest
import torch

from sora_fast.models.vae import CausalVAE
from sora_fast.training.vae import VAETrainConfig, fit_latent_stats, train_vae


def _videos():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(s, generator=g) * 2 - 1 for s in [(3, 5, 16, 16), (3, 1, 16, 32), (3, 5, 16, 16), (3, 9, 16, 16)]]


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
