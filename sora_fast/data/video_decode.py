"""Reading camera files: display orientation, frame timestamps and frame choice by time.

Used by :class:`~sora_fast.data.VideoFolder`; nothing here knows about datasets.

- **Orientation.** Phones store portrait video as landscape frames plus a display matrix (the ``rotate``
  tag of older tools). The matrix of the first decoded frame is applied to every frame, as players and
  ``ffmpeg`` do: frames come out upright, with mirrors applied too. A matrix that is not a multiple of
  90 degrees cannot be applied without inventing pixels, so such a file is skipped (``unsupported
  rotation``).
- **Time.** A frame's time is its presentation timestamp, counted from the first frame. Variable frame
  rate streams (phones drop the rate in low light) are common, so a frame stride is never assumed:
  :func:`select_frames` takes, for each target time ``k / fps``, the frame whose timestamp is nearest
  (the earlier one on a tie). Where the stream is slower than ``fps`` a frame repeats; where it is
  faster, frames are dropped, like ffmpeg's ``fps`` filter.
"""
from __future__ import annotations

import itertools
import math
import struct
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import numpy as np

__all__ = ["UnreadableFileError", "Orientation", "select_frames", "count_targets", "nearest_frames", "decode_frames"]

EPS = 1e-9  # seconds: timestamps closer than this are equal (float rounding of pts * time_base)

T = TypeVar("T")


class UnreadableFileError(OSError):
    """A file of the folder could not be decoded (raised by :meth:`VideoFolder.load`)."""


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ----------------------------------------------------------------------------------------------
# orientation


class Orientation(NamedTuple):
    """How a decoded ``(H, W, 3)`` frame becomes the displayed one: transpose, then flip rows / columns."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def upright(self) -> bool:
        return not any(self)

    def size(self, h: int, w: int) -> tuple[int, int]:
        """The displayed ``(H, W)`` of a decoded ``h x w`` frame."""
        return (w, h) if self.transpose else (h, w)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if self.transpose:
            frame = frame.transpose(1, 0, 2)
        if self.flip_rows:
            frame = frame[::-1]
        if self.flip_cols:
            frame = frame[:, ::-1]
        return frame


def _side_data(frame) -> list:
    """A decoded frame's side data entries. PyAV's container yields the entries themselves up to 18.1.0 and
    their types (mapping keys) from 18.1.1 on; both are read here."""
    container = getattr(frame, "side_data", None)
    if container is None:
        return []
    return [item if hasattr(item, "type") else container[item] for item in container]


def display_matrix(frame) -> Optional[tuple[int, ...]]:
    """The 9 int32 values of a decoded frame's display matrix side data, None when it has none."""
    for sd in _side_data(frame):
        kind = getattr(sd.type, "name", str(sd.type))
        if kind.endswith("DISPLAYMATRIX"):
            raw = bytes(sd)
            if len(raw) >= 36:
                return struct.unpack("=9i", raw[:36])
    return None


def orientation_from_matrix(m: Optional[tuple[int, ...]]) -> Orientation:
    """The frame transform of a display matrix ``[a b u; c d v; x y w]``: a source pixel at column ``x``,
    row ``y`` is displayed at column ``a*x + c*y``, row ``b*x + d*y`` (FFmpeg's convention; a 90-degree
    counter-clockwise rotation is ``a=0, b=-1, c=1, d=0``). UnreadableFileError for other angles."""
    if m is None:
        return Orientation()
    a, b, c, d = (v / 65536 for v in (m[0], m[1], m[3], m[4]))  # 16.16 fixed point
    big = max(abs(a), abs(b), abs(c), abs(d))
    if big == 0:
        return Orientation()  # a degenerate matrix says nothing; players ignore it too
    tol = 0.02 * big  # about 1 degree, ffmpeg's own tolerance for "a multiple of 90"
    if abs(b) <= tol and abs(c) <= tol:
        return Orientation(False, d < 0, a < 0)
    if abs(a) <= tol and abs(d) <= tol:  # after the transpose rows are source columns: row = b*x, col = c*y
        return Orientation(True, b < 0, c < 0)
    angle = -math.degrees(math.atan2(b, a))
    raise UnreadableFileError(f"unsupported rotation: the display matrix turns the frames by {angle:.1f} degrees;"
                              " only multiples of 90 are applied")


# ----------------------------------------------------------------------------------------------
# timestamps and frame choice


