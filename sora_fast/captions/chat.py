"""Captions from a vision chat model behind an OpenAI-compatible server: :class:`ChatClient`, :class:`ChatCaptioner`.

Any server that answers ``POST {base_url}/chat/completions`` works: OpenAI, vLLM (``vllm serve MODEL``,
``http://localhost:8000/v1``), the llama.cpp server (``llama-server``, ``http://localhost:8080/v1``), Ollama
(``http://localhost:11434/v1``), LM Studio. The requests go through the maintained ``openai`` package (the ``chat``
extra: ``pip install "sora-fast[chat]"``) with its own retries off; :class:`ChatClient` retries itself, so which
failures are retried and how long it waits is exact:

- retried with exponential backoff (``backoff * 2**k`` seconds before retry ``k + 1``, times a random factor in
  [1, 1.25) so that parallel requests do not retry in step), at most ``max_retries`` times: HTTP 429 and 5xx, 408,
  timeouts and connection errors. A ``Retry-After`` (or ``retry-after-ms``) header is waited exactly instead,
  capped at :data:`MAX_RETRY_AFTER` seconds.
- failed at once: any other status (400, 401, 404, ...), with the URL, the status and the server's message.

The API key is read from the environment variable ``api_key_env`` (default ``OPENAI_API_KEY``). Local servers need
none: when the variable is unset a placeholder (``"EMPTY"``) is sent, which they ignore.

:class:`ChatCaptioner` sends every ``every_n``-th frame of a clip (at most ``max_frames``, spread evenly over the
clip when there are more; the longest side resized to ``max_side``), each labelled with its frame index, as JPEG
``data:image/jpeg;base64,`` URLs, and asks for :meth:`CaptionSchema.json_schema` as structured output. A reply
that does not parse or breaks the schema gets one repair turn (the model is told the error and answers again;
``repair=False`` turns it off); still wrong, the file is a failed outcome naming the error. Results are cached by
the file's content (see :meth:`ChatCaptioner.cache_key`), so captioning a folder again sends nothing.
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .base import Captioner, CaptionOutcome
from .schema import CAMERA_MOTIONS, DIRECTIONS, INTERACTIONS, SCHEMA_VERSION, SPEEDS, CaptionSchema

__all__ = ["ChatClient", "ChatCaptioner", "ChatError", "frame_indices", "default_cache_dir", "MAX_RETRY_AFTER",
           "SYSTEM_PROMPT"]

#: Longest wait (seconds) a server's Retry-After is honoured with; a longer one is cut to this.
MAX_RETRY_AFTER = 60.0
#: The placeholder key sent when ``api_key_env`` is unset (local servers ignore the key).
PLACEHOLDER_KEY = "EMPTY"
#: Bumped whenever what is sent for the same file and settings changes (labels, image encoding), so the cache
#: of an older request format is not read as this one's.
REQUEST_VERSION = 1

_RETRY_STATUS = (408, 429)   # and every 5xx


class ChatError(RuntimeError):
    """A chat request that failed: refused by the server, or no answer after the retries. Its text names the URL."""


def _import_openai():
    try:
        import openai
    except ImportError as e:
        raise ImportError('the chat captioner needs the openai package: pip install "sora-fast[chat]" '
                          "(or pip install openai)") from e
    return openai


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _check_float(name: str, v, *, positive: bool) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if positive
                                                                                          else v >= 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


def _server_message(e) -> str:
    """The server's own words of an error response: ``{"error": {"message": ...}}``, ``{"detail": ...}`` or the
    body's text."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
            if msg:
                return str(msg)
        elif err:
            return str(err)
        if body.get("detail"):
            return str(body["detail"])
    if body:
        return str(body)[:500]
    try:
        return e.response.text[:500] or "(empty body)"
    except Exception:   # noqa: BLE001 - a streamed or closed response has no text to give
        return str(e)


def _retry_after(response) -> Optional[float]:
    """Seconds a response's ``retry-after-ms`` / ``Retry-After`` header asks for (a number or an HTTP date)."""
    if response is None:
        return None
    headers = response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            s = float(raw) * scale
        except ValueError:
            when = email.utils.parsedate_tz(raw) if scale == 1.0 else None
            if when is None:
                continue
            s = email.utils.mktime_tz(when) - time.time()
        if math.isfinite(s):
            return min(max(s, 0.0), MAX_RETRY_AFTER)
    return None


