"""System benchmarks measurable on a CPU, each reported as a ratio of two paths timed in one run.

Seven measurements, fp32, every one checked for correctness before it is timed (a row whose check fails
is reported as failed and its timings are not written):

1. ``packed``: VideoDiT forward+backward on a mixed-resolution batch (an image and two videos of
   different sizes and lengths, latent sizes of Wan's VAE: 4x time, 8x space; patch (1, 2, 2)) as one
   packed stream, against the same weights on a padded dense batch: every video's tokens padded to the
   longest, self-attention with a key-padding mask (same math as the packed reference attention: fp32
   scores, masked logsumexp). Outputs of real tokens and every parameter gradient must match. Reports
   useful (real) tokens/s of both and packed/padded.
2. ``diffusers``: VideoDiT against diffusers' ``WanTransformer3DModel`` with the same converted random
   weights, forward latency (no grad) for one video and a batch of same-size videos, and the max
   relative difference of the outputs.
3. ``mixed``: the same two models on videos of different sizes: VideoDiT one packed forward, diffusers
   one forward per size (same-size videos batched, as a user must); every output checked. Two batches: the
   ``packed`` section's three videos (large, compute-bound), eight small clips in six sizes, and fifteen
   clips of the demo's training-batch shapes in nine sizes.
4. ``train``: one training step (forward, per-video MSE loss averaged over the videos, backward, fused
   AdamW) of each model from the same weights, on a batch of same-size videos and on the three mixed-size
   batches (diffusers: one forward and backward per size, gradients accumulated, one AdamW step). Checked first:
   the outputs, the loss and every parameter gradient (diffusers' mapped to VideoDiT's layout).
5. ``cfg``: ``sample_euler`` with packed classifier-free guidance (conditional and unconditional
   copies in one forward of 2B videos) against the same sampler whose denoiser runs two forwards of B
   videos; the final latents must match. Reports ms per sampling step and the ratio.
6. ``vae``: ``CausalVAE.decode`` against diffusers' ``AutoencoderKLWan.decode`` (same tiny random
   weights) for several output frame counts: peak live tensor storage during the call (counted
   deterministically by a dispatch-mode storage tracker), the working memory (peak minus the output),
   decode time, and the max relative difference.
7. ``sdpa``: the per-call choice of the eager attention path (``sora_fast.reference.attention._attend``):
   torch's fused CPU SDPA against the explicit math (scores, softmax, weighted values) on the demo's
   self- and cross-attention shapes and longer sequences, forward (no grad) and forward + backward; the
   outputs and gradients must match. Reports which of the two the eager path takes at this thread count.
8. ``gelu``: the FFN's tanh GELU, torch's ``F.gelu(approximate="tanh")`` against
   :func:`sora_fast.models.activations.gelu_tanh` (the same function through ``sigmoid``) at the FFN shapes of
   the demo and of the rows above, forward (no grad) and forward + backward. Checked first against fp64: our
   error at most twice torch's own fp32 error plus 1e-6, values and gradients. Reports GB/s of the forward
   (one read, one write).

Timing: the two paths are interleaved in one process (CPU timings are only compared within a run),
warm-up runs first, and the median of ``--reps`` repetitions is reported (``ratio_of_min``: the same
ratio from each path's fastest repetition). Ratios are peer / sora_fast time (> 1: sora_fast's path is
faster; for ``packed`` the padded baseline is the peer) and peer / sora_fast peak memory.

    python bench/bench_system.py [--quick] [--threads 1] [--only packed,...,sdpa,gelu] [--json P]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from sora_fast.bench import args as cli
from sora_fast.bench.report import versions, write_csv, write_json
from sora_fast.bench.timing import time_interleaved

SECTIONS = ("packed", "diffusers", "mixed", "train", "cfg", "vae", "sdpa", "gelu")
TF, SF = 4, 8  # Wan VAE: 4x time, 8x space
PATCH = (1, 2, 2)
REL_TOL = 1e-4  # fp32 max|a - b| / max|b| for model outputs and gradients (fp32 rounding is ~1e-6)


# --- sizes ---------------------------------------------------------------------------------------------
def settings(quick: bool) -> dict:
    """Model and input sizes. Pixel videos ``(T, H, W)``; latents follow Wan's VAE factors."""
    if quick:
        return dict(dit=dict(heads=2, head_dim=64, layers=1, ffn=256, text_dim=32, in_ch=4),
                    videos=[(1, 64, 64), (5, 48, 80), (9, 48, 48)], text_len=8,
                    same_size=(5, 48, 48), batch=2, cfg_steps=1,
                    mixes=[[(1, 64, 64), (5, 48, 80), (5, 48, 80)], [(1, 32, 32), (5, 32, 48), (1, 32, 32)]],
                    vae=dict(base_dim=8, hw=4, frames=(5, 9)), reps=1, warmup=0,
                    sdpa=[(4, 2, 24, 24, 32), (4, 2, 24, 5, 32)], gelu=[(64, 256)])
    return dict(dit=dict(heads=4, head_dim=64, layers=2, ffn=1024, text_dim=64, in_ch=16),
                videos=[(1, 256, 256), (17, 192, 320), (33, 192, 192)], text_len=16,
                same_size=(9, 192, 192), batch=4, cfg_steps=1,
                # the packed section's three videos (2,752 tokens, compute-bound); eight small clips in six sizes
                # (1,304 tokens); and a batch shaped as the demo's training batches: fifteen clips of 1 to 5 latent
                # frames of 8x8, 8x12 or 12x8 in nine sizes (16 to 120 tokens each), where the fixed work of one
                # diffusers call per size weighs most
                mixes=[[(1, 256, 256), (17, 192, 320), (33, 192, 192)],
                       [(1, 128, 128), (5, 128, 192), (9, 96, 96), (9, 128, 128), (5, 192, 128), (17, 96, 160),
                        (9, 128, 128), (1, 128, 128)],
                       [(t, h, w) for t in (1, 9, 17) for h, w in ((64, 64), (64, 96), (96, 64))]
                       + [(17, 64, 96), (9, 96, 64), (17, 96, 64), (9, 64, 64), (17, 64, 64), (1, 64, 96)]],
                vae=dict(base_dim=8, hw=8, frames=(9, 17, 33)), reps=7, warmup=1,
                # (batch, heads, Lq, Lk, head dim): the demo's self-attention (48 and 120 tokens) and cross-attention
                # (7 text tokens), then the diffusers rows' 432 tokens and a longer sequence
                sdpa=[(37, 4, 48, 48, 32), (9, 4, 120, 120, 32), (10, 4, 120, 7, 32), (4, 4, 432, 432, 64),
                      (4, 4, 432, 16, 64), (1, 4, 1296, 1296, 64)],
                # (rows, hidden) of the FFN activation: the demo's batch (1,152 tokens, ffn 384), one and four
                # 9x192x192 videos of the rows above (ffn 1024)
                gelu=[(1152, 384), (432, 1024), (1728, 1024)])