def count_targets(last: float, fps: Optional[float], max_seconds: Optional[float], n_frames: int,
                  times: Optional[np.ndarray] = None) -> int:
    """How many frames a stream gives: without ``fps``, its frames before ``max_seconds`` (``times``: their
    times from the first frame; all ``n_frames`` when None); with ``fps``, the target times ``k / fps`` that
    are ``<= last`` (the last frame's time) and ``< max_seconds``."""
    if fps is None:
        if max_seconds is None or times is None:
            return n_frames
        return max(1, int(np.count_nonzero(times < max_seconds - EPS)))
    k = int(math.floor((last + EPS) * fps)) + 1
    while k > 1 and (k - 1) / fps > last + EPS:  # float rounding of the floor, either way
        k -= 1
    while k / fps <= last + EPS:
        k += 1
    if max_seconds is not None:
        k = min(k, max(1, math.ceil(max_seconds * fps - EPS)))
        while k > 1 and (k - 1) / fps >= max_seconds - EPS:
            k -= 1
    return k


def nearest_frames(frames: Iterable[tuple[float, T]], targets: Iterable[float]) -> Iterator[T]:
    """For each target time (increasing), the payload of the frame whose time is nearest, the earlier one on
    a tie; ``frames`` are ``(time, payload)`` in presentation order and are read only as far as needed.
    Targets after the last frame's time get nothing (the caller sees a short result)."""
    tk_iter = iter(targets)
    tk = next(tk_iter, None)
    prev: Optional[tuple[float, T]] = None
    for t, x in frames:
        while tk is not None and t >= tk - EPS:  # the first frame at or after the target: it or the one before
            yield prev[1] if prev is not None and tk - prev[0] <= t - tk + EPS else x
            tk = next(tk_iter, None)
        if tk is None:
            return
        prev = (t, x)


def select_frames(times, fps: Optional[float] = None, max_seconds: Optional[float] = None) -> list[int]:
    """Indices of the frames kept from a stream with presentation ``times`` (seconds, increasing; counted
    from the first): all frames before ``max_seconds`` without ``fps``; with ``fps``, for each
    ``k / fps <= times[-1]`` (and ``< max_seconds``) the frame nearest in time, the earlier on a tie."""
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"times must be a non-empty 1-D sequence of seconds, got shape {t.shape}")
    t = t - t[0]
    n = count_targets(float(t[-1]), fps, max_seconds, t.size, t)
    if fps is None:
        return list(range(n))
    return list(nearest_frames(zip(t.tolist(), range(t.size)), (k / fps for k in range(n))))


def check_rate(name: str, v, unit: str) -> Optional[float]:
    """None or a positive finite number (int or float, not bool), as a float; ValueError naming ``name``."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) \
            or v <= 0:
        raise ValueError(f"{name} must be None or a positive number of {unit}, got {v!r}")
    return float(v)


# ----------------------------------------------------------------------------------------------
# PyAV access


def video_stream(container):
    """The first video stream that is not an attached picture (cover art in mp4 / mkv)."""
    import av

    attached = getattr(getattr(av.stream, "Disposition", None), "attached_pic", None)
    streams = list(container.streams.video)
    for s in streams:
        if attached is None or not s.disposition & attached:
            return s
    raise UnreadableFileError("unreadable: no video stream" + (" (only cover art)" if streams else ""))


def stream_rate(s) -> float:
    rate = s.average_rate or s.guessed_rate or s.base_rate
    return float(rate) if rate else 0.0


def frame_times(items: Iterable[T], time_of: Callable[[T], Optional[float]], rate: float) -> Iterator[tuple[float, T]]:
    """``(seconds from the first item, item)``; an item without a timestamp is placed one frame (``1/rate``,
    else 1/25 s) after the previous one."""
    step = 1.0 / rate if rate > 0 else 0.04
    t0 = prev = None
    for x in items:
        t = time_of(x)
        if t is None:
            t = 0.0 if prev is None else prev + step
        if t0 is None:
            t0 = t
        prev = t
        yield t - t0, x


def frame_time(f) -> Optional[float]:
    ts = f.pts if f.pts is not None else getattr(f, "dts", None)
    tb = f.time_base
    return None if ts is None or tb is None else float(ts * tb)


def packet_times(path: str) -> np.ndarray:
    """Presentation times (seconds from the first) of a file's video packets, sorted, without decoding."""
    import av

    with av.open(path) as c:
        s = video_stream(c)
        tb = s.time_base
        raw = []
        for p in c.demux(s):
            if p.size and not p.is_discard:
                ts = p.pts if p.pts is not None else p.dts
                raw.append(None if ts is None or tb is None else float(ts * tb))
        rate = stream_rate(s)
    if any(t is None for t in raw):  # no timestamps (raw streams): frames in decode order at the nominal rate
        step = 1.0 / rate if rate > 0 else 0.04
        return np.arange(len(raw)) * step
    t = np.sort(np.asarray(raw, dtype=np.float64))
    return t - t[0] if t.size else t


