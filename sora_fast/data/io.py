"""Video and image writers: ``.mp4`` (PyAV), ``.gif`` / ``.png`` (Pillow), contact sheets.

Every writer checks that its output path can be written *before* doing any work, writes to a temporary
file in the same folder and moves it into place with ``os.replace``, so a crash never leaves a
half-written file under the final name.

Video layouts accepted everywhere (see :func:`to_uint8`):

- ``(3, T, H, W)`` floating point in ``[-1, 1]`` (torch or numpy) — the dataset / model layout;
- ``(T, H, W, 3)`` uint8 (torch or numpy) — the decoded-frames layout.

PyAV (``av``) is needed for ``.mp4`` only, Pillow for ``.gif``/``.png`` and contact sheets; both come
with the ``video`` extra (``pip install 'sora-fast[video]'``).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["to_uint8", "write_video", "write_contact_sheet", "VIDEO_WRITE_EXTENSIONS"]

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[torch.Tensor, np.ndarray]

VIDEO_WRITE_EXTENSIONS = (".mp4", ".gif", ".png")


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by the other modules of sora_fast.data)


def _progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enable: bool = True):
    """tqdm progress bar when ``enable`` (and tqdm is installed), else the plain iterable."""
    if not enable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a reason to fail
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _import_av(why: str):
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is installed in the test environment
        raise ImportError(f"PyAV is needed {why}: pip install 'sora-fast[video]' (or pip install av)") from e
    return av


def _import_pil(why: str):
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"Pillow is needed {why}: pip install 'sora-fast[video]' (or pip install pillow)") from e
    return Image


def _check_writable(path: PathLike, arg: str = "path") -> Path:
    """Resolve ``path``, create its parent folders, and check a file can be created there.

    Raises OSError naming the path when the parent cannot be created or written, or ``path`` is a folder.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise IsADirectoryError(f"{arg} must be a file path, got the existing folder {str(p)!r}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{arg}={str(p)!r} cannot be written: cannot create its folder ({e})") from e
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{arg}={str(p)!r} cannot be written: no write permission on {str(p.parent)!r}")
    if p.exists() and not os.access(p, os.W_OK):
        raise PermissionError(f"{arg}={str(p)!r} cannot be written: the existing file is read-only")
    return p


