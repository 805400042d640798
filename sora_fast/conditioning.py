"""What a generated video is conditioned on: media read from files, :class:`Condition` (an image or a clip
placed at a pixel frame) and the checks of ``generate``'s ``init_videos`` and ``conditions`` arguments, each
returning CPU float tensors ``(3, T, H, W)`` in [-1, 1]. How conditions are encoded and placed in the
latents is :meth:`sora_fast.pipeline.VideoPipeline.generate`'s."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

import torch

Media = Union[torch.Tensor, str, "os.PathLike[str]"]  # a tensor or the path of a video or image file

__all__ = ["Condition", "read_media", "check_media", "check_init_videos", "check_conditions",
           "check_condition_list"]


def read_media(path: Union[str, "os.PathLike[str]"], name: str = "path") -> torch.Tensor:
    """Every frame of a video file (PyAV) or an image (Pillow, one frame) as a ``(3, T, H, W)`` float tensor
    in [-1, 1], the format :meth:`VideoPipeline.generate` returns; nothing is resized or cut. A missing or
    non-regular file is a FileNotFoundError, an undecodable one a ValueError, each naming ``name``."""
    import stat

    import numpy as np

    from .data.io import _import_av, _import_pil
    from .data.video_folder import IMAGE_EXTENSIONS

    f = Path(path)
    try:
        st = f.stat()
    except OSError as e:
        raise FileNotFoundError(f"{name}: cannot read {str(f)!r} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(f"{name}: {str(f)!r} is not a regular file")
    try:
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            Image = _import_pil("to read images")
            with Image.open(f) as im:
                frames = np.array(im.convert("RGB"))[None]
        else:
            av = _import_av("to read videos")
            with av.open(str(f)) as c:
                if not c.streams.video:
                    raise ValueError("no video stream")
                frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(c.streams.video[0])]
            if not frames:
                raise ValueError("no decodable frame")
            if len({fr.shape for fr in frames}) != 1:
                raise ValueError("the frame size changes mid-stream")
            frames = np.stack(frames)
    except ImportError:
        raise
    except Exception as e:  # any decoder failure names the file
        raise ValueError(f"{name}: {str(f)!r} is not a readable video or image ({type(e).__name__}: {e})") from e
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()  # (3, T, H, W) in [0, 255]
    return x / 127.5 - 1.0


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare media tensors
class Condition:
    """An image or a clip that a generated video must contain at a given place (image-to-video, extension,
    keyframes).

    Args:
        media: a ``(3, T, H, W)`` float tensor in [-1, 1] (the format :meth:`VideoPipeline.generate` returns;
            T = 1 for an image) or the path of an image or video file (read whole by :func:`read_media`, never
            resized). T must be ``1 + 4k`` (a valid video length for the causal VAE) and ``(H, W)`` the
            generated video's.
        frame: the pixel frame of the output where its first frame goes; negative counts from the end
            (``-1`` is the last frame). After that it must be a multiple of the VAE's time factor (4): see
            :meth:`VideoPipeline.generate` for how it is encoded and placed.
        strength: in [0, 1]; 1 keeps its frames exactly (noise level 0), lower re-noises them to level
            ``σc = 1 − strength``, at which they are held.
    """

    media: Media
    frame: int = 0
    strength: float = 1.0


def check_init_videos(init_videos, b: int, name: Optional[str] = None) -> list[Optional[torch.Tensor]]:
    """``init_videos`` as B tensors ``(3, T, H, W)`` in [-1, 1] on the CPU or None (files are read)."""
    if name is not None:  # one media of a Condition: required, named as given
        v = init_videos[0]
        if v is None:
            raise TypeError(f"{name} must be a (3, T, H, W) float tensor in [-1, 1] or an image or video path, "
                            "got None")
        return [check_media(v, name)]
    if init_videos is None:
        return [None] * b
    if not isinstance(init_videos, (list, tuple)) or len(init_videos) != b:
        got = (f"a list of {len(init_videos)}" if isinstance(init_videos, (list, tuple))
               else type(init_videos).__name__)
        raise TypeError(f"init_videos must be a list of {b} entries (one per prompt: a (3, T, H, W) tensor, "
                        f"a video or image path, or None), got {got}")
    return [None if v is None else check_media(v, f"init_videos[{i}]") for i, v in enumerate(init_videos)]

def check_media(v, name: str) -> torch.Tensor:
    """One video or image (tensor or path) as a ``(3, T, H, W)`` CPU float tensor in [-1, 1]."""
    if isinstance(v, (str, os.PathLike)):
        v = read_media(v, name)
    elif not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a (3, T, H, W) float tensor in [-1, 1], a video or image path, "
                        f"or None, got {type(v).__name__}")
    if not v.is_floating_point() or v.dim() != 4 or v.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, T, H, W) float tensor in [-1, 1], got {v.dtype} of shape "
                         f"{tuple(v.shape)}")
    v = v.detach().float().cpu()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} has {int((~torch.isfinite(v)).sum())} NaN / Inf values; expected values "
                         "in [-1, 1]")
    lo, hi = float(v.min()), float(v.max())
    if lo < -1.0 or hi > 1.0:
        raise ValueError(f"{name} must have values in [-1, 1] (the format generate returns), got "
                         f"[{lo:.4g}, {hi:.4g}]")
    return v

def check_conditions(conditions, sizes: list, b: int, temporal_factor: int, temporal_patch: int = 1
                     ) -> list[list[tuple]]:
    """``conditions`` -> per prompt a list of ``(media (3, T, H, W) CPU float, first latent frame, level)``,
    every rule checked against the prompt's size (see :meth:`VideoPipeline.generate`)."""
    if conditions is None:
        return [[] for _ in range(b)]
    if not isinstance(conditions, (list, tuple)) or len(conditions) != b:
        got = f"a list of {len(conditions)}" if isinstance(conditions, (list, tuple)) else type(conditions).__name__
        raise TypeError(f"conditions must be a list of {b} lists of Condition (one per prompt; [] for none), "
                        f"got {got}")
    return [check_condition_list(conds, size, temporal_factor, temporal_patch, name=f"conditions[{i}]",
                                 video=f"prompt {i}'s video") for i, (conds, size) in enumerate(zip(conditions, sizes))]


