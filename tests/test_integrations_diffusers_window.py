"""accelerate(window=...) on diffusers' Wan transformer: training-free local self-attention against diffusers'
own Wan attention given an explicit boolean 3D window mask; a window covering the grid is dense; None changes
nothing; bad windows and unsupported models raise before anything is patched."""
import _diffusers_utils
import pytest
import torch
from _diffusers_utils import (
    FP32_REL,
    assert_same_state,
    input_and_param_grads,
    run,
    state,
    tiny_cogvideox,
    tiny_hunyuan,
    tiny_ltx,
    tiny_vae,
    tiny_wan,
    tiny_wan_pipeline,
    wan_inputs,
)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor as DiffusersWanAttnProcessor
from test_dit import rel_err

from sora_fast.integrations.diffusers import accelerate

calls, kernels = _diffusers_utils.calls, _diffusers_utils.kernels  # the shared fixtures


def window_mask(grid, window) -> torch.Tensor:
    """``(S, S)`` bool, True where query i may attend key j: |dt|, |dh|, |dw| within the half-sizes, each
    token's (t, h, w) read from diffusers' t-major flattening of the (T', H', W') patch grid."""
    t, h, w = grid
    i = torch.arange(t * h * w)
    thw = torch.stack([i // (h * w), i // w % h, i % w], dim=1)               # (S, 3)
    return ((thw[:, None, :] - thw[None, :, :]).abs() <= torch.tensor(window)).all(dim=-1)


class MaskedSelfAttention:
    """diffusers' own ``WanAttnProcessor`` with a boolean mask on the self-attention (its SDPA ``attn_mask``)."""

    def __init__(self, mask: torch.Tensor):
        self.inner, self.mask = DiffusersWanAttnProcessor(), mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            attention_mask = self.mask
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


class masked_self_attention:
    """Every self-attention of the given Wan transformers masked to ``window`` on ``grid`` while inside."""

    def __init__(self, models, grid, window):
        self.models, self.mask = models, window_mask(grid, window)

    def __enter__(self):
        self.saved = [(b.attn1, b.attn1.processor) for m in self.models for b in m.blocks]
        for attn, _ in self.saved:
            attn.processor = MaskedSelfAttention(self.mask)

    def __exit__(self, *exc):
        for attn, proc in self.saved:
            attn.processor = proc


def grid_of(kw, patch=(1, 2, 2)):
    _, _, t, h, w = kw["hidden_states"].shape
    return (t // patch[0], h // patch[1], w // patch[2])


@pytest.mark.parametrize("variant,window", [
    ("t2v", (0, 1, 1)), ("t2v", (1, 0, 2)), ("t2v", (2, 1, 0)), ("i2v", (1, 1, 1)), ("kernels", (0, 1, 2)),
])
def test_wan_window_matches_masked_diffusers_attention(variant, window, calls, kernels):
    model_kw, input_kw, backend = {}, {}, None
    if variant == "i2v":   # the image branch is cross-attention: dense
        model_kw, input_kw = dict(image_dim=20, added_kv_proj_dim=24), dict(text_len=512, image_tokens=5)
    if variant == "kernels":
        backend, input_kw = {"attention": "triton", "adaln": "cuda"}, dict(thw=(3, 4, 6))
    m = tiny_wan(layers=2, **model_kw)
    kw = wan_inputs(**input_kw)
    grid = grid_of(kw)
    dense = run(m, **kw)
    with masked_self_attention([m], grid, window):
        ref = run(m, **kw)
    assert rel_err(ref, dense) > 1e-3                          # the window changes the output
    before = state(m)
    with accelerate(m, window=window, backend=backend) as handle:
        calls.clear()
        out = run(m, **kw)
        assert f"window {window}" in handle.choices["WanTransformer3DModel.attention"]
    assert calls.count("spacetime_attention+rope") == 2 and calls.count("spacetime_attention") >= 2  # self, cross
    assert rel_err(out, ref) <= FP32_REL, rel_err(out, ref)
    if backend is not None:
        assert ("spacetime_attention", "triton") in kernels
    assert_same_state(state(m), before)


def test_wan_window_gradients_match_masked_attention():
    m = tiny_wan()
    kw = wan_inputs(thw=(3, 4, 6))
    x = kw.pop("hidden_states").requires_grad_(True)
    window = (1, 0, 1)

    with masked_self_attention([m], (3, 2, 3), window):
        ref = input_and_param_grads(m, x, kw)
    with accelerate(m, window=window):
        got = input_and_param_grads(m, x, kw)
    for r, g in zip(ref, got):
        assert rel_err(g, r) <= FP32_REL


@pytest.mark.parametrize("window", [(2, 2, 4), (10**9, 10**9, 10**9)], ids=["exact", "huge"])
def test_wan_window_covering_the_grid_is_dense(window):
    m = tiny_wan(layers=2)
    kw = wan_inputs(thw=(3, 6, 10))                            # grid (3, 3, 5)
    ref = run(m, **kw)
    with accelerate(m):
        dense = run(m, **kw)
    with accelerate(m, window=window):
        out = run(m, **kw)
    assert rel_err(out, ref) <= FP32_REL
    assert rel_err(out, dense) <= 1e-6                         # the same math, blocked by frames: rounding only


def test_wan_window_none_changes_nothing():
    m = tiny_wan(layers=2)
    kw = wan_inputs(thw=(2, 4, 6))
    with accelerate(m) as handle:
        out = run(m, **kw)
        default_choices, default_patched = dict(handle.choices), list(handle.patched)
        procs = {id(b.attn1.processor) for b in m.blocks} | {id(b.attn2.processor) for b in m.blocks}
    assert len(procs) == 1                                     # one processor for self- and cross-attention
    with accelerate(m, window=None) as handle:
        assert torch.equal(run(m, **kw), out)
        assert handle.choices == default_choices and handle.patched == default_patched
        assert not any("self-attention window" in v for v in handle.choices.values())


@pytest.mark.parametrize("window,exc,got", [
    ("1,4,4", TypeError, "got str '1,4,4'"),
    (3, TypeError, "got int 3"),
    ((1, 2), ValueError, r"got 2 values \(1, 2\)"),
    ((1, 2, 3, 4), ValueError, r"got 4 values"),
    ((1, -1, 2), ValueError, r"got \(1, -1, 2\)"),
    ((1, 2.0, 2), TypeError, r"got \(1, 2\.0, 2\) \(a float\)"),
    ((True, 1, 1), TypeError, r"got \(True, 1, 1\) \(a bool\)"),
])
def test_bad_windows_raise_before_patching(window, exc, got):
    m = tiny_wan(layers=1)
    before = state(m)
    with pytest.raises(exc, match=r"window must be None or \(wt, wh, ww\): 3 ints >= 0, half-sizes in latent "
                                  r"patches, " + got):
        accelerate(m, window=window)
    assert_same_state(state(m), before)


@pytest.mark.parametrize("build,name", [(tiny_hunyuan, "HunyuanVideoTransformer3DModel"),
                                        (tiny_ltx, "LTXVideoTransformer3DModel"),
                                        (tiny_cogvideox, "CogVideoXTransformer3DModel")])
def test_window_refused_for_other_models(build, name):
    m = build()
    before = state(m)
    with pytest.raises(ValueError, match=rf"window is supported for WanTransformer3DModel \(Wan 2.1 / 2.2 "
                                         rf"self-attention\) only, not for {name}; accelerate it with window=None"):
        accelerate(m, window=(1, 1, 1))
    assert_same_state(state(m), before)


def test_window_needs_a_wan_transformer_and_attention():
    with pytest.raises(ValueError, match=r"window=\(1, 1, 1\) needs a WanTransformer3DModel to window; got "
                                         r"AutoencoderKLWan \(AutoencoderKLWan\)"):
        accelerate(tiny_vae(_diffusers_utils.SMALL_VAE), window=(1, 1, 1))
    with pytest.raises(ValueError, match=r"window=\(1, 1, 1\) needs attention=True"):
        accelerate(tiny_wan(layers=1), window=[1, 1, 1], attention=False)


def test_window_needs_the_latent_grid():
    """A self-attention called with plain cos/sin tables (no grid: a split sequence, a hand-made call) cannot
    place its tokens: refused, not silently dense."""
    m = tiny_wan(layers=1)
    attn = m.blocks[0].attn1
    rope = m.rope(torch.randn(1, 4, 2, 6, 8))
    with accelerate(m, norms=False, window=(0, 1, 1)):
        with pytest.raises(ValueError, match=r"a window \(0, 1, 1\) needs the whole latent grid .* got plain "
                                             r"cos/sin tables for 24 tokens"):
            attn(torch.randn(1, 24, 24), None, None, rope)


def test_wan_pipeline_window_both_experts():
    """A Wan 2.2 A14B-style pipeline (two experts, the VAE): both transformers windowed, the VAE accelerated as
    without a window, the whole generation equal to diffusers' with masked self-attention."""
    pipe = tiny_wan_pipeline()
    window = (0, 1, 1)

    def generate():
        return pipe(prompt=["a red ball rolls left", "blue cube falls"], negative_prompt="down", height=32,
                    width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=8,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames

    dense = generate()
    with masked_self_attention([pipe.transformer, pipe.transformer_2], (2, 2, 3), window):   # latents 2x4x6
        ref = generate()
    assert rel_err(ref, dense) > 1e-3
    with accelerate(pipe, window=window) as handle:
        out = generate()
        for name in ("transformer", "transformer_2"):
            assert "self-attention window (0, 1, 1)" in handle.choices[f"{name}.attention"]
        assert not any("self-attention window" in v for k, v in handle.choices.items() if k.startswith("vae"))
        assert [p for p in handle.patched if "window" in p] == [
            f"{n}: 4 attention processors (RoPE fused; self-attention window (0, 1, 1), cross-attention dense)"
            for n in ("transformer", "transformer_2")]
    assert rel_err(out, ref) <= FP32_REL, rel_err(out, ref)


def test_wan_window_fullgraph_compile():
    """torch.compile(fullgraph=True) of the windowed model equals its eager output (the grid is made in the
    graph: no cached tensor enters it)."""
    m = tiny_wan(layers=2)
    kw = wan_inputs(thw=(3, 4, 6))
    accelerate(m, window=(1, 0, 1))
    eager = run(m, **kw)
    torch._dynamo.reset()
    try:
        out = torch.compile(lambda: run(m, **kw), fullgraph=True, backend="aot_eager")()
    finally:
        torch._dynamo.reset()
    assert rel_err(out, eager) <= FP32_REL, rel_err(out, eager)
