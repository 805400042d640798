"""``sora-fast caption DATA_DIR``: caption a folder's videos and images into the sidecar ``<stem>.txt`` files that
:class:`~sora_fast.data.VideoFolder` and ``sora-fast train`` read, and into ``DATA_DIR/captions.jsonl``.

A file that already has a caption (a non-empty sidecar) is kept unless ``--overwrite``. A file whose captioning
fails keeps whatever caption it had, and is named with its reason in the summary (exit status 1). Every write is
atomic (a temporary file moved into place), so an interrupted run leaves whole files only.

``captions.jsonl`` holds one line per captioned file, ``{"file": path relative to DATA_DIR, "captioner": name,
"model": name or null, "frames": [indices looked at], "seconds": float, "cached": bool, "schema": {...}, "caption":
rendered text}`` (``schema`` as :meth:`CaptionSchema.to_json` writes it); each run rewrites it whole, replacing the
lines of the files it captioned and keeping the others.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["CAPTIONERS", "CaptionRun", "caption_folder", "cmd_caption", "add_parser", "JSONL_NAME"]

JSONL_NAME = "captions.jsonl"
_CHAT_ONLY = ("base_url", "model", "api_key_env", "max_frames", "max_side", "concurrency", "timeout", "max_retries",
              "cache_dir", "system_prompt")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _pixel(args):
    from ..captions.pixel import PixelCaptioner

    return PixelCaptioner(**({} if args.every_n is None else {"every_n": args.every_n}))


def _chat(args):
    from ..captions.chat import ChatCaptioner

    missing = [_flag(k) for k in ("base_url", "model") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"--captioner chat needs {' and '.join(missing)}: the OpenAI-compatible server's root URL "
                         "(e.g. http://localhost:8000/v1 for vLLM) and the model it serves")
    kw = {k: getattr(args, k) for k in ("every_n", "max_frames", "max_side", "concurrency", "timeout", "max_retries",
                                        "api_key_env") if getattr(args, k) is not None}
    if args.system_prompt is not None:
        kw["system_prompt"] = Path(args.system_prompt).read_text(encoding="utf-8")
    cache_dir = Path(args.data_dir) / ".caption_cache" if args.cache_dir is None else args.cache_dir
    return ChatCaptioner(args.base_url, args.model, cache_dir=cache_dir, cache=not args.no_cache, **kw)


#: ``--captioner`` names and how each is built from the parsed arguments.
CAPTIONERS: dict[str, Callable] = {"pixel": _pixel, "chat": _chat}


@dataclass
class CaptionRun:
    """What :func:`caption_folder` did: the files captioned (their outcomes), kept and failed (with reasons)."""

    captioned: list = field(default_factory=list)   # CaptionOutcome, in folder order
    kept: list = field(default_factory=list)        # Path
    failed: list = field(default_factory=list)      # (Path, reason)
    jsonl: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return not self.failed


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".txt")


def _has_caption(path: Path) -> bool:
    """A sidecar caption with text in it (an empty or unreadable one counts as missing)."""
    try:
        return bool(_sidecar(path).read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def _write_text(path: Path, text: str) -> None:
    from ..data.io import _AtomicFile

    with _AtomicFile(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _jsonl_rows(jsonl: Path) -> list:
    """The lines of an existing captions.jsonl: ``(file or None, line text)``; lines that do not parse are kept
    as they are."""
    if not jsonl.is_file():
        return []
    rows = []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            f = json.loads(line).get("file")
        except (json.JSONDecodeError, AttributeError):
            f = None
        rows.append((f if isinstance(f, str) else None, line))
    return rows


def _folder(data_dir) -> Path:
    root = Path(os.fspath(data_dir)).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise NotADirectoryError(f"DATA_DIR must be a folder of videos and images, got {str(root)!r}, which {what}")
    return root


def caption_folder(data_dir, captioner, *, overwrite: bool = False, progress: bool = True) -> CaptionRun:
    """Caption the videos and images of ``data_dir`` (found as :class:`~sora_fast.data.VideoFolder` finds them)
    with ``captioner`` (a :class:`~sora_fast.captions.Captioner`): each caption goes to the file's sidecar
    ``<stem>.txt`` as it finishes and all of them to ``captions.jsonl`` at the end (module docstring). Files with a
    caption are kept unless ``overwrite``. Files sharing a sidecar (``a.mp4`` and ``a.png``) are failed, not
    guessed between."""
    from ..data.io import _progress
    from ..data.video_folder import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, find_media

    root = _folder(data_dir)
    files = find_media(root)
    if not files:
        raise ValueError(f"DATA_DIR {str(root)!r} holds no video or image files (looked for "
                         f"{', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}, recursively)")
    run = CaptionRun(jsonl=root / JSONL_NAME)
    owner: dict[Path, Path] = {}
    todo = []
    for p in files:
        side = _sidecar(p)
        if side in owner:
            run.failed.append((p, f"shares its caption file {side.name} with {owner[side].name} (VideoFolder reads "
                                  "<stem>.txt for both): rename one"))
            continue
        owner[side] = p
        if not overwrite and _has_caption(p):
            run.kept.append(p)
        else:
            todo.append(p)

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    rows: dict[str, str] = {}
    bar = _progress(range(len(todo)), total=len(todo), desc=f"caption ({captioner.name})", enable=progress)
    tick = iter(bar)   # advanced once per finished file

    def done(res) -> None:
        next(tick, None)
        if res.schema is None:
            return
        text = res.schema.render()
        _write_text(_sidecar(res.path), text + "\n")
        rows[rel(res.path)] = json.dumps({
            "file": rel(res.path), "captioner": captioner.name, "model": getattr(captioner, "model", None),
            "frames": [int(i) for i in res.frames], "seconds": round(float(res.seconds), 4),
            "cached": bool(res.cached), "schema": json.loads(res.schema.to_json()), "caption": text,
        }, ensure_ascii=False)

    try:
        outcomes = captioner.caption_files(todo, on_done=done) if todo else []
    finally:   # also after Ctrl-C: the sidecars written so far are listed
        if rows:
            lines, placed = [], set()
            for f, line in _jsonl_rows(run.jsonl):   # a captioned file's line replaces its old one(s) in place
                if f not in rows:
                    lines.append(line)
                elif f not in placed:
                    lines.append(rows[f])
                    placed.add(f)
            lines += [rows[f] for f in sorted(rows) if f not in placed]
            _write_text(run.jsonl, "".join(line + "\n" for line in lines))
        if hasattr(bar, "close"):
            bar.close()
    for res in outcomes:
        if res.schema is not None:
            run.captioned.append(res)
        else:
            run.failed.append((res.path, res.error or "no caption and no reason given"))
    order = {p: i for i, p in enumerate(files)}
    run.failed.sort(key=lambda x: order[x[0]])
    return run


def format_summary(run: CaptionRun, root: Path) -> str:
    cached = sum(r.cached for r in run.captioned)
    lines = [f"caption: {len(run.captioned)} captioned" + (f" ({cached} from the cache)" if cached else "")
             + f", {len(run.kept)} kept, {len(run.failed)} failed"]
    if run.kept:
        lines.append(f"  kept {len(run.kept)} file(s) that have a caption (--overwrite replaces them)")
    for p, why in run.failed:
        lines.append(f"  failed {p.relative_to(root).as_posix()}: {why}")
    if run.captioned:
        lines.append(f"wrote {len(run.captioned)} sidecar caption(s) and {run.jsonl}")
    return "\n".join(lines)


def cmd_caption(args) -> int:
    if args.every_n is not None and args.every_n < 1:
        raise ValueError(f"--every-n must be >= 1, got {args.every_n}")
    for k, lo in (("max_frames", 1), ("max_side", 16), ("concurrency", 1), ("max_retries", 0)):
        v = getattr(args, k)
        if v is not None and v < lo:
            raise ValueError(f"{_flag(k)} must be >= {lo}, got {v}")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.captioner != "chat":
        given = [_flag(k) for k in _CHAT_ONLY if getattr(args, k) is not None] + (["--no-cache"] if args.no_cache
                                                                                  else [])
        if given:
            raise ValueError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --captioner chat only, "
                             f"not --captioner {args.captioner}")
    root = _folder(args.data_dir)
    captioner = CAPTIONERS[args.captioner](args)
    run = caption_folder(root, captioner, overwrite=args.overwrite, progress=not args.no_progress)
    print(format_summary(run, root))
    return 0 if run.ok else 1


def add_parser(sub) -> None:
    c = sub.add_parser("caption", help="caption a folder's videos and images (sidecar .txt + captions.jsonl)",
                       description="Captions every video and image of DATA_DIR (as `sora-fast train` finds them) with "
                                   "the structured caption schema, rendered to the sidecar NAME.txt that training "
                                   "reads, and lists each in DATA_DIR/captions.jsonl with its schema. Files that "
                                   "have a caption are kept unless --overwrite; a file that fails keeps its old "
                                   "caption and is named in the summary (exit status 1). The chat captioner asks an "
                                   "OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI) and caches the "
                                   "replies by file content.")
    c.add_argument("data_dir", metavar="DATA_DIR", help="folder of videos and images (searched recursively)")
    c.add_argument("--captioner", required=True, choices=sorted(CAPTIONERS),
                   help="pixel: from the frames' pixels alone (no model); chat: a vision chat model behind "
                        "--base-url")
    c.add_argument("--base-url", metavar="URL",
                   help="chat: the server's OpenAI-compatible root, e.g. http://localhost:8000/v1 (vLLM), "
                        "http://localhost:8080/v1 (llama.cpp server), http://localhost:11434/v1 (Ollama)")
    c.add_argument("--model", metavar="NAME", help="chat: the model name the server serves")
    c.add_argument("--api-key-env", metavar="VAR",
                   help="chat: environment variable holding the API key (default: OPENAI_API_KEY; when unset a "
                        "placeholder is sent, which local servers accept)")
    c.add_argument("--every-n", type=int, metavar="N",
                   help="look at every N-th frame (default: the captioner's; chat 4)")
    c.add_argument("--max-frames", type=int, metavar="N",
                   help="chat: at most N frames per clip, spread evenly over it (default 8)")
    c.add_argument("--max-side", type=int, metavar="PX",
                   help="chat: frames are resized to at most PX on their longest side (default 512)")
    c.add_argument("--concurrency", type=int, metavar="N", help="chat: requests in flight at once (default 4)")
    c.add_argument("--timeout", type=float, metavar="S", help="chat: seconds per request (default 60)")
    c.add_argument("--max-retries", type=int, metavar="N",
                   help="chat: retries of a request after a 429, 5xx, timeout or connection error (default 4)")
    c.add_argument("--system-prompt", metavar="FILE", help="chat: a file whose text replaces the system prompt")
    c.add_argument("--cache-dir", metavar="DIR",
                   help="chat: where replies are cached by file content (default: DATA_DIR/.caption_cache)")
    c.add_argument("--no-cache", action="store_true", help="chat: neither read nor write the reply cache")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--only-missing", action="store_true",
                      help="caption only files without a caption (the default)")
    mode.add_argument("--overwrite", action="store_true", help="caption every file, replacing existing captions")
    c.add_argument("--no-progress", action="store_true", help="no progress bar (the summary only)")
    c.set_defaults(func=cmd_caption)
