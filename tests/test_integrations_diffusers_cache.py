"""accelerate() composes with diffusers' own step cache: a WanPipeline with ``transformer.enable_cache(
FirstBlockCacheConfig(...))`` after accelerate() gives diffusers' cached output (same skipped steps, fp32
rounding apart); enabling the cache first and accelerating after is refused, naming the hooked block."""
import copy

import pytest
import torch
from _diffusers_utils import FP32_REL, tiny_wan_pipeline
from diffusers.hooks import FirstBlockCacheConfig
from test_dit import rel_err

from sora_fast.integrations.diffusers import accelerate


def _generate(pipe):
    return pipe(prompt=["a red ball rolls left", "blue cube falls"], negative_prompt="down", height=16, width=32,
                num_frames=5, num_inference_steps=8, guidance_scale=4.0, max_sequence_length=8,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames


def test_accelerate_then_diffusers_first_block_cache_equals_the_cache_alone():
    pipe = tiny_wan_pipeline(two_experts=False)
    fresh = copy.deepcopy(pipe)           # diffusers leaves its hook registry on the blocks after disable_cache
    full = _generate(pipe)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    cached = _generate(pipe)
    # the cache skips steps: its output moves far more than fp32 rounding, so other skip decisions would show
    assert rel_err(cached, full) > 100 * FP32_REL
    pipe = fresh
    with accelerate(pipe):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        both = _generate(pipe)
        pipe.transformer.disable_cache()
    assert both.shape == cached.shape and rel_err(both, cached) <= FP32_REL, rel_err(both, cached)


def test_cache_first_then_accelerate_is_refused():
    pipe = tiny_wan_pipeline(two_experts=False)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match=r"blocks.0 .*already has its forward replaced"):
        accelerate(pipe)