def latent_shape(thw) -> tuple[int, int, int]:
    t, h, w = thw
    return (1 + (t - 1) // TF, h // SF, w // SF)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# Timing: sora_fast.bench.timing.time_interleaved (median and fastest of interleaved repetitions).


# --- models --------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Every parameter random and O(1)-scaled (zero gates or tables would hide differences)."""
    for name, p in model.named_parameters():
        if "scale_shift_table" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def make_dits(cfg: dict, seed: int = 0):
    """A random diffusers WanTransformer3DModel and VideoDiT.from_diffusers of it."""
    from diffusers import WanTransformer3DModel

    from sora_fast.models.dit import VideoDiT

    m = WanTransformer3DModel(patch_size=PATCH, num_attention_heads=cfg["heads"], attention_head_dim=cfg["head_dim"],
                              in_channels=cfg["in_ch"], out_channels=cfg["in_ch"], text_dim=cfg["text_dim"],
                              freq_dim=64, ffn_dim=cfg["ffn"], num_layers=cfg["layers"], cross_attn_norm=True,
                              eps=1e-6)
    randomize(m, torch.Generator().manual_seed(seed)).eval()
    return m, VideoDiT.from_diffusers(m).eval()


def dit_desc(dit) -> str:
    c = dit.config
    return f"dim {c.dim}, {c.num_heads} heads x {c.head_dim}, {c.num_layers} layers, ffn {c.ffn_dim}"


# --- 1. packed vs padded -------------------------------------------------------------------------------
def _dense_attention(attn, y, kv, b, lq, lk, key_mask, coords, theta):
    """The packed model's attention (``Attention.forward`` + the reference attention math) on a padded
    dense batch: y ``(B*Lq, D)``, kv ``(B*Lk, D)``, key_mask ``(B, Lk)`` bool (False = padding)."""
    from sora_fast.ops import apply_rope3d_ref

    v = attn.to_v(kv).unflatten(1, (attn.num_heads, -1))                  # (B*Lk, H, d)
    q = attn._rms(attn.norm_q, attn.to_q(y), v.dtype)                     # (B*Lq, H, d)
    k = attn._rms(attn.norm_k, attn.to_k(kv), v.dtype)                    # (B*Lk, H, d)
    if coords is not None:
        q, k = apply_rope3d_ref(q, coords, theta=theta), apply_rope3d_ref(k, coords, theta=theta)
    h, d = q.shape[1], q.shape[2]
    q = q.view(b, lq, h, d).transpose(1, 2)                               # (B, H, Lq, d)
    k = k.view(b, lk, h, d).transpose(1, 2)                               # (B, H, Lk, d)
    v = v.view(b, lk, h, d).transpose(1, 2)                               # (B, H, Lk, d)
    s = (q @ k.transpose(-1, -2)) * d**-0.5                               # (B, H, Lq, Lk)
    s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))
    o = (p @ v).transpose(1, 2).reshape(b * lq, h * d)                    # (B*Lq, D)
    return attn.to_out(o)


def _pad_index(packed, length: int) -> torch.Tensor:
    """Row of each packed token in a ``(B*length, ...)`` padded layout: ``(N,)`` int64."""
    ids = packed.seq_ids.long()
    local = torch.arange(packed.num_tokens) - packed.cu_seqlens.long()[ids]
    return ids * length + local