class ChatClient:
    """A chat-completions client with exact, testable retries (module docstring), safe to share between threads.

    base_url: the server's OpenAI-compatible root, e.g. ``http://localhost:8000/v1``; requests go to
        ``{base_url}/chat/completions``. model: the model name the server serves.
    api_key_env: the environment variable holding the API key; unset (or None) sends ``"EMPTY"``, fine for local
        servers. timeout: seconds per request. max_retries: retries after the first try (so ``max_retries + 1``
        requests at most). backoff: seconds before the first retry, doubled for each further one.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL of an OpenAI-compatible server such as "
                             f"http://localhost:8000/v1, got {base_url!r}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be the name of a model the server serves, got {model!r}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.timeout = _check_float("timeout", timeout, positive=True)
        self.max_retries = _check_int("max_retries", max_retries, 0)
        self.backoff = _check_float("backoff", backoff, positive=False)
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        self._openai = _import_openai()
        self._client = self._openai.OpenAI(api_key=key or PLACEHOLDER_KEY, base_url=self.base_url,
                                           timeout=self.timeout, max_retries=0)
        self._sleep: Callable[[float], None] = time.sleep   # tests record the waits instead

    def __repr__(self) -> str:
        return f"ChatClient({self.base_url!r}, {self.model!r})"

    def delay(self, retry: int, retry_after: Optional[float] = None) -> float:
        """Seconds to wait before retry ``retry`` (0-based): the server's Retry-After when given, else
        ``backoff * 2**retry`` times a jitter factor in [1, 1.25)."""
        if retry_after is not None:
            return retry_after
        return self.backoff * 2 ** retry * (1.0 + 0.25 * random.random())

    def complete(self, messages: Sequence[dict], *, response_format: Optional[dict] = None,
                 temperature: float = 0.0) -> str:
        """The assistant's reply text to ``messages`` (OpenAI chat format: ``[{"role": ..., "content": ...}]``,
        content a string or a list of ``text`` / ``image_url`` parts). ``response_format`` is passed as given
        (e.g. ``{"type": "json_schema", "json_schema": {...}}``). ChatError naming the URL when the server refuses
        the request or gives no answer after the retries."""
        oa = self._openai
        kw = {"model": self.model, "messages": list(messages), "temperature": temperature}
        if response_format is not None:
            kw["response_format"] = response_format
        t0 = time.monotonic()
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                resp = self._client.chat.completions.create(**kw)
            except oa.APIStatusError as e:
                status = e.status_code
                if status not in _RETRY_STATUS and status < 500:
                    raise ChatError(f"the chat server refused the request to {self.url}: HTTP {status}: "
                                    f"{_server_message(e)}") from None
                last = ("status", f"HTTP {status}: {_server_message(e)}")
                wait = _retry_after(getattr(e, "response", None))
            except oa.APITimeoutError:
                last = ("timeout", f"no answer within {self.timeout:g} s")
            except oa.APIConnectionError as e:
                cause = e.__cause__ or e.__context__
                last = ("connection", f"{type(cause).__name__}: {cause}" if cause else str(e))
            except oa.APIError as e:   # a 200 whose body is not a chat completion
                raise ChatError(f"the chat server at {self.url} sent a reply that is not a chat completion: "
                                f"{e}") from None
            else:
                return self._content(resp)
            if attempt < self.max_retries:
                self._sleep(self.delay(attempt, wait))
        tries = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''} over {time.monotonic() - t0:.1f} s"
        kind, detail = last
        if kind == "connection":
            raise ChatError(f"cannot reach the chat server at {self.base_url} ({tries}; {detail}); is it running, "
                            "and is the URL right (the OpenAI-compatible root, usually ending in /v1)?")
        if kind == "timeout":
            raise ChatError(f"the chat server at {self.base_url} did not answer {self.url} in time ({detail}; "
                            f"{tries}); a larger timeout (--timeout) or fewer frames may help")
        raise ChatError(f"the chat server at {self.url} kept failing ({tries}; last: {detail})")

    def _content(self, resp) -> str:
        choices = getattr(resp, "choices", None)
        if not choices:
            raise ChatError(f"the chat server at {self.url} answered without a choice: {str(resp)[:200]}")
        msg = choices[0].message
        if msg.content is None:
            refusal = getattr(msg, "refusal", None)
            why = f"the model refused: {refusal}" if refusal else f"finish_reason {choices[0].finish_reason!r}"
            raise ChatError(f"the chat server at {self.url} answered with no text ({why})")
        return msg.content


# --------------------------------------------------------------------------------------------------------------
# frames


def frame_indices(n: int, every_n: int, max_frames: int) -> list[int]:
    """The frames of an ``n``-frame clip that are looked at: ``0, every_n, 2 * every_n, ...``; when more than
    ``max_frames``, ``max_frames`` of them spread evenly from the first to the last (both kept)."""
    picks = list(range(0, max(int(n), 1), every_n))
    if len(picks) <= max_frames:
        return picks
    if max_frames == 1:
        return [0]
    step = (len(picks) - 1) / (max_frames - 1)
    return [picks[int(math.floor(i * step + 0.5))] for i in range(max_frames)]


def _read_frames(path: Path, every_n: int, max_frames: int) -> tuple[int, list[int], np.ndarray]:
    """``(frames in the clip, indices picked, (K, H, W, 3) uint8)`` of a video (PyAV) or an image (Pillow)."""
    from ..data.io import _import_av, _import_pil
    from ..data.video_decode import UnreadableFileError, decode_frames, probe_video
    from ..data.video_folder import IMAGE_EXTENSIONS

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        Image = _import_pil("to read images")
        try:
            with Image.open(path) as im:
                return 1, [0], np.array(im.convert("RGB"))[None]
        except Exception as e:   # Pillow raises many kinds for a broken file
            raise UnreadableFileError(f"unreadable image: {type(e).__name__}: {e}") from None
    _import_av("to read videos")
    try:
        n = probe_video(str(path)).frames
        found, frames = decode_frames(str(path), frame_indices(n, every_n, max_frames))
    except UnreadableFileError:
        raise
    except Exception as e:   # any decoder failure names the file's problem, not ours
        raise UnreadableFileError(f"unreadable video: {type(e).__name__}: {e}") from None
    return max(n, found[-1] + 1), found, frames


def _data_url(frame: np.ndarray, max_side: int) -> str:
    """A ``(H, W, 3)`` uint8 frame as a JPEG data URL, its longest side at most ``max_side`` (never upscaled)."""
    from ..data.io import _import_pil

    Image = _import_pil("to encode frames")
    im = Image.fromarray(frame)
    s = max_side / max(im.size)
    if s < 1:
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------------------
# the captioner


def _choices(xs) -> str:
    return ", ".join(f'"{x}"' for x in xs)


SYSTEM_PROMPT = f"""You caption video clips for training a text-to-video model. You are shown frames of one clip \
in order, each labelled with its frame index in the clip. Describe only what is visible; use null for what you \
cannot tell.

