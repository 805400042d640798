"""``python -m sora_fast``: what this install can run, and a self-check of the packed ops on CPU.

Packs videos of different sizes (an image among them) into one token stream, runs windowed 3D-RoPE
attention and adaLN over the pack, and checks every video against running it alone.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import __version__, _ext, ops, pack_videos


def _backends_table() -> list[str]:
    names = ["spacetime_attention", "apply_rope3d", "adaln_modulate", "gated_residual_adaln", "causal_conv3d",
             "group_norm_silu", "channel_rms_norm_silu"]
    return [f"  {n:<24} {', '.join(ops.registered_backends(n))}" for n in names]


def self_check(seed: int = 0) -> float:
    """Max abs difference between packed and one-video-at-a-time results (should be ~1e-6)."""
    g = torch.Generator().manual_seed(seed)
    videos = [torch.randn(4, t, h, w, generator=g) for t, h, w in ((1, 8, 12), (3, 6, 4), (2, 10, 6))]
    heads, head_dim = 2, 12
    proj = torch.randn(4 * 4, 3 * heads * head_dim, generator=g) * 0.2
    table = torch.randn(len(videos), 2, 4 * 4, generator=g) * 0.1        # per-video shift / scale

    def run(vids, rows):
        packed = pack_videos(vids)                                       # patch (1, 2, 2)
        q, k, v = (packed.tokens @ proj).unflatten(1, (3, heads, head_dim)).unbind(1)
        attn = ops.spacetime_attention(q, k, v, packed.cu_seqlens, max_seqlen_q=packed.max_seqlen,
                                       window=(1, 2, 2), grid=packed.grid, rope_coords=packed.coords)
        y = ops.adaln_modulate(attn.flatten(1)[:, :16], table[rows, 0], table[rows, 1], packed.seq_ids)
        return packed.unpack(y, channels=4)

    together = run(videos, list(range(len(videos))))
    alone = [run([v], [i])[0] for i, v in enumerate(videos)]
    return max((a - b).abs().max().item() for a, b in zip(together, alone))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sora_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the self-check's random videos")
    args = parser.parse_args(argv)
    print(f"sora_fast {__version__} | torch {torch.__version__} | CUDA available: {torch.cuda.is_available()}")
    info = _ext.build_info()
    print("extension sora_fast._C:", "built" if info.get("available") else f"missing ({info.get('reason')})")
    for key in ("cuda_compiled", "cuda_archs", "cuda_version", "emulation"):
        if key in info:
            print(f"  {key}: {info[key]}")
    print("registered backends per op:")
    print("\n".join(_backends_table()))
    err = self_check(args.seed)
    ok = err < 1e-4
    print(f"self-check: 3 videos packed vs one at a time, max abs diff {err:.2e} -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