def padded_forward(dit, x, timesteps, text):
    """VideoDiT.forward on a padded batch: every video padded to the longest (text likewise), the same
    weights and per-token ops, dense masked attention. Returns ``(out (B*L, F), rows of real tokens)``."""
    from sora_fast import ops

    c, b = dit.config, x.num_sequences
    lv, lt = x.max_seqlen, text.max_seqlen
    pos, tpos = _pad_index(x, lv), _pad_index(text, lt)
    tokens = x.tokens.new_zeros(b * lv, x.tokens.shape[1]).index_copy(0, pos, x.tokens)       # (B*Lv, F)
    coords = x.coords.new_zeros(b * lv, 3).index_copy(0, pos, x.coords)                        # (B*Lv, 3)
    ttok = text.tokens.new_zeros(b * lt, text.tokens.shape[1]).index_copy(0, tpos, text.tokens)  # (B*Lt, Dt)
    ids = torch.arange(b, dtype=torch.int32).repeat_interleave(lv)                             # (B*Lv,)
    vmask = torch.arange(lv)[None] < torch.tensor(x.seqlens)[:, None]                          # (B, Lv)
    tmask = torch.arange(lt)[None] < torch.tensor(text.seqlens)[:, None]                       # (B, Lt)

    from sora_fast.models.dit import timestep_embedding
    h = dit.patch_embed(tokens)                                                                 # (B*Lv, D)
    context = dit.text_embed(ttok)                                                              # (B*Lt, D)
    temb = dit.time_embed(timestep_embedding(timesteps, c.freq_dim))                            # (B, D)
    t6 = dit.time_proj(F.silu(temb)).unflatten(1, (6, c.dim))                                   # (B, 6, D)
    mods = [blk.modulation(t6) for blk in dit.blocks]                                           # L x (6, B, D)
    out_mod = (dit.scale_shift_table[:, None].float() + temb.float()).contiguous()              # (2, B, D)
    norms = [m[:2] for m in mods[1:]] + [out_mod]
    y = ops.adaln_modulate(h, mods[0][0], mods[0][1], ids, eps=c.eps)                           # (B*Lv, D)
    for blk, mod, (shift, scale) in zip(dit.blocks, mods, norms):
        _, _, gate1, shift2, scale2, gate2 = mod.unbind(0)
        zero, one = torch.zeros_like(gate1), torch.ones_like(gate1)
        a = _dense_attention(blk.attn1, y, y, b, lv, lv, vmask, coords, c.rope_theta)
        h, y = ops.gated_residual_adaln(h, a, gate1, zero, zero, ids, weight=blk.norm2.weight,
                                        bias=blk.norm2.bias, eps=c.eps)
        a = _dense_attention(blk.attn2, y, context, b, lv, lt, tmask, None, c.rope_theta)
        h, y = ops.gated_residual_adaln(h, a, one, shift2, scale2, ids, eps=c.eps)
        h, y = ops.gated_residual_adaln(h, blk.ffn(y), gate2, shift, scale, ids, eps=c.eps)
    return dit.proj_out(y), pos


def bench_packed(s: dict, dit, gen) -> list[dict]:
    from sora_fast.packing import pack_sequences, pack_videos

    c = dit.config
    lat = [torch.randn(c.in_channels, *latent_shape(v), generator=gen) for v in s["videos"]]
    x = pack_videos(lat, PATCH)
    b = x.num_sequences
    text = pack_sequences([torch.randn(s["text_len"] + 3 * i, c.text_dim, generator=gen) for i in range(b)])
    t = torch.rand(b, generator=gen) * 1000
    g = torch.randn(x.num_tokens, c.out_channels * c.patch_volume, generator=gen)  # d(loss)/d(out)
    params = [p for p in dit.parameters()]

    def packed_step():
        dit.zero_grad(set_to_none=True)
        out = dit(x, t, text)
        (out * g).sum().backward()
        return out

    def padded_step():
        dit.zero_grad(set_to_none=True)
        out, pos = padded_forward(dit, x, t, text)
        out = out[pos]
        (out * g).sum().backward()
        return out

    with torch.enable_grad():
        out_p = packed_step().detach()
        grads_p = [p.grad.clone() for p in params]
        out_d = padded_step().detach()
        grads_d = [p.grad.clone() for p in params]
    err_out = rel_err(out_d, out_p)
    err_grad = max(rel_err(a, b_) for a, b_ in zip(grads_d, grads_p))
    passed = err_out <= REL_TOL and err_grad <= REL_TOL
    padded_tokens = b * x.max_seqlen
    row = dict(section="packed", case="fwd+bwd mixed batch", model=dit_desc(dit),
               shapes=f"pixels (T,H,W) {s['videos']} -> latents {[latent_shape(v) for v in s['videos']]} "
                      f"x {c.in_channels} ch, patch {PATCH}, text {text.seqlens}",
               tokens_real=x.num_tokens, tokens_padded=padded_tokens,
               padding_waste=1 - x.num_tokens / padded_tokens,
               attn_work_ratio=b * x.max_seqlen**2 / sum(n * n for n in x.seqlens),  # padded / packed scores
               max_rel_err_out=err_out, max_rel_err_grad=err_grad,
               passed=passed)
    if passed:
        with torch.enable_grad():
            ts = time_interleaved({"packed": packed_step, "padded": padded_step}, s["reps"], s["warmup"])
        row.update(ms_packed=1e3 * ts["packed"], ms_padded=1e3 * ts["padded"],
                   tok_s_packed=x.num_tokens / ts["packed"], tok_s_padded=x.num_tokens / ts["padded"],
                   ratio=ts["padded"] / ts["packed"], ratio_of_min=ts["min:padded"] / ts["min:packed"])
    dit.zero_grad(set_to_none=True)
    return [row]