Answer with one JSON object and nothing else:
- "spans": one or more time ranges in order, not overlapping. A span covers frames "start".."end" (inclusive, \
frame indices of the clip as labelled); the first starts at frame 0 and the last ends at the clip's last frame. \
Start a new span where something changes: a subject's action, direction or speed, a subject entering or leaving, \
the camera. A single image is one span from 0 to 0. Each span has:
  - "subjects": every subject that matters, each with "type" (what it is: "person", "dog", "car"; "object" for a \
plain shape), "shape", "colour", "appearance" (other visual attributes: "striped", "wearing a red coat"), \
"action" (a short phrase: "walking", "still", "bouncing", "leaving the frame"), "direction" (one of \
{_choices(DIRECTIONS)}), "speed" (one of {_choices(SPEEDS)}), "position" (where it is in the frame: "left third", \
"center");
  - "interaction" between two subjects: one of {_choices(INTERACTIONS)}, or null;
  - "camera_motion": one of {_choices(CAMERA_MOTIONS)}, or null; "camera_speed": one of {_choices(SPEEDS)}, or null.
- "background" ("plain", "textured", or what it is: "a beach"), "environment" (what else is in the scene), \
"shot_type" ("close-up", "wide shot"), "lighting", "style": a short phrase each, or null."""


def default_cache_dir() -> Path:
    """Where :class:`ChatCaptioner` caches replies by default: ``$XDG_CACHE_HOME/sora_fast/captions``
    (``~/.cache/sora_fast/captions`` when unset). ``sora-fast caption`` uses ``DATA_DIR/.caption_cache`` instead."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sora_fast" / "captions"


