"""Packed spacetime patches: videos of any size as one token stream, without padding.

A latent video ``(C, T, H, W)`` is cut into ``pt x ph x pw`` patches, giving ``T'·H'·W'`` tokens
(``T' = T/pt`` …) in t-major raster order, or tile by tile (``order="tile"``: 3D tiles of patches one after
the other, each in t-major raster; :mod:`sora_fast.reference._order`). The tokens of B videos are
concatenated back to back, and ``cu_seqlens`` / ``seq_ids`` / ``coords`` / ``grid`` say where each sequence
and token lives (docs/design.md, "packed spacetime patches"). Text sequences are packed the same way by
:func:`pack_sequences`, and :func:`plan_batches` groups samples of mixed sizes into batches under a
token budget, so that a training step sees native resolutions and never a padded rectangle.

Everything here is plain torch (reshape / permute / cat), so it is differentiable and runs on any device.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from .reference._order import DEFAULT_TILE, check_order, order_rows, t_major_order
from .reference._plan import PackPlan

__all__ = [
    "PackedVideos",
    "PackedSequences",
    "BatchPlan",
    "pack_videos",
    "pack_sequences",
    "plan_batches",
    "frame_ids",
    "select_videos",
    "PackPlan",
]

_INT32_MAX = 2**31 - 1
_AXES = ("T", "H", "W")
_PATCH_NAMES = ("pt", "ph", "pw")


# ----------------------------------------------------------------------------------------------
# validation helpers


def _type_name(x) -> str:
    return type(x).__name__


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_patch(patch) -> tuple[int, int, int]:
    if not isinstance(patch, (tuple, list, torch.Size)):
        raise TypeError(f"patch must be a tuple of 3 positive ints (pt, ph, pw), got {_type_name(patch)}")
    if len(patch) != 3:
        raise ValueError(f"patch must be 3 positive ints (pt, ph, pw), got {tuple(patch)} of length {len(patch)}")
    for name, p in zip(_PATCH_NAMES, patch):
        if not _is_int(p):
            raise TypeError(f"patch {name} must be an int, got {p!r} ({_type_name(p)}) in patch={tuple(patch)}")
        if p < 1:
            raise ValueError(f"patch {name} must be >= 1, got {p} in patch={tuple(patch)}")
    return tuple(int(p) for p in patch)


def _patch_grid(name: str, thw: Sequence[int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(T, H, W)`` -> ``(T', H', W')``, checking every axis is >= 1 and divisible by its patch size."""
    for axis, size, pname, p in zip(_AXES, thw, _PATCH_NAMES, patch):
        if size < 1:
            raise ValueError(f"{name}: {axis}={size}, every axis must be >= 1 (a video has at least one token)")
        if size % p:
            raise ValueError(f"{name}: {axis}={size} is not divisible by patch {pname}={p}")
    return tuple(int(s) // p for s, p in zip(thw, patch))


def _check_same(name: str, x: torch.Tensor, first: torch.Tensor, first_name: str) -> None:
    if x.dtype != first.dtype:
        raise ValueError(f"{name} is {x.dtype}, {first_name} is {first.dtype}; all tensors must share one dtype")
    if x.device != first.device:
        raise ValueError(
            f"{name} is on {x.device}, {first_name} is on {first.device}; all tensors must be on one device"
        )


def _check_list(arg: str, items, what: str) -> None:
    if isinstance(items, torch.Tensor):
        raise TypeError(
            f"{arg} must be a list or tuple of {what} tensors, got one Tensor of shape {tuple(items.shape)}"
            f" (use list({arg}) to pack a batched tensor)"
        )
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{arg} must be a list or tuple of {what} tensors, got {_type_name(items)}")
    if len(items) == 0:
        raise ValueError(f"{arg} is empty; at least one {what} tensor is needed")


def _check_rows(arg: str, x, n: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {_type_name(x)}")
    if x.dim() != 2:
        raise ValueError(f"{arg} must be 2-D {what}, got shape {tuple(x.shape)}")
    if x.shape[0] != n:
        raise ValueError(f"{arg} has {x.shape[0]} rows, the packing has {n} tokens")


def _cu_seqlens(seqlens: list[int], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``seqlens`` -> ``(cu_seqlens (B+1,), seq_ids (N,), N)``, int32 on ``device``, without a host sync."""
    n = sum(seqlens)
    if n > _INT32_MAX:
        raise ValueError(f"the packing has {n} tokens, more than int32 cu_seqlens can index ({_INT32_MAX})")
    cu = [0]
    for s in seqlens:
        cu.append(cu[-1] + s)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    lens = torch.tensor(seqlens, dtype=torch.int64, device=device)
    seq_ids = torch.repeat_interleave(
        torch.arange(len(seqlens), dtype=torch.int32, device=device), lens, output_size=n
    )
    return cu_seqlens, seq_ids, n


# ----------------------------------------------------------------------------------------------
# packed streams


class _Packed:
    """What every packed stream has: ``tokens (N, D)`` and ``cu_seqlens (B+1,)`` (plus metadata)."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def seqlens(self) -> list[int]:
        return self.cu_seqlens.diff().tolist()

    def to(self, device):
        """A copy with every tensor field on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def with_tokens(self, tokens: torch.Tensor):
        """A copy sharing all metadata with ``tokens`` ``(N, D')`` in place of the features."""
        _check_rows("tokens", tokens, self.num_tokens, "(N, D)")
        return dataclasses.replace(self, tokens=tokens)


# ----------------------------------------------------------------------------------------------
# videos


@dataclass(eq=False)
class PackedVideos(_Packed):
    """B videos as one stream of N spacetime-patch tokens (docs/design.md's packed layout).

    tokens:      ``(N, C*pt*ph*pw)``, the latents' dtype and device; sequences back to back.
                 Features within a token are ordered ``(C, pt, ph, pw)``, C outermost: exactly the
                 flattening of a ``Conv3d(C, D, kernel_size=patch, stride=patch)`` weight, so
                 ``tokens @ conv.weight.reshape(D, -1).T + conv.bias`` is the patch embedding.
    cu_seqlens:  ``(B+1,)`` int32; sequence i is rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
    grid:        ``(B, 3)`` int32; ``(T', H', W')`` patches per axis of each video.
    coords:      ``(N, 3)`` int32; ``(t, h, w)`` patch index of each token inside its own video, in
                 every order. The tokens of a video are in ``order``.
    seq_ids:     ``(N,)`` int32; which video each token belongs to.
    max_seqlen:  python int; the longest sequence.
    patch:       ``(pt, ph, pw)``.
    frames:      tuple of B python ints, ``grid[:, 0]`` on the host (latent frames T' of each video), or
                 None when unknown. :func:`pack_videos` sets it from the latents' shapes and every method
                 that makes a new pack carries it, so reading frame counts (:attr:`num_frames`,
                 :attr:`frames_per_video`) needs no device sync; when None they read ``grid``.
    order:       ``"t-major"`` (t slowest, then h, then w) or ``"tile"`` (see :func:`pack_videos`).
    tile:        ``(tt, th, tw)`` of a ``"tile"`` pack, in patches; None for ``"t-major"``.
    All tensor metadata lives on the tokens' device. A video's tokens are contiguous in every order, and
    :func:`frame_ids`, the model and the samplers read positions from ``coords``, never from the order.

    :attr:`plan` holds the work that depends only on the metadata (frame rows, RoPE tables, attention
    layouts), done once and reused by every layer and, through :meth:`with_tokens`, every sampling step.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    grid: torch.Tensor
    coords: torch.Tensor
    seq_ids: torch.Tensor
    max_seqlen: int
    patch: tuple[int, int, int]
    frames: Optional[tuple[int, ...]] = None
    order: str = "t-major"
    tile: Optional[tuple[int, int, int]] = None

    def __post_init__(self):
        if self.order == "tile" and self.tile is None:
            raise ValueError("tile must be the (tt, th, tw) of a pack with order='tile', got None")
        self.order, self.tile = check_order(self.order, self.tile)
        if self.frames is not None:
            frames = tuple(self.frames) if isinstance(self.frames, (tuple, list)) else None
            if frames is None or not all(_is_int(f) and f >= 1 for f in frames):
                raise TypeError(f"frames must be None or a tuple of positive ints (grid[:, 0] on the host), "
                                f"got {self.frames!r}")
            if len(frames) != self.grid.shape[0]:
                raise ValueError(f"frames must hold one count per video ({self.grid.shape[0]}, the rows of grid), "
                                 f"got {len(frames)}")
            self.frames = tuple(int(f) for f in frames)

    @property
    def plan(self) -> PackPlan:
        """The pack's :class:`~sora_fast.reference._plan.PackPlan`: per-pack work (offsets on the host, frame
        rows, RoPE tables, the attention layout) done on first use and reused. Made anew when a metadata
        field is replaced or modified in place; shared by the packs :meth:`with_tokens` makes."""
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.describes(self.cu_seqlens, self.grid, self.coords, self.seq_ids, self.frames):
            plan = PackPlan(self.cu_seqlens, self.grid, self.coords, self.seq_ids, self.frames)
            if not torch.compiler.is_compiling():
                self.__dict__["_plan"] = plan
        return plan

    def with_tokens(self, tokens: torch.Tensor) -> "PackedVideos":
        """A copy sharing all metadata, and the :attr:`plan`, with ``tokens`` ``(N, D')`` in place of the features."""
        out = super().with_tokens(tokens)
        if "_plan" in self.__dict__:
            out.__dict__["_plan"] = self.__dict__["_plan"]
        return out

    @property
    def frames_per_video(self) -> list[int]:
        """Latent frames ``T'`` of each video (``grid[:, 0]``) as python ints: :attr:`frames` when the pack
        knows them, else read from ``grid`` (a device sync)."""
        return list(self.frames) if self.frames is not None else self.grid[:, 0].tolist()

    @property
    def num_frames(self) -> int:
        """``F``, the latent frames of all videos (``int(grid[:, 0].sum())``), without a device sync when
        :attr:`frames` is known."""
        return sum(self.frames) if self.frames is not None else int(self.grid[:, 0].sum())

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """``(T, H, W)`` of each video in latent units (patches times patch size)."""
        return [tuple(g * p for g, p in zip(row, self.patch)) for row in self.grid.tolist()]

    def unpack(self, tokens_out: torch.Tensor, channels: int | None = None) -> list[torch.Tensor]:
        """``(N, C'*pt*ph*pw)`` tokens (same feature order and token order as ``tokens``) -> list of
        ``(C', T, H, W)``.

        ``channels`` defaults to ``tokens_out.shape[1] // (pt*ph*pw)``. The outputs keep
        ``tokens_out``'s dtype and device, and are differentiable. A pack in another order than t-major is
        gathered into it first (the index is made once per pack, from ``coords``).
        """
        pt, ph, pw = self.patch
        p = pt * ph * pw
        _check_rows("tokens_out", tokens_out, self.num_tokens, f"(N, C*{pt}*{ph}*{pw})")
        d = tokens_out.shape[1]
        if channels is None:
            if d == 0 or d % p:
                raise ValueError(
                    f"tokens_out has {d} features, not a positive multiple of pt*ph*pw={p} for patch={self.patch}"
                )
            channels = d // p
        else:
            if not _is_int(channels):
                raise TypeError(f"channels must be an int, got {_type_name(channels)}")
            if channels < 1:
                raise ValueError(f"channels must be >= 1, got {channels}")
            if d != channels * p:
                raise ValueError(
                    f"tokens_out has {d} features, expected channels*pt*ph*pw = {channels}*{p} = {channels * p}"
                )
        if self.order != "t-major":
            perm = t_major_order(self.plan, self.cu_seqlens, self.grid, self.coords)
            tokens_out = tokens_out if perm is None else tokens_out[perm[1]]   # (N, D) in t-major order
        videos = []
        for x, (gt, gh, gw) in zip(tokens_out.split(self.seqlens), self.grid.tolist()):
            x = x.reshape(gt, gh, gw, channels, pt, ph, pw)
            x = x.permute(3, 0, 4, 1, 5, 2, 6)  # (C', T', pt, H', ph, W', pw)
            videos.append(x.reshape(channels, gt * pt, gh * ph, gw * pw))
        return videos


def frame_ids(x: PackedVideos) -> torch.Tensor:
    """Per-frame row of every token, without a host sync: ``(N,)`` int32, the frame offset of its video
    (latent frames of the videos before it) plus its ``t`` coordinate, so values lie in ``[0, F)`` with
    ``F = int(x.grid[:, 0].sum())``: rows are video by video, frames in time order. Works on token shards
    too (``grid`` and ``coords`` are global). Computed once per pack (:attr:`PackedVideos.plan`)."""
    def build():
        frames = x.grid[:, 0].long()                                   # (B,)
        offsets = torch.cumsum(frames, 0) - frames                     # (B,) first row of each video
        return (offsets[x.seq_ids.long()] + x.coords[:, 0].long()).to(torch.int32)
    return build() if torch.compiler.is_compiling() else x.plan.memo("frame_ids", build)


def select_videos(x: PackedVideos, keep: Sequence[int]) -> tuple[PackedVideos, torch.Tensor, torch.Tensor]:
    """The sub-pack of videos ``keep`` (in that order): ``(x_sub, token rows (N_sub,), frame rows (F_sub,))``, the
    rows of ``x.tokens`` and of per-frame tables (``(F,)``, video by video) that the sub-pack's rows come from."""
    cu, frames = x.cu_seqlens.tolist(), x.frames_per_video
    f0 = [sum(frames[:k]) for k in range(len(frames))]
    dev = x.tokens.device
    rows = torch.cat([torch.arange(cu[k], cu[k + 1]) for k in keep]).to(dev)
    frows = torch.cat([torch.arange(f0[k], f0[k] + frames[k]) for k in keep]).to(dev)
    lens = [cu[k + 1] - cu[k] for k in keep]
    sub_cu = torch.tensor([0] + lens, dtype=torch.int32, device=dev).cumsum(0).to(torch.int32)
    seq = torch.repeat_interleave(torch.arange(len(keep), dtype=torch.int32, device=dev),
                                  torch.tensor(lens, device=dev), output_size=int(sum(lens)))
    xs = PackedVideos(tokens=x.tokens[rows], cu_seqlens=sub_cu, grid=x.grid[list(keep)], coords=x.coords[rows],
                      seq_ids=seq, max_seqlen=max(lens), patch=x.patch, order=x.order, tile=x.tile)
    return xs, rows, frows


def segment_mean(x: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean of packed rows, without a host sync.

    x: ``(N, ...)``; seq_ids: ``(N,)`` int, values in ``[0, num_seqs)``.
    Returns ``(mean (B, ...), counts (B,))`` in ``x``'s dtype: an empty sequence has mean 0 and count 0.
    """
    ids = seq_ids.long()
    sums = x.new_zeros((num_seqs, *x.shape[1:])).index_add_(0, ids, x)
    counts = torch.bincount(ids, minlength=num_seqs)[:num_seqs].to(x.dtype)
    return sums / counts.clamp_min(1).view(-1, *([1] * (x.dim() - 1))), counts


def pack_videos(
    latents: Sequence[torch.Tensor], patch: tuple[int, int, int] = (1, 2, 2), *, order: str = "t-major",
    tile: tuple[int, int, int] = DEFAULT_TILE,
) -> PackedVideos:
    """Cut each ``(C, T, H, W)`` latent into ``patch`` patches and pack all tokens without padding.

    latents: list or tuple of B tensors ``(C, T, H, W)``, one C, dtype and device, any T/H/W divisible
             by the patch (T=1 is an image). Non-contiguous inputs are fine.
    patch:   ``(pt, ph, pw)`` positive ints.
    order:   the tokens' order inside each video: ``"t-major"`` (raster: t slowest, then h, then w) or
             ``"tile"``: the ``(T', H', W')`` grid cut into ``tile`` tiles, visited in t-major order over the
             tile grid, each tile's tokens in t-major raster; tiles at the far edges are clipped (a grid the
             tile does not divide gets no padding tokens). Neighbours in space and time then sit close in
             the stream, so a windowed attention's key blocks stay dense.
    tile:    ``(tt, th, tw)`` positive ints, in latent patches; used by ``order="tile"`` only.
    Returns a :class:`PackedVideos`; see it for the layout (``coords`` holds every token's true
    ``(t, h, w)`` in both orders). Differentiable w.r.t. the latents.
    Raises TypeError for wrong types and ValueError, naming the video, axis and sizes, for bad shapes.
    """
    patch = _check_patch(patch)
    order, tile = check_order(order, tile)
    _check_list("latents", latents, "(C, T, H, W)")
    first = latents[0]
    grids, pieces, rows = [], [], []
    for i, x in enumerate(latents):
        name = f"latents[{i}]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(x)}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (C, T, H, W), got shape {tuple(x.shape)}")
        if i and x.shape[0] != first.shape[0]:
            raise ValueError(f"{name} has {x.shape[0]} channels, latents[0] has {first.shape[0]}")
        if i:
            _check_same(name, x, first, "latents[0]")
        c = x.shape[0]
        if c < 1:
            raise ValueError(f"{name}: C={c}, a video needs at least one channel")
        gt, gh, gw = _patch_grid(name, x.shape[1:], patch)
        pt, ph, pw = patch
        x = x.reshape(c, gt, pt, gh, ph, gw, pw).permute(1, 3, 5, 0, 2, 4, 6)  # (T', H', W', C, pt, ph, pw)
        x = x.reshape(gt * gh * gw, c * pt * ph * pw)                          # (L, C·p) t-major
        if tile is not None:
            rows.append(order_rows((gt, gh, gw), order, tile, x.device))       # (L,) t-major row of each token
            x = x[rows[-1]]
        pieces.append(x)
        grids.append((gt, gh, gw))

    device = first.device
    seqlens = [gt * gh * gw for gt, gh, gw in grids]
    cu_seqlens, seq_ids, n = _cu_seqlens(seqlens, device)
    grid = torch.tensor(grids, dtype=torch.int32, device=device)

    # (t, h, w) of every token from its t-major offset inside its sequence, all on device.
    g = grid.long()[seq_ids.long()]  # (N, 3)
    if rows:
        local = torch.cat(rows)  # (N,)
    else:
        local = torch.arange(n, device=device) - cu_seqlens.long()[seq_ids.long()]  # (N,)
    hw = g[:, 1] * g[:, 2]
    coords = torch.stack([local // hw, (local % hw) // g[:, 2], local % g[:, 2]], dim=1).to(torch.int32)

    return PackedVideos(
        tokens=torch.cat(pieces),
        cu_seqlens=cu_seqlens,
        grid=grid,
        coords=coords,
        seq_ids=seq_ids,
        max_seqlen=max(seqlens),
        patch=patch,
        frames=tuple(g[0] for g in grids),
        order=order,
        tile=tile,
    )


# ----------------------------------------------------------------------------------------------
# text


@dataclass(eq=False)
class PackedSequences(_Packed):
    """B token sequences ``(L_i, D)`` back to back (L_i = 0 allowed), e.g. text for cross-attention.

    tokens:      ``(N, D)``, the inputs' dtype and device.
    cu_seqlens:  ``(B+1,)`` int32; sequence i is rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
    seq_ids:     ``(N,)`` int32; which sequence each token belongs to.
    max_seqlen:  python int; the longest sequence (0 if all are empty).
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_ids: torch.Tensor
    max_seqlen: int

    def unpack(self, tokens_out: torch.Tensor) -> list[torch.Tensor]:
        """``(N, D')`` -> list of ``(L_i, D')`` views of ``tokens_out``."""
        _check_rows("tokens_out", tokens_out, self.num_tokens, "(N, D)")
        return list(tokens_out.split(self.seqlens))


def pack_sequences(seqs: Sequence[torch.Tensor]) -> PackedSequences:
    """Concatenate B tensors ``(L_i, D)`` (one D, dtype and device; L_i = 0 allowed) without padding."""
    _check_list("seqs", seqs, "(L, D)")
    first = seqs[0]
    for i, x in enumerate(seqs):
        name = f"seqs[{i}]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(x)}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (L, D), got shape {tuple(x.shape)}")
        if i and x.shape[1] != first.shape[1]:
            raise ValueError(f"{name} has D={x.shape[1]}, seqs[0] has D={first.shape[1]}")
        if i:
            _check_same(name, x, first, "seqs[0]")
    seqlens = [x.shape[0] for x in seqs]
    cu_seqlens, seq_ids, _ = _cu_seqlens(seqlens, first.device)
    return PackedSequences(
        tokens=torch.cat(list(seqs)), cu_seqlens=cu_seqlens, seq_ids=seq_ids, max_seqlen=max(seqlens)
    )


# ----------------------------------------------------------------------------------------------
# token-budget batching


@dataclass
class BatchPlan:
    """Samples grouped into batches of at most ``token_budget`` tokens each.

    batches:          indices into the planned ``shapes``, ascending within a batch; every index once.
    tokens_per_batch: token total of each batch.
    """

    batches: list[list[int]]
    tokens_per_batch: list[int]
    token_budget: int

    @property
    def fill_ratio(self) -> float:
        """Total tokens / (num_batches * token_budget); 0.0 for an empty plan."""
        if not self.batches:
            return 0.0
        return sum(self.tokens_per_batch) / (len(self.batches) * self.token_budget)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def summary(self) -> str:
        n = sum(len(b) for b in self.batches)
        total = sum(self.tokens_per_batch)
        lo = min(self.tokens_per_batch, default=0) / self.token_budget
        hi = max(self.tokens_per_batch, default=0) / self.token_budget
        return (
            f"{n} samples, {total:,} tokens -> {len(self.batches)} batches of <= {self.token_budget:,} tokens, "
            f"fill {self.fill_ratio:.1%} (min {lo:.1%}, max {hi:.1%})"
        )


ShapeLike = Union[int, Sequence[int]]


def _sample_tokens(i: int, s: ShapeLike, patch: tuple[int, int, int]) -> int:
    name = f"shapes[{i}]"
    if _is_int(s):
        if s < 1:
            raise ValueError(f"{name} has {s} tokens; every sample needs at least 1")
        return int(s)
    if not isinstance(s, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be an int token count or a (C, T, H, W) / (T, H, W) shape, got {_type_name(s)}")
    if len(s) not in (3, 4):
        raise ValueError(f"{name} must be a (C, T, H, W) or (T, H, W) shape, got {tuple(s)} of length {len(s)}")
    for d in s:
        if not _is_int(d):
            raise TypeError(f"{name} must hold ints, got {d!r} ({_type_name(d)}) in {tuple(s)}")
    if len(s) == 4 and s[0] < 1:
        raise ValueError(f"{name}: C={s[0]}, a video needs at least one channel")
    gt, gh, gw = _patch_grid(name, s[-3:], patch)
    return gt * gh * gw


def plan_batches(
    shapes: Sequence[ShapeLike], token_budget: int, patch: tuple[int, int, int] = (1, 2, 2)
) -> BatchPlan:
    """Group samples into batches of at most ``token_budget`` tokens, first-fit decreasing.

    shapes:       per sample, an int token count or a latent shape ``(C, T, H, W)`` / ``(T, H, W)``
                  (tokens = (T/pt)(H/ph)(W/pw)); every sample is kept whole, none dropped or cropped.
    token_budget: positive int; a sample larger than it is a ValueError.
    Deterministic: larger samples are placed first, ties by index; batches are in order of opening.
    No two batches of the plan fit together in one budget (first fit guarantees it), and first-fit
    decreasing needs at most 11/9 of the minimal number of batches, plus one.
    """
    if not _is_int(token_budget):
        raise TypeError(f"token_budget must be a positive int, got {token_budget!r} ({_type_name(token_budget)})")
    if token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget}")
    patch = _check_patch(patch)
    if not isinstance(shapes, (list, tuple)):
        raise TypeError(f"shapes must be a list or tuple, got {_type_name(shapes)}")
    counts = [_sample_tokens(i, s, patch) for i, s in enumerate(shapes)]
    for i, c in enumerate(counts):
        if c > token_budget:
            raise ValueError(f"shapes[{i}] has {c} tokens, more than token_budget={token_budget}")

    # First fit in O(n log n): a max-tree over the room left in n bin slots. Unopened slots have full
    # room and lie right of every opened bin, so the leftmost slot with room is the first fit.
    n = len(counts)
    size = 1
    while size < n:
        size *= 2
    room = [token_budget] * (2 * size)
    batches: list[list[int]] = []
    for i in sorted(range(n), key=lambda j: (-counts[j], j)):
        k = 1
        while k < size:
            k = 2 * k if room[2 * k] >= counts[i] else 2 * k + 1
        b = k - size
        if b == len(batches):
            batches.append([])
        batches[b].append(i)
        room[k] -= counts[i]
        while k > 1:
            k //= 2
            room[k] = max(room[2 * k], room[2 * k + 1])
    batches = [sorted(b) for b in batches]
    return BatchPlan(
        batches=batches,
        tokens_per_batch=[sum(counts[i] for i in b) for b in batches],
        token_budget=int(token_budget),
    )