# --- 2. VideoDiT vs diffusers ------------------------------------------------------------------------------
def bench_diffusers(s: dict, wan, dit, gen) -> list[dict]:
    c = dit.config
    rows = []
    for n in (1, s["batch"]):
        lat = [torch.randn(c.in_channels, *latent_shape(s["same_size"]), generator=gen) for _ in range(n)]
        txt = [torch.randn(s["text_len"], c.text_dim, generator=gen) for _ in range(n)]
        t = torch.rand(n, generator=gen) * 1000
        hs, enc = torch.stack(lat), torch.stack(txt)

        def ours():
            return torch.stack(dit.forward_videos(lat, t, txt))

        def theirs():
            return wan(hs, t, enc, return_dict=False)[0]

        with torch.no_grad():
            err = rel_err(ours(), theirs())
            passed = err <= REL_TOL
            row = dict(section="diffusers", case=f"forward, {n} video{'s' if n > 1 else ''}", model=dit_desc(dit),
                       shapes=f"{n} x pixels {s['same_size']} -> latent {latent_shape(s['same_size'])} x "
                              f"{c.in_channels} ch, text {s['text_len']}",
                       tokens_real=n * math.prod(latent_shape(s["same_size"])) // math.prod(PATCH),
                       max_rel_err_out=err, passed=passed)
            if passed:
                ts = time_interleaved({"ours": ours, "diffusers": theirs}, s["reps"], s["warmup"])
                row.update(ms_ours=1e3 * ts["ours"], ms_diffusers=1e3 * ts["diffusers"],
                           ratio=ts["diffusers"] / ts["ours"], ratio_of_min=ts["min:diffusers"] / ts["min:ours"])
        rows.append(row)
    return rows


# --- 3. mixed sizes: one packed forward vs one diffusers forward per size ---------------------------------
def _size_groups(latents) -> list[list[int]]:
    """Indices of the latents of each distinct shape, in order of first appearance (diffusers batches only
    latents of one shape)."""
    groups: dict = {}
    for i, x in enumerate(latents):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def _diffusers_by_size(wan, lat, t, txt) -> list[torch.Tensor]:
    """diffusers on latents of different sizes: one forward per shape, outputs in the latents' order."""
    out = [None] * len(lat)
    for g in _size_groups(lat):
        o = wan(torch.stack([lat[i] for i in g]), t[g], torch.stack([txt[i] for i in g]), return_dict=False)[0]
        for j, i in enumerate(g):
            out[i] = o[j]
    return out


def _mixed_inputs(s: dict, mix: list, c, gen):
    lat = [torch.randn(c.in_channels, *latent_shape(v), generator=gen) for v in mix]
    txt = [torch.randn(s["text_len"], c.text_dim, generator=gen) for _ in lat]
    return lat, txt, torch.rand(len(lat), generator=gen) * 1000


def _mixed_shapes(s: dict, mix: list, c) -> str:
    return f"pixels {mix} -> latents {[latent_shape(v) for v in mix]} x {c.in_channels} ch, text {s['text_len']}"


def bench_mixed(s: dict, wan, dit, gen) -> list[dict]:
    return [_mixed_row(s, mix, wan, dit, gen) for mix in s["mixes"]]


def _mixed_row(s: dict, mix: list, wan, dit, gen) -> dict:
    c = dit.config
    lat, txt, t = _mixed_inputs(s, mix, c, gen)

    def ours():
        return dit.forward_videos(lat, t, txt)

    def theirs():
        return _diffusers_by_size(wan, lat, t, txt)

    with torch.no_grad():
        err = max(rel_err(a, b) for a, b in zip(ours(), theirs()))
        row = dict(section="mixed", case=f"forward, {len(lat)} videos, {len(_size_groups(lat))} sizes",
                   model=dit_desc(dit), shapes=_mixed_shapes(s, mix, c),
                   tokens_real=sum(math.prod(x.shape[1:]) for x in lat) // math.prod(PATCH),
                   diffusers_forwards=len(_size_groups(lat)), max_rel_err_out=err, passed=err <= REL_TOL)
        if row["passed"]:
            ts = time_interleaved({"ours": ours, "diffusers": theirs}, s["reps"], s["warmup"])
            row.update(ms_ours=1e3 * ts["ours"], ms_diffusers=1e3 * ts["diffusers"],
                       ratio=ts["diffusers"] / ts["ours"], ratio_of_min=ts["min:diffusers"] / ts["min:ours"])
    return row


# --- 4. a training step vs diffusers' transformer trained the same way --------------------------------------
def _grads_as_videodit(wan, config) -> dict:
    """diffusers' parameter gradients in VideoDiT's names and layouts (the weight conversion is a renaming and
    re-arrangement, so it maps gradients the same way)."""
    from sora_fast.models.convert import convert_wan_transformer_state_dict

    return convert_wan_transformer_state_dict({n: p.grad for n, p in wan.named_parameters()
                                               if p.grad is not None}, config)