class VideoInfo(NamedTuple):
    """What probing a video file found."""

    frames: int  # frames in the file (the container's count, its packets, or decoded with verify)
    height: int  # displayed size (after the orientation)
    width: int
    fps: float  # the stream's average rate (0.0 when unknown)
    orientation: Orientation
    kept: int  # frames left by fps / max_seconds, before any frame-count rule


def probe_video(path: str, *, fps: Optional[float] = None, max_seconds: Optional[float] = None,
                verify: bool = False) -> VideoInfo:
    """Open a video, decode its first frame (size, orientation) and count its frames: from the container's
    metadata, else its packets' timestamps (no decoding; also whenever ``fps`` or ``max_seconds`` needs the
    times), or, with ``verify``, by decoding every frame."""
    import av

    times = None
    with av.open(path) as c:
        s = video_stream(c)
        rate = stream_rate(s)
        decoded = c.decode(s)
        first = next(decoded, None)
        if first is None:
            raise UnreadableFileError("unreadable: no decodable frame")
        h, w = first.height, first.width
        orient = orientation_from_matrix(display_matrix(first))
        if verify:
            times = np.array([t for t, _ in frame_times(itertools.chain([first], decoded), frame_time, rate)])
            n = times.size
        else:
            n = s.frames
    if times is None and (n <= 0 or fps is not None or max_seconds is not None):
        times = packet_times(path)  # no frame count in the metadata (webm, gif), or the times are needed
        n = times.size or n
    n = max(n, 1)
    last = float(times[-1]) if times is not None and times.size else 0.0
    kept = count_targets(last, fps, max_seconds, n, times)
    return VideoInfo(n, *orient.size(h, w), rate, orient, kept)


def decode_video(path: str, info: VideoInfo, need: int, fps: Optional[float] = None) -> np.ndarray:
    """``(need, H, W, 3)`` uint8 displayed frames: the first ``need`` ones, or with ``fps`` the ones nearest
    to the times ``k / fps``. UnreadableFileError ("truncated") when the stream ends before."""
    import av

    h, w = info.orientation.size(info.height, info.width)  # back to the decoded (coded) size
    out: list[np.ndarray] = []

    def rgb(f) -> np.ndarray:
        if f.height != h or f.width != w:  # resolution change mid-stream: follow the first frame
            f = f.reformat(width=w, height=h)
        return info.orientation.apply(f.to_ndarray(format="rgb24"))

    with av.open(path) as c:
        s = video_stream(c)
        decoded = c.decode(s)
        if fps is None:
            for f in decoded:
                out.append(rgb(f))
                if len(out) == need:
                    break
        else:
            last = None
            picks = nearest_frames(frame_times(decoded, frame_time, stream_rate(s)), (k / fps for k in range(need)))
            for f in picks:
                if last is None or f is not last[0]:  # a frame picked twice is converted once
                    last = (f, rgb(f))
                out.append(last[1])
    if len(out) < need:
        raise UnreadableFileError(f"truncated: decoded {len(out)} of the {need} frames needed"
                                  f" ({info.frames} in the metadata)")
    return np.stack(out)


def decode_frames(path: str, indices: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """The displayed frames at ``indices`` (increasing, in presentation order) as ``(found, (K, H, W, 3)
    uint8)``, decoded as a stream so only the picked frames are held; decoding stops after the last index.
    Indices past the stream's end are left out of ``found`` (metadata frame counts can be too high);
    UnreadableFileError when none is found. Orientation and a mid-stream size change as :func:`decode_video`."""
    import av

    want = sorted(set(int(i) for i in indices))
    if not want or want[0] < 0:
        raise ValueError(f"indices must be a non-empty list of frame indices >= 0, got {list(indices)!r:.80}")
    found: list[int] = []
    out: list[np.ndarray] = []
    with av.open(path) as c:
        decoded = c.decode(video_stream(c))
        first = next(decoded, None)
        if first is None:
            raise UnreadableFileError("unreadable: no decodable frame")
        orient = orientation_from_matrix(display_matrix(first))
        h, w = first.height, first.width
        k = 0
        for i, f in enumerate(itertools.chain([first], decoded)):
            if i != want[k]:
                continue
            if f.height != h or f.width != w:  # resolution change mid-stream: follow the first frame
                f = f.reformat(width=w, height=h)
            found.append(i)
            out.append(orient.apply(f.to_ndarray(format="rgb24")))
            k += 1
            if k == len(want):
                break
    if not found:
        raise UnreadableFileError(f"truncated: the stream ends before frame {want[0]}")
    return found, np.stack(out)
