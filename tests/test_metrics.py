"""Model-free metrics on rendered clips: a static clip is not dynamic and does not flicker, added noise flickers,
shuffled frames are less smooth, PSNR / SSIM are perfect on identical clips. OpenCV / scikit-image are the
``eval`` extra: tests that need them skip without them; without them the metrics say what to install."""
import numpy as np
import pytest

from sora_fast.data import world as W
from sora_fast.eval import metrics as M


def _clip(seed=1, scene="collision"):
    return W.render_world(W.sample_world(seed, scene))


def test_flow_metrics():
    v = _clip()
    static = np.repeat(v[:1], v.shape[0], 0)
    noisy = np.clip(v.astype(int) + np.random.default_rng(0).integers(-40, 41, v.shape), 0, 255).astype(np.uint8)
    assert M.dynamic_degree(v) == 1.0 and M.dynamic_degree(static) == 0.0
    assert M.temporal_flickering(static) == 1.0
    assert M.temporal_flickering(v) > 0.99 > M.temporal_flickering(noisy)
    shuffled = v[np.random.default_rng(1).permutation(v.shape[0])]
    assert M.motion_smoothness(v) > M.motion_smoothness(shuffled)
    assert 0.0 <= M.motion_smoothness(v) <= 1.0


def test_reference_metrics():
    v = _clip()
    noisy = np.clip(v.astype(int) + np.random.default_rng(0).integers(-20, 21, v.shape), 0, 255).astype(np.uint8)
    assert M.psnr(v, v) == 100.0 and M.ssim(v, v) == pytest.approx(1.0)
    assert 15 < M.psnr(noisy, v) < 40 and M.ssim(noisy, v) < 0.95
    with pytest.raises(ValueError, match="reference must have the clip's shape"):
        M.psnr(v, v[:-1])


def test_bad_input_and_missing_library_errors():
    with pytest.raises(ValueError, match="clip must have >= 2 frames"):
        M.dynamic_degree(np.zeros((1, 16, 16, 3), np.uint8))
    for name, why in M.missing_libraries().items():
        assert "sora-fast[eval]" in why
        with pytest.raises(ImportError, match="eval extra"):
            getattr(M, name)(*([_clip()] * (2 if name in ("psnr", "ssim") else 1)))
