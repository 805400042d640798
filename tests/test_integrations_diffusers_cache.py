"""accelerate() composes with diffusers' own step cache: a WanPipeline with ``transformer.enable_cache(
FirstBlockCacheConfig(...))`` after accelerate() skips the same steps as diffusers' cache alone and gives its
output up to fp32 rounding; enabling the cache first and accelerating after is refused, naming the block."""
import copy

import pytest
import torch
from _diffusers_utils import FP32_REL, tiny_wan_pipeline
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.hooks.first_block_cache import FBCHeadBlockHook
from test_dit import rel_err

from sora_fast.integrations.diffusers import accelerate


def _generate(pipe):
    return pipe(prompt=["a red ball rolls left", "blue cube falls"], negative_prompt="down", height=16, width=32,
                num_frames=5, num_inference_steps=8, guidance_scale=4.0, max_sequence_length=8,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames


@pytest.fixture
def fbc_log(monkeypatch):
    """(relative change, computed?) of every FirstBlockCache decision, as diffusers computes them."""
    log, original = [], FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        prev = self.state_manager.get_state().head_block_residual
        run = original(self, residual)
        if prev is not None:
            log.append((float((residual - prev).abs().mean() / prev.abs().mean()), run))
        return run

    monkeypatch.setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", spy)
    return log


def _cached(pipe, threshold, log):
    log.clear()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return _generate(pipe), list(log)


def test_accelerate_then_diffusers_first_block_cache_equals_the_cache_alone(fbc_log):
    pipe = tiny_wan_pipeline(two_experts=False)
    full = _generate(copy.deepcopy(pipe))
    # a threshold that skips some steps and that no relative change comes near (fp32 rounding moves them by
    # ~1e-6; a margin of 1e-3 of the threshold keeps every decision the same under accelerate)
    for threshold in (0.1, 0.15, 0.2, 0.3, 0.5, 0.8):
        cached, log = _cached(copy.deepcopy(pipe), threshold, fbc_log)
        if any(not run for _, run in log) and min(abs(d - threshold) for d, _ in log) > 1e-3 * threshold:
            break
    else:
        pytest.fail(f"no threshold both skips and keeps a margin: {log}")
    assert rel_err(cached, full) > 100 * FP32_REL          # skipped steps move the output far beyond rounding
    with accelerate(pipe):
        both, log_both = _cached(pipe, threshold, fbc_log)
        pipe.transformer.disable_cache()
    assert [run for _, run in log_both] == [run for _, run in log]
    assert both.shape == cached.shape and rel_err(both, cached) <= FP32_REL, rel_err(both, cached)


def test_cache_first_then_accelerate_is_refused():
    pipe = tiny_wan_pipeline(two_experts=False)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match=r"blocks.0 .*already has its forward replaced"):
        accelerate(pipe)