def _train_row(s: dict, case: str, shapes: str, wan, dit, lat, t, txt) -> dict:
    """Check one step's outputs, loss and gradients of both models (same weights), then time whole steps
    (zero_grad, forward, loss, backward, fused AdamW), interleaved."""
    gen = torch.Generator().manual_seed(1)
    target = [torch.randn(x.shape, generator=gen) for x in lat]
    b = len(lat)
    opt_ours = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=True)
    opt_theirs = torch.optim.AdamW(wan.parameters(), lr=1e-4, fused=True)
    dit.train(), wan.train()

    def backward_ours():
        out = dit.forward_videos(lat, t, txt)
        loss = sum(F.mse_loss(o, y) for o, y in zip(out, target)) / b        # mean over videos of their MSE
        loss.backward()
        return out, loss.detach()

    def backward_theirs():                       # one forward + backward per size, gradients accumulated
        out, total = [None] * b, 0.0
        for g in _size_groups(lat):
            o = wan(torch.stack([lat[i] for i in g]), t[g], torch.stack([txt[i] for i in g]), return_dict=False)[0]
            loss = sum(F.mse_loss(o[j], target[i]) for j, i in enumerate(g)) / b
            loss.backward()
            total = total + loss.detach()
            for j, i in enumerate(g):
                out[i] = o[j].detach()
        return out, total

    def step(model, opt, backward):
        def run():
            opt.zero_grad(set_to_none=True)
            backward()
            opt.step()
        return run

    with torch.enable_grad():
        dit.zero_grad(set_to_none=True), wan.zero_grad(set_to_none=True)
        out_o, loss_o = backward_ours()
        out_d, loss_d = backward_theirs()
        ours = {n: p.grad for n, p in dit.named_parameters()}
        theirs = _grads_as_videodit(wan, dit.config)
        err_out = max(rel_err(a.detach(), b_) for a, b_ in zip(out_o, out_d))
        err_grad = max(rel_err(ours[n], theirs[n]) for n in ours)
        err_loss = rel_err(loss_o, loss_d)
        passed = max(err_out, err_loss, err_grad) <= REL_TOL and set(ours) == set(theirs)
        row = dict(section="train", case=case, model=dit_desc(dit), shapes=shapes,
                   tokens_real=sum(math.prod(x.shape[1:]) for x in lat) // math.prod(PATCH),
                   diffusers_forwards=len(_size_groups(lat)), max_rel_err_out=err_out, max_rel_err_loss=err_loss,
                   max_rel_err_grad=err_grad, passed=passed)
        if passed:
            ts = time_interleaved({"ours": step(dit, opt_ours, backward_ours),
                                   "diffusers": step(wan, opt_theirs, backward_theirs)}, s["reps"], s["warmup"])
            row.update(ms_ours=1e3 * ts["ours"], ms_diffusers=1e3 * ts["diffusers"],
                       ratio=ts["diffusers"] / ts["ours"], ratio_of_min=ts["min:diffusers"] / ts["min:ours"])
    dit.eval(), wan.eval()
    return row


def bench_train(s: dict, wan, dit, gen) -> list[dict]:
    """Training copies of both models (the other sections keep their weights)."""
    import copy

    from sora_fast.models.dit import VideoDiT

    wan = copy.deepcopy(wan)
    dit = VideoDiT.from_diffusers(wan)
    c = dit.config
    n = s["batch"]
    lat = [torch.randn(c.in_channels, *latent_shape(s["same_size"]), generator=gen) for _ in range(n)]
    txt = [torch.randn(s["text_len"], c.text_dim, generator=gen) for _ in range(n)]
    rows = [_train_row(s, f"train step, {n} videos", f"{n} x pixels {s['same_size']} -> latent "
                       f"{latent_shape(s['same_size'])} x {c.in_channels} ch, text {s['text_len']}", wan, dit, lat,
                       torch.rand(n, generator=gen) * 1000, txt)]
    for mix in s["mixes"]:
        lat, txt, t = _mixed_inputs(s, mix, c, gen)
        rows.append(_train_row(s, f"train step, {len(lat)} videos, {len(_size_groups(lat))} sizes",
                               _mixed_shapes(s, mix, c), wan, dit, lat, t, txt))
    return rows


