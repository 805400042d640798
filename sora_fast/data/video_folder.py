"""A folder of captioned videos and images as a torch Dataset, at native resolution and duration.

Files: videos (``.mp4 .webm .gif .mov .mkv .avi``, decoded with PyAV) and images (``.png .jpg .jpeg
.bmp .webp``, read with Pillow, as 1-frame videos). Captions come from a sidecar ``<stem>.txt`` next to
each file, or from a JSONL manifest of ``{"path": ..., "caption": ...}`` lines.

Nothing is cropped, and nothing flipped but what a display matrix asks for (below). Two optional reductions
keep samples model-friendly:

- **space**: frames are downscaled (never upscaled; bilinear with antialiasing) to at most ``max_area``
  pixels with both sides multiples of ``size_multiple`` ``m`` (e.g. VAE factor x patch size = 16). With
  ``s = min(1, sqrt(max_area / (H * W)))`` each side ``H*s``, ``W*s`` is rounded down or up to a multiple
  of ``m``; of the (at most four) combinations that stay within ``max_area`` and the native size, the
  one whose aspect ratio is closest to the native one is used, the larger on ties (:func:`fit_size`).
  So the result is the largest multiple-of-``m`` size near the scaled size that keeps the aspect best:
  ``48x64`` at ``max_area=1024, m=16`` gives ``32x32`` (rounding both sides down would give ``16x32``).
  Without ``max_area`` only the rounding down to multiples happens. A frame with a side below ``m``
  cannot be resized without upscaling and is skipped.
- **time**: with ``fps``, the stream is resampled by its real timestamps (variable frame rate included):
  for each target time ``k / fps`` the frame nearest in time (:func:`~sora_fast.data.video_decode.select_frames`);
  ``max_seconds`` keeps the first seconds only. Then the first ``T'`` frames are kept, ``T'`` the largest
  count <= ``min(T, max_frames)`` of the form ``frame_offset + k * frame_multiple`` (``frame_multiple=4,
  frame_offset=1`` gives the ``1 + 4k`` frames a 4x causal VAE needs), or whatever a custom
  ``frames_rule(T) -> T'`` returns.

Camera files are read as they display: a rotation / mirror in the display matrix (phones' portrait
video) is applied to the frames, so ``(H, W)`` are the upright sizes. Odd sizes (VP9, 4:4:4 H.264, cropped
streams) are read exactly; with ``size_multiple > 1`` they are resized down like any other size.

Broken files never stop a run. Strategy: at construction every file is *probed* (container and stream
opened, the first frame decoded, the frame count read from the metadata or counted from the packets),
with a progress bar; files that fail are left out and listed in :attr:`VideoFolder.skipped` with the
reason, and a summary line says how many. A file can still turn out truncated past its first frame;
``__getitem__`` then records it in :attr:`skipped`, warns, and returns the next readable item instead
(its ``index`` says which), so a training loop goes on. ``verify=True`` decodes every file completely at
construction instead (exact frame counts, no surprises later, slower). With DataLoader workers, skips
found in ``__getitem__`` are recorded in the worker process that found them. :func:`write_skip_report`
writes every skipped file with its reason to a JSONL file.

Every file is checked with ``os.stat`` before it is opened: only regular files are read (a FIFO, device or
socket is skipped with its kind, never opened: opening a FIFO blocks). Files are confined to ``root``:
a manifest path (``../x.mp4``, an absolute path) or a symbolic link whose real path lies outside the
folder is skipped as ``"outside root"`` unless ``allow_outside_root=True``. A caption file that is not
valid UTF-8 skips its video (``"caption is not valid UTF-8"``) rather than training it on an empty caption.
:meth:`VideoFolder.identity` (the files read with their sizes and mtimes, the captions, the manifest's
hash and the settings) is what a latent cache is keyed on.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .io import _AtomicFile, _import_av, _import_pil, _progress
from .video_decode import Orientation, UnreadableFileError, VideoInfo, _err, check_rate, decode_video, probe_video

__all__ = ["VideoFolder", "Skipped", "UnreadableFileError", "fit_size", "find_media", "write_skip_report",
           "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class Skipped(NamedTuple):
    """A file left out of the dataset: its path and why (``"<kind>: <detail>"``)."""

    path: str
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass
class _Entry:
    path: Path
    caption: str
    is_image: bool
    native: tuple[int, int, int]  # (T, H, W) as stored
    size: tuple[int, int, int]  # (T', H', W') as returned
    fps: float  # of the items: the target fps, else the stream's average rate (0.0 for images)
    has_caption: bool
    stat: tuple[int, int] = (0, 0)  # (size in bytes, mtime in ns) when probed
    orientation: Orientation = Orientation()


def _positive_int(name: str, v, allow_none: bool = False, minimum: int = 1):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {v!r}")
    return int(v)


def fit_size(h: int, w: int, max_area: Optional[int] = None, size_multiple: int = 1) -> tuple[int, int]:
    """The ``(H', W')`` a ``(h, w)`` frame is resized to (module docstring); never larger than ``(h, w)``.

    Raises :class:`UnreadableFileError` ("too small") when a side is below one ``size_multiple``.
    """
    m = size_multiple
    s = 1.0 if max_area is None else min(1.0, math.sqrt(max_area / (h * w)))
    best = None
    for hc in {math.floor(h * s / m + 1e-9) * m, math.ceil(h * s / m - 1e-9) * m}:
        for wc in {math.floor(w * s / m + 1e-9) * m, math.ceil(w * s / m - 1e-9) * m}:
            if not (m <= hc <= h and m <= wc <= w) or (max_area is not None and hc * wc > max_area):
                continue
            key = (abs(math.log((wc / hc) / (w / h))), -hc * wc)
            if best is None or key < best[0]:
                best = (key, (int(hc), int(wc)))
    if best is None:
        raise UnreadableFileError(f"too small: {h}x{w} px cannot be resized to sides that are multiples of"
                                  f" size_multiple={m}" + (f" within max_area={max_area}" if max_area else "")
                                  + " without upscaling")
    return best[1]


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _regular_stat(path: Path, what: str = "") -> os.stat_result:
    """``os.stat(path)`` (following links) of a regular file, without opening it; UnreadableFileError naming
    the kind of file otherwise (``what`` says which file, e.g. the caption of a video)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        broken = " (broken symbolic link)" if os.path.islink(path) else ""
        raise UnreadableFileError(f"not found: {what}no such file{broken}") from e
    except OSError as e:
        raise UnreadableFileError(f"unreadable: {what}{_err(e)}") from e
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), f"mode {oct(st.st_mode)}")
        raise UnreadableFileError(f"not a regular file: {what}{kind}, not opened")
    return st