class _ReplyError(ValueError):
    """A reply that is not a valid caption of the clip."""


class ChatCaptioner(Captioner):
    """Captions from a vision chat model (module docstring): ``ChatCaptioner(base_url, model).caption_files(paths)``.

    base_url, model, api_key_env, timeout, max_retries, backoff: as :class:`ChatClient`'s (or pass ``client``).
    every_n: look at every n-th frame (0, n, 2n, ...). max_frames: at most this many frames per clip, spread
        evenly over it when there are more. max_side: frames are resized so their longest side is at most this.
    concurrency: files captioned at the same time (requests in flight) by :meth:`caption_files`.
    cache_dir: where replies are cached, one JSON file per key (:meth:`cache_key`); None: :func:`default_cache_dir`.
        cache: False reads and writes no cache.
    system_prompt: replaces :data:`SYSTEM_PROMPT` (the schema's fields and the span rules); part of the cache key.
    repair: one more turn for a reply that breaks the schema, telling the model the error.
    """

    name = "chat"

    def __init__(self, base_url: str, model: str, *, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 every_n: int = 4, max_frames: int = 8, max_side: int = 512, concurrency: int = 4,
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0,
                 cache_dir: Union[str, "os.PathLike[str]", None] = None, cache: bool = True,
                 system_prompt: Optional[str] = None, repair: bool = True, temperature: float = 0.0,
                 client: Optional[ChatClient] = None):
        self.every_n = _check_int("every_n", every_n, 1)
        self.max_frames = _check_int("max_frames", max_frames, 1)
        self.max_side = _check_int("max_side", max_side, 16)
        self.concurrency = _check_int("concurrency", concurrency, 1)
        self.temperature = _check_float("temperature", temperature, positive=False)
        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
            raise ValueError(f"system_prompt must be a non-empty string or None, got {system_prompt!r:.80}")
        self.system_prompt = SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.repair = bool(repair)
        self.client = client if client is not None else ChatClient(
            base_url, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries, backoff=backoff)
        self.model = self.client.model
        self.cache_dir = (None if not cache else
                          Path(os.fspath(cache_dir)).expanduser() if cache_dir is not None else default_cache_dir())

    def __repr__(self) -> str:
        return (f"ChatCaptioner({self.client.base_url!r}, {self.model!r}, every_n={self.every_n}, "
                f"max_frames={self.max_frames}, max_side={self.max_side}, concurrency={self.concurrency})")

    @staticmethod
    def response_format() -> dict:
        """The structured-output request: the caption schema's JSON Schema, strict."""
        return {"type": "json_schema",
                "json_schema": {"name": "caption_schema", "schema": CaptionSchema.json_schema(), "strict": True}}

    # ---- cache --------------------------------------------------------------------------------------------

    def cache_key(self, path: Path) -> str:
        """sha256 of the file's bytes, the model and every setting that changes the request (frames, size,
        prompt, temperature, schema and request versions): equal keys send equal requests."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        what = {"file_sha256": h.hexdigest(), "model": self.model, "every_n": self.every_n,
                "max_frames": self.max_frames, "max_side": self.max_side, "temperature": self.temperature,
                "prompt_sha256": hashlib.sha256(self.system_prompt.encode("utf-8")).hexdigest(),
                "schema_version": SCHEMA_VERSION, "request_version": REQUEST_VERSION}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()

    def _cache_file(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> Optional[tuple[CaptionSchema, list[int]]]:
        f = self._cache_file(key)
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            return CaptionSchema.from_json(doc["schema"]), [int(i) for i in doc["frames"]]
        except (OSError, ValueError, KeyError, TypeError):   # absent or damaged: asked again, then rewritten
            return None

    def _cache_put(self, key: str, path: Path, schema: CaptionSchema, frames: list[int]) -> None:
        from ..data.io import _AtomicFile

        f = self._cache_file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        doc = {"schema": json.loads(schema.to_json()), "frames": frames, "model": self.model, "file": path.name}
        with _AtomicFile(f) as tmp:
            tmp.write_text(json.dumps(doc), encoding="utf-8")

    # ---- one file -----------------------------------------------------------------------------------------

    def messages(self, n: int, indices: Sequence[int], frames: np.ndarray) -> list[dict]:
        """The chat messages for a clip of ``n`` frames whose frames ``indices`` are ``frames`` ((K, H, W, 3)
        uint8): the system prompt, then one user message of labelled JPEG data URLs."""
        if n == 1:
            intro = "An image (a clip of 1 frame, index 0)."
        else:
            intro = (f"A clip of {n} frames (indices 0 to {n - 1}). You see {len(indices)} of them, frames "
                     f"{', '.join(map(str, indices))}.")
        parts: list[dict] = [{"type": "text", "text": intro}]
        for i, fr in zip(indices, frames):
            parts.append({"type": "text", "text": f"Frame {i}:"})
            parts.append({"type": "image_url", "image_url": {"url": _data_url(fr, self.max_side)}})
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": parts}]

    @staticmethod
    def parse(reply: str, n: int) -> CaptionSchema:
        """The schema of a reply for a clip of ``n`` frames: ValueError naming the field when the JSON does not
        parse, breaks the schema or has a span past the clip's last frame."""
        schema = CaptionSchema.from_json(reply)
        for i, s in enumerate(schema.spans):
            if s.end > n - 1:
                raise ValueError(f"spans[{i}].end must be at most the clip's last frame {n - 1}, got {s.end}")
        return schema

    def _ask(self, messages: list[dict], n: int) -> CaptionSchema:
        fmt = self.response_format()
        reply = self.client.complete(messages, response_format=fmt, temperature=self.temperature)
        try:
            return self.parse(reply, n)
        except ValueError as e:
            if not self.repair:
                raise _ReplyError(f"the model's reply is not a valid caption: {e}; reply: {reply[:200]!r}") from None
            fix = [*messages, {"role": "assistant", "content": reply},
                   {"role": "user", "content": f"That answer is not valid: {e}. Answer again with the corrected "
                                               "JSON object only."}]
        reply = self.client.complete(fix, response_format=fmt, temperature=self.temperature)
        try:
            return self.parse(reply, n)
        except ValueError as e:
            raise _ReplyError(f"the model's reply is not a valid caption, also after a repair turn: {e}; reply: "
                              f"{reply[:200]!r}") from None

    def caption_file(self, path: Path) -> CaptionOutcome:
        """Caption one file: from the cache when it holds the file's key, else by one request (two with a repair
        turn). A refused or unanswered request or an invalid reply is a failed outcome; an unreadable file raises
        (:meth:`caption_files` turns that into a failed outcome too)."""
        from ..data.video_folder import _regular_stat

        path = Path(path)
        t0 = time.perf_counter()
        _regular_stat(path)   # a FIFO or device with a video's name is never opened (opening a FIFO blocks)
        key = self.cache_key(path) if self.cache_dir is not None else None
        hit = self._cache_get(key) if key is not None else None
        if hit is not None:
            return CaptionOutcome(path, hit[0], hit[1], time.perf_counter() - t0, cached=True)
        n, indices, frames = _read_frames(path, self.every_n, self.max_frames)
        try:
            schema = self._ask(self.messages(n, indices, frames), n)
        except (ChatError, _ReplyError) as e:
            return CaptionOutcome(path, None, indices, time.perf_counter() - t0, error=str(e))
        if key is not None:
            self._cache_put(key, path, schema, indices)
        return CaptionOutcome(path, schema, indices, time.perf_counter() - t0)

    def _caption_one(self, path: Path) -> CaptionOutcome:
        t0 = time.perf_counter()
        try:
            return self.caption_file(path)
        except Exception as e:   # noqa: BLE001 - every failure is one file's outcome
            return CaptionOutcome(Path(path), error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)

    def caption_files(self, paths: Sequence[Path],
                      on_done: Optional[Callable[[CaptionOutcome], None]] = None) -> list[CaptionOutcome]:
        """Caption ``paths`` with at most :attr:`concurrency` requests in flight; the outcomes come back in the
        order of ``paths`` and ``on_done`` is called (in this thread) as each finishes."""
        paths = [Path(p) for p in paths]
        out: list[Optional[CaptionOutcome]] = [None] * len(paths)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(paths))),
                                  thread_name_prefix="caption")
        try:
            futures = {pool.submit(self._caption_one, p): i for i, p in enumerate(paths)}
            for fut in as_completed(futures):
                res = out[futures[fut]] = fut.result()
                if on_done is not None:
                    on_done(res)
        except BaseException:   # Ctrl-C: no new requests; those in flight end with their timeout
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return out