class _AtomicFile:
    """Context manager yielding a temporary path next to ``final``; on success it is moved onto
    ``final`` with ``os.replace`` (atomic on POSIX), on error it is removed."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.final.stem}.", suffix=f".tmp{self.final.suffix}",
                                   dir=self.final.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            with open(self.tmp, "rb") as f:  # on disk before the rename, so a crash never exposes a partial file
                os.fsync(f.fileno())
            os.replace(self.tmp, self.final)
        else:
            try:
                self.tmp.unlink()
            except OSError:
                pass
        return False


# ----------------------------------------------------------------------------------------------
# layout conversion


def to_uint8(video: ArrayLike) -> np.ndarray:
    """Convert a video or image to ``(T, H, W, 3)`` uint8 numpy frames.

    video: ``(3, T, H, W)`` or ``(3, H, W)`` floating point in ``[-1, 1]`` (values outside are clamped;
           ``x -> round((x + 1) * 127.5)``; NaN / Inf values are an error naming their count, never a
           silent grey), or ``(T, H, W, 3)`` / ``(H, W, 3)`` uint8 (returned as is,
           contiguous). torch tensors (any device; detached, moved to CPU) or numpy arrays.
    returns: ``(T, H, W, 3)`` uint8, C-contiguous; an image gives ``T = 1``.
    """
    if isinstance(video, torch.Tensor):
        x = video.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.cpu().numpy()
    elif isinstance(video, np.ndarray):
        x = video
    else:
        raise TypeError(f"video must be a torch.Tensor or numpy.ndarray, got {type(video).__name__}")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be (T, H, W, 3) or (H, W, 3), got shape {tuple(video.shape)}")
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"video must be floating point (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3), got dtype {video.dtype}"
        )
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(
            f"a floating-point video must be (3, T, H, W) or (3, H, W) in [-1, 1], got shape {tuple(video.shape)}"
        )
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"video must have T, H, W >= 1, got shape {tuple(video.shape)}")
    x = x.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        n_bad, n_nan = int((~finite).sum()), int(np.isnan(x).sum())
        raise ValueError(f"video has {n_bad} non-finite values of {x.size} ({n_nan} NaN, {n_bad - n_nan} Inf); "
                         f"refusing to write them as flat frames (the model diverged or its weights are corrupt)")
    x = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


# ----------------------------------------------------------------------------------------------
# writers


def _check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    return float(fps)


def _pick_codec(av, codec: Optional[str]) -> str:
    candidates = [codec] if codec else ["libx264", "mpeg4"]
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise ValueError(f"codec must be an H.264/MPEG-4 encoder available to PyAV, got {candidates} (none available)")


def _write_mp4(tmp: Path, frames: np.ndarray, fps: float, codec: Optional[str], crf: int) -> None:
    from fractions import Fraction

    av = _import_av("to write .mp4 files")
    name = _pick_codec(av, codec)
    t, h, w, _ = frames.shape
    # yuv420p stores chroma at half resolution, so both encoders need even sides: pad by repeating the
    # last row / column (the file is then up to 1 px taller / wider than the input).
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=rate)
        stream.width, stream.height = w + pw, h + ph
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # small clips; no oversubscription of shared CPUs
        if name == "libx264":
            # mbtree off: x264's macroblock-tree rate control made the bytes of the same frames differ
            # between encodes in one process (about 1 in 12); without it the file is a function of the frames.
            stream.options = {"crf": str(int(crf)), "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        else:  # mpeg4: near-best quality by bounding the quantizer (1 = best, 31 = worst)
            stream.codec_context.qmin, stream.codec_context.qmax = 1, 3
            stream.bit_rate = 8_000_000
        for f in frames:
            # Convert to yuv420p here: leaving it to the encoder made the bytes of the same clip differ
            # between runs; with an explicit conversion the file is a function of the frames.
            frame = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_pil(tmp: Path, frames: np.ndarray, fps: float, fmt: str) -> None:
    Image = _import_pil(f"to write .{fmt.lower()} files")
    images = [Image.fromarray(f) for f in frames]
    if fmt == "PNG":
        images[0].save(tmp, format="PNG")
        return
    # GIF delays are whole centiseconds; loop=0 loops forever, disposal=2 restores the background.
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps,
                   loop=0, disposal=2, optimize=False)


def write_video(path: PathLike, video: ArrayLike, fps: float = 8, *, codec: Optional[str] = None,
                crf: int = 12) -> Path:
    """Write a video (or an image) to ``path``; the format follows the suffix.

    path:  ``.mp4`` — H.264 (``libx264``, ``crf`` quality, yuv420p) through PyAV, or MPEG-4 Part 2
           (``mpeg4``) when libx264 is not available; yuv420p needs even sides, so an odd height or width
           is padded by one row / column repeating the edge (the file is then that much larger).
           ``.gif`` — Pillow, 256-colour palette, ``1000/fps`` ms per frame (rounded to 10 ms by the format).
           ``.png`` — Pillow, lossless; 1-frame videos only.
    video: ``(3, T, H, W)`` float in ``[-1, 1]`` or ``(T, H, W, 3)`` uint8 (see :func:`to_uint8`).
    fps:   frames per second, positive.
    codec: force an mp4 encoder by its FFmpeg name (``"libx264"`` / ``"mpeg4"``); None picks the first available.
    crf:   libx264 constant rate factor (0 lossless … 51 worst); the default 12 is visually lossless.
    returns: the written path. Raises OSError naming the path when it cannot be written, checked first.
    """
    p = Path(os.fspath(path))
    ext = p.suffix.lower()
    if ext not in VIDEO_WRITE_EXTENSIONS:
        raise ValueError(f"path must end in one of {VIDEO_WRITE_EXTENSIONS}, got {str(p)!r}")
    fps = _check_fps(fps)
    p = _check_writable(p)
    frames = to_uint8(video)
    if ext == ".png" and frames.shape[0] != 1:
        raise ValueError(f"a .png holds one frame, got a video of {frames.shape[0]} frames for {str(p)!r}"
                         " (use .mp4 or .gif)")
    with _AtomicFile(p) as tmp:
        if ext == ".mp4":
            _write_mp4(tmp, frames, fps, codec, crf)
        else:
            _write_pil(tmp, frames, fps, "PNG" if ext == ".png" else "GIF")
    return p


def write_contact_sheet(path: PathLike, clips: Sequence[ArrayLike], captions: Optional[Sequence[str]] = None, *,
                        frames_per_clip: int = 4, scale: Optional[int] = None) -> Path:
    """Write a PNG grid: one row per clip, ``frames_per_clip`` frames evenly spaced over the clip.

    clips:    a sequence of videos, each ``(3, T, H, W)`` float in ``[-1, 1]`` or ``(T, H, W, 3)`` uint8;
              sizes may differ (each frame sits top-left in a cell of the largest size, on dark gray).
              A clip shorter than ``frames_per_clip`` shows all its frames.
    captions: optional, one string per clip, printed under its row.
    scale:    integer nearest-neighbour upscaling of the frames; None picks one that makes the largest
              side at least 128 px (small demo clips stay readable).
    returns: the written path (``.png``). Raises OSError naming the path when it cannot be written.
    """
    p = Path(os.fspath(path))
    if p.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(p)!r}")
    if isinstance(clips, (torch.Tensor, np.ndarray)) or not isinstance(clips, Sequence) or len(clips) == 0:
        raise ValueError(f"clips must be a non-empty list of videos, got {type(clips).__name__}"
                         + (f" of length {len(clips)}" if isinstance(clips, Sequence) else ""))
    if captions is not None and (isinstance(captions, str) or len(captions) != len(clips)):
        raise ValueError(f"captions must be None or a list of {len(clips)} strings (one per clip), got "
                         f"{captions!r:.80}")
    if isinstance(frames_per_clip, bool) or not isinstance(frames_per_clip, int) or frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be a positive int, got {frames_per_clip!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"scale must be None or a positive int, got {scale!r}")
    p = _check_writable(p)
    Image = _import_pil("to write contact sheets")
    from PIL import ImageDraw, ImageFont

    frames = [to_uint8(c) for c in clips]
    ch = max(f.shape[1] for f in frames)
    cw = max(f.shape[2] for f in frames)
    if scale is None:
        scale = max(1, math.ceil(128 / max(ch, cw)))
    ch, cw = ch * scale, cw * scale
    pad, text_h = 4, (14 if captions is not None else 0)
    ncols = min(frames_per_clip, max(f.shape[0] for f in frames))
    sheet = Image.new("RGB", (pad + ncols * (cw + pad), pad + len(frames) * (ch + text_h + pad)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, f in enumerate(frames):
        t = f.shape[0]
        idx = np.unique(np.linspace(0, t - 1, min(ncols, t)).round().astype(int))
        y = pad + r * (ch + text_h + pad)
        for c, i in enumerate(idx):
            im = Image.fromarray(f[i])
            if scale > 1:
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            sheet.paste(im, (pad + c * (cw + pad), y))
        if captions is not None:
            text = f"{captions[r]}  [{t} frames]"
            try:
                draw.text((pad, y + ch + 1), text, fill=(230, 230, 230), font=font)
            except UnicodeError:  # a bitmap font (Pillow without FreeType) holds Latin-1 only
                text = text.encode("latin-1", errors="backslashreplace").decode("latin-1")
                draw.text((pad, y + ch + 1), text, fill=(230, 230, 230), font=font)
    with _AtomicFile(p) as tmp:
        sheet.save(tmp, format="PNG")
    return p