def find_media(root: Path, recursive: bool = True) -> list[Path]:
    """The video and image files of ``root`` as :class:`VideoFolder` finds them without a manifest: by extension
    (:data:`VIDEO_EXTENSIONS`, :data:`IMAGE_EXTENSIONS`, any case), hidden files and folders (``.name``) left
    out, in sorted relative-path order. Not only regular files: a FIFO, device or broken link with a media name
    is listed (a reader names and skips it, never silently drops it)."""
    root = Path(root)
    exts = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    it = root.rglob("*") if recursive else root.iterdir()
    files = [p for p in it if p.suffix.lower() in exts and not p.is_dir()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def first_readable(ds, index, n: int, name_of: Callable[[int], str], all_failed: str) -> dict:
    """``ds.load(index)``, or when that item turns out unreadable the next readable one (wrapping around):
    the broken item is remembered in ``ds._broken``, recorded in ``ds.skipped`` (named by ``name_of``) and
    warned about, so one bad file never stops a training loop. ``n`` is ``len(ds)``; RuntimeError with
    ``all_failed`` when no item loads."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not -n <= index < n:
        raise IndexError(f"index {index} is out of range for a {type(ds).__name__} of {n} items")
    index = int(index) % n
    for k in range(n):
        j = (index + k) % n
        if j in ds._broken:
            continue
        try:
            return ds.load(j)
        except UnreadableFileError as err:
            ds._broken.add(j)
            ds.skipped.append(Skipped(name_of(j), str(err)))
            warnings.warn(f"{type(ds).__name__}: skipping {name_of(j)} ({err}); returning the next readable item "
                          "instead", RuntimeWarning, stacklevel=3)
    raise RuntimeError(f"{all_failed}; see .skipped")


class VideoFolder(Dataset):
    """Captioned videos and images of a folder, at native size (module docstring: reductions, broken files).

    root:           the folder; files are found recursively (``recursive``), hidden files (``.name``) ignored,
                    in sorted path order. With a ``manifest``, exactly the manifest's files are used.
    manifest:       optional JSONL file, one ``{"path": ..., "caption": ...}`` object per line; relative paths
                    are relative to ``root``; a missing ``caption`` falls back to the sidecar ``.txt``.
                    A relative manifest path that does not exist is looked up inside ``root``.
    max_area:       optional pixel budget per frame (H*W) for downscaling; None keeps the native size.
    size_multiple:  both output sides are multiples of it (default 1: any size).
    max_frames:     optional cap on the number of frames kept.
    frame_multiple, frame_offset: kept frame counts are ``frame_offset + k * frame_multiple`` (>= 1).
    frames_rule:    optional ``f(T) -> T'`` replacing the two above; ``T`` is the frame count after
                    ``max_frames``, ``0 <= T' <= T``, 0 skips the file.
    fps:            optional target frame rate: frames are picked by their timestamps, nearest to ``k / fps``
                    (a repeated frame where the stream is slower); None keeps every frame.
    max_seconds:    optional maximum duration: only frames (or targets) before this time are kept.
    verify:         decode every file completely at construction (see the module docstring).
    progress:       progress bar while probing, and a summary line on stderr at the end.
    allow_outside_root: also read files whose real path is outside ``root`` (manifest paths with ``..`` or
                    absolute ones, symbolic links); by default they are skipped as ``"outside root"``.

    Items: ``{"video": (3, T, H, W) float32 in [-1, 1], "caption": str, "path": str, "fps": float,
    "index": int}`` (``fps``: the target rate when given, else the stream's average rate). :attr:`shapes`
    gives every item's ``(3, T, H, W)`` without decoding (for :func:`sora_fast.packing.plan_batches` after
    the VAE's reduction), :attr:`skipped` the files left out (``(path, reason)`` pairs), :meth:`identity`
    what a latent cache of the folder is keyed on.
    """

    def __init__(self, root: Union[str, "os.PathLike[str]"], *, manifest: Union[str, "os.PathLike[str]", None] = None,
                 max_area: Optional[int] = None, size_multiple: int = 1, max_frames: Optional[int] = None,
                 frame_multiple: int = 1, frame_offset: int = 0, frames_rule: Optional[Callable[[int], int]] = None,
                 recursive: bool = True, verify: bool = False, progress: bool = True,
                 allow_outside_root: bool = False, fps: Optional[float] = None,
                 max_seconds: Optional[float] = None):
        self.root = Path(os.fspath(root)).expanduser()
        if not self.root.is_dir():
            what = "is a file" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"root must be a folder of videos/images, got {str(self.root)!r}, which {what}")
        self.size_multiple = _positive_int("size_multiple", size_multiple)
        self.max_area = _positive_int("max_area", max_area, allow_none=True)
        if self.max_area is not None and self.max_area < self.size_multiple ** 2:
            raise ValueError(f"max_area must be >= size_multiple**2 = {self.size_multiple ** 2} (one multiple per"
                             f" side), got max_area={self.max_area}")
        self.max_frames = _positive_int("max_frames", max_frames, allow_none=True)
        self.frame_multiple = _positive_int("frame_multiple", frame_multiple)
        self.frame_offset = _positive_int("frame_offset", frame_offset, minimum=0)
        if frames_rule is not None and not callable(frames_rule):
            raise TypeError(f"frames_rule must be a callable f(T) -> T' or None, got {type(frames_rule).__name__}")
        self.frames_rule = frames_rule
        self.fps = check_rate("fps", fps, "frames per second")
        self.max_seconds = check_rate("max_seconds", max_seconds, "seconds")
        self.verify = bool(verify)
        if not isinstance(allow_outside_root, bool):
            raise TypeError(f"allow_outside_root must be a bool, got {allow_outside_root!r}")
        self.allow_outside_root = allow_outside_root
        self._real_root = Path(os.path.realpath(self.root))
        self.manifest: Optional[Path] = None
        self._manifest_sha256: Optional[str] = None
        self.skipped: list[Skipped] = []
        self.entries: list[_Entry] = []
        self._broken: set[int] = set()

        candidates = self._candidates(manifest, recursive)  # (path, caption or None) in order
        if not candidates and not self.skipped:
            if manifest is not None:
                raise ValueError(f"manifest {str(manifest)!r} lists no files (root {str(self.root)!r})")
            raise ValueError(
                f"no video or image files found in {str(self.root)!r} (looked for"
                f" {', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}{', recursively' if recursive else ''})"
            )
        for path, caption in _progress(candidates, total=len(candidates), desc=f"probing {self.root.name}",
                                       enable=progress):
            try:
                self.entries.append(self._probe(path, caption))
            except UnreadableFileError as e:
                self.skipped.append(Skipped(str(path), str(e)))
        if not self.entries:
            reasons = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in self.skipped[:3])
            more = f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
            raise ValueError(f"no readable video or image in {str(self.root)!r}: all {len(self.skipped)} files tried"
                             f" failed ({reasons}{more})")
        if progress:
            print(self.summary(), file=sys.stderr)

    # ------------------------------------------------------------------------------------------
    # indexing

    def _candidates(self, manifest, recursive: bool) -> list[tuple[Path, Optional[str]]]:
        if manifest is None:
            return [(p, None) for p in find_media(self.root, recursive)]
        mpath = Path(os.fspath(manifest)).expanduser()
        if not mpath.is_absolute() and not mpath.exists():
            mpath = self.root / mpath
        if not mpath.is_file():
            which = "is not a regular file" if mpath.exists() else "does not exist"
            raise FileNotFoundError(f"manifest must be a JSONL file, got {str(mpath)!r}, which {which}")
        try:
            raw = mpath.read_bytes()
        except OSError as e:
            raise OSError(f"manifest {str(mpath)!r} cannot be read: {e}") from e
        self.manifest, self._manifest_sha256 = mpath, hashlib.sha256(raw).hexdigest()
        out = []
        for n, bline in enumerate(raw.splitlines(), 1):
            where = f"{mpath}:{n}"
            try:
                line = bline.decode("utf-8")
            except UnicodeDecodeError as e:
                self.skipped.append(Skipped(where, f"bad manifest line: not valid UTF-8 ({e.reason} at byte"
                                                   f" {e.start})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self.skipped.append(Skipped(where, f"bad manifest line: {e}"))
                continue
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                self.skipped.append(Skipped(where, 'bad manifest line: expected {"path": str, "caption": str}'
                                                   f", got {line.strip()[:80]}"))
                continue
            caption = row.get("caption")
            if caption is not None and not isinstance(caption, str):
                self.skipped.append(Skipped(where, f"bad manifest line: caption must be a str, got {caption!r}"))
                continue
            p = Path(row["path"]).expanduser()
            out.append((p if p.is_absolute() else self.root / p, caption))
        return out

    def _out_size(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """``(T', H', W')`` of a clip of ``t`` frames (after fps / max_seconds) of ``h x w``."""
        n = t if self.max_frames is None else min(t, self.max_frames)
        if self.frames_rule is not None:
            t2 = self.frames_rule(n)
            if isinstance(t2, bool) or not isinstance(t2, (int, np.integer)) or not 0 <= t2 <= n:
                raise ValueError(f"frames_rule must return an int in [0, T] for T={n} frames, got {t2!r}")
            t2 = int(t2)
            if t2 == 0:
                raise UnreadableFileError(f"too short: frames_rule kept 0 of {n} frames")
        else:
            m, o = self.frame_multiple, self.frame_offset
            t2 = o + (n - o) // m * m if n >= o else 0
            if t2 < 1:
                first = o if o >= 1 else m
                raise UnreadableFileError(f"too short: {n} frames, need at least {first} "
                                          f"(frame_offset={o} + k * frame_multiple={m}, >= 1)")
        return (t2, *fit_size(h, w, self.max_area, self.size_multiple))

    def _confine(self, path: Path, what: str = "") -> None:
        """UnreadableFileError ("outside root") when ``path``'s real path is outside the root folder."""
        if self.allow_outside_root:
            return
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._real_root):
            raise UnreadableFileError(f"outside root: {what}real path {str(real)!r} is outside the data folder"
                                      f" {str(self._real_root)!r} (allow_outside_root=True reads it)")

    def _caption(self, path: Path) -> Optional[str]:
        """The sidecar ``<stem>.txt`` caption of ``path``, None when there is none; a sidecar that cannot be
        read (not UTF-8, not a regular file, outside the root) skips the file instead of an empty caption."""
        sidecar = path.with_suffix(".txt")
        if not os.path.lexists(sidecar):
            return None
        what = f"caption {sidecar.name!r}: "
        self._confine(sidecar, what)
        _regular_stat(sidecar, what)
        try:
            raw = sidecar.read_bytes()
        except OSError as e:
            raise UnreadableFileError(f"unreadable: {what}{_err(e)}") from e
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise UnreadableFileError(f"caption is not valid UTF-8: {sidecar.name!r} ({e.reason} at byte"
                                      f" {e.start})") from e

    def _probe(self, path: Path, caption: Optional[str]) -> _Entry:
        self._confine(path)
        st = _regular_stat(path)  # never opens a FIFO or a device
        if st.st_size == 0:
            raise UnreadableFileError("unreadable: empty file (0 bytes)")
        has_caption = caption is not None
        if caption is None:
            caption = self._caption(path)
            has_caption = caption is not None
        is_image = path.suffix.lower() in IMAGE_EXTENSIONS
        try:
            if is_image:
                t, h, w, fps = self._probe_image(path)
                kept, orient = t, Orientation()
            else:
                _import_av("to read videos")
                info = probe_video(str(path), fps=self.fps, max_seconds=self.max_seconds, verify=self.verify)
                t, h, w, kept, orient = info.frames, info.height, info.width, info.kept, info.orientation
                fps = self.fps if self.fps is not None else info.fps
        except UnreadableFileError:
            raise
        except Exception as e:  # any decoder failure: the file is broken, not the run
            raise UnreadableFileError(f"unreadable: {_err(e)}") from e
        return _Entry(path, caption or "", is_image, (t, h, w), self._out_size(kept, h, w), fps, has_caption,
                      (st.st_size, st.st_mtime_ns), orient)

    def _probe_image(self, path: Path) -> tuple[int, int, int, float]:
        Image = _import_pil("to read images")
        with Image.open(path) as im:
            w, h = im.size
            if self.verify:
                im.convert("RGB").load()
            else:
                im.verify()  # structure and checksums, without decoding the pixels
        return 1, h, w, 0.0

    # ------------------------------------------------------------------------------------------
    # reading

    def _decode(self, e: _Entry) -> np.ndarray:
        t, h, w = e.native
        if e.is_image:
            Image = _import_pil("to read images")
            with Image.open(e.path) as im:
                return np.array(im.convert("RGB"))[None]
        _import_av("to read videos")
        need = e.size[0]
        return decode_video(str(e.path), VideoInfo(t, h, w, e.fps, e.orientation, need), need, self.fps)

    def load(self, index: int) -> dict:
        """Decode item ``index`` (no fallback); raises :class:`UnreadableFileError` when the file is broken."""
        e = self.entries[index]
        try:
            frames = self._decode(e)
        except UnreadableFileError:
            raise
        except Exception as err:
            raise UnreadableFileError(f"unreadable: {_err(err)}") from err
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W) in [0, 255]
        t2, h2, w2 = e.size
        if x.shape[-2:] != (h2, w2):
            x = F.interpolate(x, size=(h2, w2), mode="bilinear", antialias=True, align_corners=False)
        video = (x.clamp_(0, 255) / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)
        return {"video": video, "caption": e.caption, "path": str(e.path), "fps": e.fps, "index": index}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        """Item ``index``; if its file turns out broken, the next readable item (see the module docstring)."""
        return first_readable(self, index, len(self.entries), lambda j: str(self.entries[j].path),
                              f"every one of the {len(self.entries)} files of {str(self.root)!r} failed to decode")

    # ------------------------------------------------------------------------------------------
    # metadata

    @property
    def shapes(self) -> list[tuple[int, int, int, int]]:
        """``(3, T, H, W)`` of every item as returned (after the reductions), without decoding."""
        return [(3, *e.size) for e in self.entries]

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.entries]

    @property
    def paths(self) -> list[Path]:
        return [e.path for e in self.entries]

    def identity(self) -> dict:
        """What the items depend on, as JSON-able data: every file read as ``[relative path, size, mtime_ns]``
        (absolute paths for files outside the root), a hash of the captions, the manifest's sha256 and the
        reduction settings. Equal identities give equal items; :func:`~sora_fast.data.cache_latents` stores it
        in a cache's key (a custom ``frames_rule`` is known by its name only)."""
        def rel(p: Path) -> str:
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                return str(p)

        rule = self.frames_rule
        settings = {"max_area": self.max_area, "max_frames": self.max_frames,
                    "size_multiple": self.size_multiple, "frame_multiple": self.frame_multiple,
                    "frame_offset": self.frame_offset,
                    "frames_rule": None if rule is None else getattr(rule, "__qualname__", repr(rule))}
        # keys that did not exist before are present only when they matter, so older caches stay valid
        settings.update({k: v for k, v in (("fps", self.fps), ("max_seconds", self.max_seconds)) if v is not None})
        out = {
            "files": [[rel(e.path), *e.stat] for e in self.entries],
            "captions_sha256": hashlib.sha256(json.dumps(self.captions).encode("utf-8")).hexdigest(),
            "manifest_sha256": self._manifest_sha256,
            "settings": settings,
        }
        turned = [rel(e.path) for e in self.entries if not e.orientation.upright]
        if turned:  # read upright since the display matrix is applied: caches of the sideways frames are stale
            out["oriented"] = turned
        return out

    def summary(self) -> str:
        """One line: readable files, videos/images, reductions, missing captions and skips by reason."""
        n_img = sum(e.is_image for e in self.entries)
        n_small = sum(e.size[1:] != e.native[1:] for e in self.entries)
        n_cut = sum(e.size[0] != e.native[0] for e in self.entries)
        n_nocap = sum(not e.has_caption for e in self.entries)
        n_turn = sum(not e.orientation.upright for e in self.entries)
        kinds: dict[str, int] = {}
        for s in self.skipped:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        tried = len(self.entries) + len(self.skipped) - len(self._broken)
        return (f"VideoFolder {self.root}: {len(self.entries) - len(self._broken)} of {tried} files readable"
                f" ({len(self.entries) - n_img} videos, {n_img} images; {n_small} downscaled, {n_cut} cut in time;"
                + (f" {n_turn} turned upright;" if n_turn else "") +
                f" {n_nocap} without caption); skipped {len(self.skipped)}" + (f" ({skipped})" if skipped else ""))

    def __repr__(self) -> str:
        return f"VideoFolder({str(self.root)!r}, items={len(self)}, skipped={len(self.skipped)})"


def write_skip_report(skipped, path: Union[str, "os.PathLike[str]"], *, first: int = 3) -> str:
    """Write every skipped file as a JSON line ``{"path": ..., "reason": ...}`` to ``path`` (atomically;
    an empty file when nothing was skipped) and return one line for the user: the count by kind, the first
    ``first`` names with their reasons, and where the full list is."""
    path = Path(os.fspath(path))
    rows = [Skipped(*s) for s in skipped]
    with _AtomicFile(path) as tmp:
        tmp.write_text("".join(json.dumps({"path": s.path, "reason": s.reason}, ensure_ascii=False) + "\n"
                               for s in rows), encoding="utf-8")
    if not rows:
        return f"skipped 0 files ({path} is empty)"
    kinds: dict[str, int] = {}
    for s in rows:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    by_kind = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
    names = "; ".join(f"{s.path} ({s.reason})" for s in rows[:first])
    more = f"; and {len(rows) - first} more" if len(rows) > first else ""
    return f"skipped {len(rows)} file(s) ({by_kind}): {names}{more}; all listed with their reasons in {path}"