# --- 5. packed CFG vs two forwards -------------------------------------------------------------------------
def bench_cfg(s: dict, dit, gen) -> list[dict]:
    from sora_fast.packing import pack_sequences, pack_videos
    from sora_fast.sampling import concat_text, sample_euler

    c = dit.config
    noise = [torch.randn(c.in_channels, *latent_shape(v), generator=gen) for v in s["videos"]]
    b = len(noise)
    text = pack_sequences([torch.randn(s["text_len"] + 3 * i, c.text_dim, generator=gen) for i in range(b)])
    uncond = pack_sequences([torch.randn(s["text_len"], c.text_dim, generator=gen) for _ in range(b)])
    x = pack_videos(noise, PATCH)
    n = x.num_tokens
    assert torch.equal(concat_text(text, uncond).tokens[:text.num_tokens], text.tokens)

    def two_pass(xx, tt, _text):
        """Denoiser that receives the sampler's 2B-video pack and runs the B conditional and the B
        unconditional videos as two separate forwards."""
        v_c = dit(x.with_tokens(xx.tokens[:n]), tt[:b], text)
        v_u = dit(x.with_tokens(xx.tokens[n:]), tt[b:], uncond)
        return torch.cat([v_c, v_u])

    kw = dict(patch=PATCH, steps=s["cfg_steps"], guidance=5.0, uncond_text=uncond, shift=5.0)
    packed = lambda: sample_euler(dit, noise, text, **kw)  # noqa: E731
    split = lambda: sample_euler(two_pass, noise, text, **kw)  # noqa: E731
    err = max(rel_err(a, r) for a, r in zip(packed(), split()))
    passed = err <= REL_TOL
    row = dict(section="cfg", case=f"sample_euler, guidance 5, {s['cfg_steps']} steps", model=dit_desc(dit),
               shapes=f"{b} videos, latents {[latent_shape(v) for v in s['videos']]} x {c.in_channels} ch "
                      f"(2 x {n} tokens per step)", tokens_real=2 * n, max_rel_err_out=err, passed=passed)
    if passed:
        ts = time_interleaved({"packed": packed, "split": split}, s["reps"], s["warmup"])
        row.update(ms_step_packed=1e3 * ts["packed"] / s["cfg_steps"],
                   ms_step_two_forwards=1e3 * ts["split"] / s["cfg_steps"], ratio=ts["split"] / ts["packed"],
                   ratio_of_min=ts["min:split"] / ts["min:packed"])
    return [row]


# --- 6. chunked VAE decode -----------------------------------------------------------------------------
def make_vaes(base_dim: int, seed: int = 0):
    """A random diffusers AutoencoderKLWan with Wan2.1's layout (4x time, 8x space) and CausalVAE of it."""
    from diffusers import AutoencoderKLWan

    from sora_fast.models.vae import CausalVAE

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dv = AutoencoderKLWan(base_dim=base_dim, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                          temperal_downsample=[False, True, True], scale_factor_temporal=TF,
                          scale_factor_spatial=SF, latents_mean=torch.randn(4, generator=gen).tolist(),
                          latents_std=(torch.rand(4, generator=gen) + 0.5).tolist()).eval()
    with torch.no_grad():
        for name, p in dv.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return dv, CausalVAE.from_diffusers(dv).eval()


def peak_bytes(fn, inp, model) -> tuple[int, int]:
    """(peak live storage bytes during ``fn(inp)``, bytes of the returned output)."""
    from sora_fast.tools.memory import PeakMemory

    with torch.no_grad(), PeakMemory(exclude=[inp, *model.parameters()]) as mem:
        out = fn(inp)
    return mem.peak, out.untyped_storage().nbytes()