def check_condition_list(conds, size, temporal_factor: int, temporal_patch: int = 1, *, name: str = "conditions",
                         video: str = "the video") -> list[tuple]:
    """One video's list of :class:`Condition` -> ``(media (3, T, H, W) CPU float, first latent frame, level)``
    per condition (media read from files), every rule checked against the video's ``size`` ``(frames, height,
    width)``: errors name ``name[j]`` and ``video``. With a temporal patch ``pt > 1`` a condition's latent
    frames must be whole patch frames (the DiT has one timestep per ``pt`` latent frames)."""
    if isinstance(conds, Condition) or not isinstance(conds, (list, tuple)):
        raise TypeError(f"{name} must be a list of Condition (empty for none), got {type(conds).__name__}")
    tf, pt = temporal_factor, temporal_patch
    t, h, w = size
    placed, used = [], {}
    for j, c in enumerate(conds):
        cname = f"{name}[{j}]"
        if not isinstance(c, Condition):
            raise TypeError(f"{cname} must be a sora_fast.Condition, got {type(c).__name__}")
        st = c.strength
        if isinstance(st, bool) or not isinstance(st, (int, float)):
            raise TypeError(f"{cname}.strength must be a number in [0, 1], got {type(st).__name__}")
        if not (0.0 <= st <= 1.0):  # NaN fails too
            raise ValueError(f"{cname}.strength must be a number in [0, 1], got {st!r}")
        fr = c.frame
        if isinstance(fr, bool) or not isinstance(fr, int):
            raise TypeError(f"{cname}.frame must be an int (a pixel frame index, negative from the end), got "
                            f"{type(fr).__name__}")
        if not -t <= fr < t:
            raise ValueError(f"{cname}.frame={fr} is outside {video}: expected a pixel frame in [{-t}, {t - 1}] "
                             f"(it has {t} frames)")
        p = fr + t if fr < 0 else fr
        (v,) = check_init_videos([c.media], 1, name=f"{cname}.media")
        n = v.shape[1]
        if (n - 1) % tf:
            raise ValueError(f"{cname}.media has {n} frames; expected 1 + {tf}k (1 for an image) so that it "
                             "encodes to whole latent frames")
        if tuple(v.shape[2:]) != (h, w):
            raise ValueError(f"{cname}.media is {v.shape[2]}x{v.shape[3]} (height x width) but {video} is "
                             f"{h}x{w}; a condition is never resized: pass media of the requested size")
        if n > t:
            raise ValueError(f"{cname}.media has {n} frames, more than the {t} of {video}")
        if p % tf:
            raise ValueError(f"{cname}.frame={fr} (pixel frame {p}) must be a multiple of {tf} (0, {tf}, "
                             f"{2 * tf}, ..., or a negative index that lands on one, e.g. -1 for the last "
                             f"frame): a condition's first frame goes into latent frame frame/{tf}; nearest "
                             f"valid: {p // tf * tf} or {p // tf * tf + tf}")
        if p + n > t:
            raise ValueError(f"{cname}: its {n} frames from pixel frame {p} run past the end of {video} ({t} "
                             f"frames; the last starts at {t - n} at most)")
        first, count = p // tf, 1 + (n - 1) // tf
        if pt > 1 and (first % pt or count % pt):
            raise ValueError(f"{cname} gives latent frames {first}..{first + count - 1}, but the DiT's temporal "
                             f"patch is {pt}: a condition must give whole patch frames (a first latent frame "
                             f"and a count that are multiples of {pt}; {1 + tf * (pt - 1)} media frames at pixel "
                             f"frame 0, {tf * pt}, {2 * tf * pt}, ...)")
        for k in range(first, first + count):
            if k in used:
                raise ValueError(f"{cname} overlaps {name}[{used[k]}]: both give latent frame {k} "
                                 f"(pixel frames {max(0, tf * k - tf + 1)}..{tf * k})")
            used[k] = j
        placed.append((v, first, 1.0 - float(st)))
    return placed