def bench_vae(s: dict, gen) -> list[dict]:
    v = s["vae"]
    dv, ours = make_vaes(v["base_dim"])
    theirs = lambda z: dv.decode(z).sample  # noqa: E731
    rows = []
    for frames in v["frames"]:
        z = torch.randn(1, 4, 1 + (frames - 1) // TF, v["hw"], v["hw"], generator=gen)
        with torch.no_grad():
            err = rel_err(ours.decode(z), theirs(z))
        passed = err <= REL_TOL
        peak_o, out_o = peak_bytes(ours.decode, z, ours)
        peak_d, out_d = peak_bytes(theirs, z, dv)
        row = dict(section="vae", case=f"decode {frames} frames",
                   model=f"Wan-VAE layout, base_dim {v['base_dim']}, z 4",
                   shapes=f"latent (1, 4, {z.shape[2]}, {v['hw']}, {v['hw']}) -> video (1, 3, {frames}, "
                          f"{v['hw'] * SF}, {v['hw'] * SF})",
                   max_rel_err_out=err, passed=passed)
        if passed:
            with torch.no_grad():
                ts = time_interleaved({"ours": lambda: ours.decode(z), "diffusers": lambda: theirs(z)},
                                      s["reps"], s["warmup"])
            row.update(peak_mib_ours=peak_o / 2**20, peak_mib_diffusers=peak_d / 2**20,
                       work_mib_ours=(peak_o - out_o) / 2**20, work_mib_diffusers=(peak_d - out_d) / 2**20,
                       mem_ratio=peak_d / peak_o, ms_ours=1e3 * ts["ours"], ms_diffusers=1e3 * ts["diffusers"],
                       ratio=ts["diffusers"] / ts["ours"], ratio_of_min=ts["min:diffusers"] / ts["min:ours"])
        rows.append(row)
    return rows


# --- 7. the eager attention's per-call kernel -----------------------------------------------------------------
def bench_sdpa(s: dict, gen) -> list[dict]:
    from sora_fast.reference import attention as R

    def math(q, k, v):   # the eager path's explicit math, as it runs
        return R._attention_math(q, k, v, q.shape[-1] ** -0.5)

    rows = []
    for b, h, lq, lk, d in s["sdpa"]:
        q = torch.randn(b, h, lq, d, generator=gen, requires_grad=True)
        k, v = (torch.randn(b, h, lk, d, generator=gen, requires_grad=True) for _ in range(2))
        dout = torch.randn(b, h, lq, d, generator=gen)
        pick = "math" if R._math_pays(q, lq, lk) else "fused"
        fused = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        ref = (q.double() @ k.double().transpose(-1, -2) * d ** -0.5).softmax(-1) @ v.double()
        gref = torch.autograd.grad(ref, (q, k, v), dout.double())
        outs = {"fused": fused(), "math": math(q, k, v)}
        grads = {n: torch.autograd.grad(o, (q, k, v), dout) for n, o in outs.items()}
        err = max(rel_err(o, ref) for o in outs.values())
        gerr = max(rel_err(g, w) for gs in grads.values() for g, w in zip(gs, gref))
        passed = err <= REL_TOL and gerr <= REL_TOL
        for mode in ("forward", "forward+backward"):
            row = dict(section="sdpa", case=f"{mode}, Lq {lq} x Lk {lk}, d {d}", model=f"{b} x {h} heads",
                       shapes=f"q ({b}, {h}, {lq}, {d}), k/v ({b}, {h}, {lk}, {d})", eager_choice=pick,
                       max_rel_err_out=err, max_rel_err_grad=gerr, passed=passed)
            if passed:
                if mode == "forward":
                    with torch.no_grad():
                        ts = time_interleaved({"fused": fused, "math": lambda: math(q, k, v)}, s["reps"], s["warmup"])
                else:
                    ts = time_interleaved({"fused": lambda: fused().backward(dout),
                                           "math": lambda: math(q, k, v).backward(dout)}, s["reps"], s["warmup"])
                row.update(ms_fused=1e3 * ts["fused"], ms_math=1e3 * ts["math"], ratio=ts["fused"] / ts["math"],
                           ratio_of_min=ts["min:fused"] / ts["min:math"])
            rows.append(row)
    return rows


# --- 8. the FFN's tanh GELU ------------------------------------------------------------------------------------
def bench_gelu(s: dict, gen) -> list[dict]:
    from sora_fast.models.activations import gelu_tanh

    def torch_gelu(x):
        return F.gelu(x, approximate="tanh")

    rows = []
    for n, hidden in s["gelu"]:
        x = (torch.randn(n, hidden, generator=gen) * 3).requires_grad_(True)
        dout = torch.randn(n, hidden, generator=gen)
        xd = x.detach().double().requires_grad_(True)
        ref = torch_gelu(xd)
        (gref,) = torch.autograd.grad(ref, xd, dout.double())
        errs, gerrs = {}, {}
        for name, fn in (("torch", torch_gelu), ("ours", gelu_tanh)):
            out = fn(x)
            (g,) = torch.autograd.grad(out, x, dout)
            errs[name] = float((out.detach().double() - ref.detach()).abs().max())
            gerrs[name] = float((g.double() - gref).abs().max())
        passed = errs["ours"] <= 2 * errs["torch"] + 1e-6 and gerrs["ours"] <= 2 * gerrs["torch"] + 1e-6
        for mode in ("forward", "forward+backward"):
            row = dict(section="gelu", case=f"{mode}, {n} x {hidden}", model="tanh GELU, fp32",
                       shapes=f"x ({n}, {hidden})", max_abs_err_ours=errs["ours"], max_abs_err_torch=errs["torch"],
                       max_abs_err_grad_ours=gerrs["ours"], max_abs_err_grad_torch=gerrs["torch"],
                       max_rel_err_out=errs["ours"] / float(ref.detach().abs().max()), passed=passed)
            if passed:
                if mode == "forward":
                    with torch.no_grad():
                        ts = time_interleaved({"torch": lambda: torch_gelu(x), "ours": lambda: gelu_tanh(x)},
                                              s["reps"], s["warmup"])
                else:
                    ts = time_interleaved({"torch": lambda: torch_gelu(x).backward(dout),
                                           "ours": lambda: gelu_tanh(x).backward(dout)}, s["reps"], s["warmup"])
                row.update(ms_torch=1e3 * ts["torch"], ms_ours=1e3 * ts["ours"], ratio=ts["torch"] / ts["ours"],
                           ratio_of_min=ts["min:torch"] / ts["min:ours"])
                if mode == "forward":
                    row["gbs_ours"] = 2 * x.numel() * x.element_size() / ts["ours"] / 1e9
            rows.append(row)
    return rows


# --- output --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool):
        return "ok" if v else "FAILED"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e3 else f"{v:.0f}"
    return str(v)


TABLE = {  # section -> columns shown on stdout (all fields go to JSON/CSV)
    "packed": ["case", "tokens_real", "tokens_padded", "attn_work_ratio", "ms_packed", "ms_padded", "tok_s_packed",
               "tok_s_padded", "ratio", "ratio_of_min", "max_rel_err_out", "max_rel_err_grad", "passed"],
    "diffusers": ["case", "tokens_real", "ms_ours", "ms_diffusers", "ratio", "ratio_of_min", "max_rel_err_out",
                  "passed"],
    "mixed": ["case", "tokens_real", "diffusers_forwards", "ms_ours", "ms_diffusers", "ratio", "ratio_of_min",
              "max_rel_err_out", "passed"],
    "train": ["case", "tokens_real", "diffusers_forwards", "ms_ours", "ms_diffusers", "ratio", "ratio_of_min",
              "max_rel_err_out", "max_rel_err_grad", "passed"],
    "cfg": ["case", "tokens_real", "ms_step_packed", "ms_step_two_forwards", "ratio", "ratio_of_min",
            "max_rel_err_out", "passed"],
    "vae": ["case", "peak_mib_ours", "peak_mib_diffusers", "mem_ratio", "work_mib_ours", "work_mib_diffusers",
            "ms_ours", "ms_diffusers", "ratio", "ratio_of_min", "max_rel_err_out", "passed"],
    "sdpa": ["case", "eager_choice", "ms_fused", "ms_math", "ratio", "ratio_of_min", "max_rel_err_out",
             "max_rel_err_grad", "passed"],
    "gelu": ["case", "ms_torch", "ms_ours", "ratio", "ratio_of_min", "gbs_ours", "max_abs_err_torch",
             "max_abs_err_ours", "passed"],
}
RATIO_MEANING = {  # ratio_of_min: the same ratio from each provider's fastest repetition
    "packed": "ratio = padded time / packed time (useful tokens/s gain of packing)",
                 "diffusers": "ratio = diffusers time / VideoDiT time",
                 "mixed": "ratio = diffusers time (one forward per size) / VideoDiT time (one packed forward)",
                 "train": "ratio = diffusers step time / VideoDiT step time (forward, backward, fused AdamW)",
                 "cfg": "ratio = two-forward time / packed-CFG time per step",
                 "vae": "mem_ratio = diffusers peak / ours; ratio = diffusers time / ours",
                 "sdpa": "ratio = fused SDPA time / explicit math time (> 1: the math is faster)",
                 "gelu": "ratio = torch's tanh GELU time / gelu_tanh time"}


def print_table(section: str, rows: list[dict]) -> None:
    cols = TABLE[section]
    cells = [[_fmt(r.get(k, "-")) for k in cols] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(cols)]
    print(f"\n[{section}] {rows[0].get('model', '')}; {RATIO_MEANING[section]}")
    for r in rows:
        print(f"  {r['case']}: {r['shapes']}")
    print("  " + " | ".join(k.ljust(w) for k, w in zip(cols, widths)))
    print("  " + "-+-".join("-" * w for w in widths))
    for c in cells:
        print("  " + " | ".join(v.ljust(w) for v, w in zip(c, widths)))


def meta(argv, s) -> dict:
    import diffusers  # noqa: F401  (required: a clear ImportError here when it is not installed)

    return dict(command="python bench/bench_system.py " + " ".join(argv), dtype="float32",
                **versions(("torch", "diffusers", "sora_fast", "python")), cpu_threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(),
                timing=f"median of {s['reps']} interleaved repetitions after {s['warmup']} warm-up",
                loadavg_start=os.getloadavg()[0])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repetitions (smoke test)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, from {', '.join(SECTIONS)} (default: all)")
    cli.add_reps_flag(p, "provider")
    p.add_argument("--json", default=None, help="write {meta, section: rows} to this JSON file")
    p.add_argument("--csv", default=None, help="write one row per case (all sections) to this CSV file")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    cli.add_threads_flag(p, "torch intra-op CPU threads (default: torch's); 1 is steadier on a shared machine")
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in SECTIONS]
    if bad or not only:
        p.error(f"--only takes sections from {SECTIONS}, got {args.only!r}")
    cli.check_counts(args, p.error)
    s = settings(args.quick)
    if args.reps is not None:
        s["reps"] = args.reps
    with cli.torch_threads(args.threads):
        return run(args, argv, only, s)


def run(args, argv, only, s) -> int:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    info = meta(argv, s)
    print(f"{info['command']}\n  fp32, torch {info['torch']}, diffusers {info['diffusers']}, "
          f"{info['cpu_threads']} CPU threads, {info['timing']}, load average {info['loadavg_start']:.2f}")
    result = {"meta": info}
    wan = dit = None
    if any(x in only for x in ("packed", "diffusers", "mixed", "train", "cfg")):
        wan, dit = make_dits(s["dit"], args.seed)
    for section in SECTIONS:
        if section not in only:
            continue
        t0 = time.perf_counter()
        if section == "packed":
            rows = bench_packed(s, dit, gen)
        elif section == "diffusers":
            rows = bench_diffusers(s, wan, dit, gen)
        elif section == "mixed":
            rows = bench_mixed(s, wan, dit, gen)
        elif section == "train":
            rows = bench_train(s, wan, dit, gen)
        elif section == "cfg":
            rows = bench_cfg(s, dit, gen)
        elif section == "sdpa":
            rows = bench_sdpa(s, gen)
        elif section == "gelu":
            rows = bench_gelu(s, gen)
        else:
            rows = bench_vae(s, gen)
        for r in rows:
            r["seconds_section"] = time.perf_counter() - t0
        result[section] = rows
        print_table(section, rows)
    info["loadavg_end"] = os.getloadavg()[0]
    all_rows = [r for k in SECTIONS for r in result.get(k, [])]
    failed = [f"{r['section']}: {r['case']}" for r in all_rows if not r["passed"]]
    names = ": " + "; ".join(failed) if failed else ""
    print(f"\n{len(all_rows)} rows, {len(failed)} failed correctness checks{names}; "
          f"load average {info['loadavg_start']:.2f} -> {info['loadavg_end']:.2f}")
    if args.json:
        write_json(args.json, result)
    if args.csv:
        keys = list(dict.fromkeys(k for r in all_rows for k in r))
        common = {k: info[k] for k in ("command", "torch", "cpu_threads")}
        write_csv(args.csv, [{**common, **r} for r in all_rows], [*common, *keys])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
