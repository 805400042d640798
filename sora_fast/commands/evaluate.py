"""``sora-fast eval VIDEO_DIR``: model-free metrics (and, from captions, world-model probes) per clip and
aggregated, a summary table, a JSON file and contact sheets of the worst clips per metric."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".png", ".jpg", ".jpeg")


def read_clip(path: Path) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 frames of a video or image file (PyAV / Pillow); OSError when unreadable."""
    from ..data.io import _import_av, _import_pil

    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif"):
        Image = _import_pil("to read images")
        try:
            with Image.open(path) as im:
                frames = []
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    frames.append(np.array(im.convert("RGB")))
        except Exception as e:  # Pillow raises many kinds for a broken file
            raise OSError(f"{path.name}: unreadable image ({e})") from e
        if len({f.shape for f in frames}) != 1:
            raise OSError(f"{path.name}: frames of different sizes")
        return np.stack(frames)
    av = _import_av("to read videos")
    try:
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    except Exception as e:
        raise OSError(f"{path.name}: unreadable video ({e})") from e
    if not frames or len({f.shape for f in frames}) != 1:
        raise OSError(f"{path.name}: no frames, or frames of different sizes")
    return np.stack(frames)


def _finite(x) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate_folder(video_dir, *, captions: bool = False, reference=None, progress: bool = True) -> dict:
    """Score every clip of ``video_dir`` (returns the ``--json`` document, plus ``"_frames"``: the clips)."""
    from ..data.io import _progress
    from ..eval import metrics as M
    from ..eval.probes import PROBES, pass_rates, probe_clip

    root = Path(video_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"VIDEO_DIR must be a folder of videos, got {str(root)!r}")
    ref_root = None if reference is None else Path(reference)
    if ref_root is not None and not ref_root.is_dir():
        raise NotADirectoryError(f"--reference must be a folder of videos, got {str(ref_root)!r}")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise ValueError(f"VIDEO_DIR {str(root)!r} holds no video or image files ({', '.join(VIDEO_EXTENSIONS)})")
    missing = M.missing_libraries()
    names = [m for m in M.METRICS if m not in missing and (ref_root is not None or m not in ("psnr", "ssim"))]
    clips, frames_of, skipped = [], {}, {"unreadable": [], "mismatched": [], "no_caption": []}
    for path in _progress(files, total=len(files), desc="eval", enable=progress):
        try:
            frames = read_clip(path)
        except OSError as e:
            skipped["unreadable"].append(str(e))
            continue
        metrics = {}
        for m in names:
            if m in ("psnr", "ssim"):
                continue
            if frames.shape[0] < (3 if m == "motion_smoothness" else 2):
                continue
            metrics[m] = _finite(getattr(M, m)(frames))
        if ref_root is not None and {"psnr", "ssim"} & set(names):
            ref = next((q for q in (ref_root / path.name, *sorted(ref_root.glob(path.stem + ".*"))) if q.is_file()),
                       None)
            try:
                rf = None if ref is None else read_clip(ref)
            except OSError:
                rf = None
            if rf is None or rf.shape != frames.shape:
                why = "no reference" if ref is None else ("unreadable reference" if rf is None else
                                                           f"shape {frames.shape} vs reference {rf.shape}")
                skipped["mismatched"].append(f"{path.name}: {why}")
            else:
                for m in ("psnr", "ssim"):
                    if m in names:
                        metrics[m] = _finite(getattr(M, m)(frames, rf))
        caption, probes = None, {p: None for p in PROBES}
        if captions:
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
            try:
                probes = probe_clip(frames, caption).probes if caption else probes
            except ValueError:
                skipped["no_caption"].append(f"{path.name}: caption not in the synthetic grammar")
            if not caption:
                skipped["no_caption"].append(f"{path.name}: no caption file")
        clips.append({"file": path.name, "caption": caption, "metrics": metrics, "probes": probes})
        frames_of[path.name] = frames

    class _R:  # pass_rates reads .probes
        def __init__(self, probes):
            self.probes = probes

    summary = {
        "clips": len(clips), "files": len(files),
        "skipped": {k: len(v) for k, v in skipped.items()}, "skipped_why": {k: v[:20] for k, v in skipped.items()},
        "metrics": {m: _mean([c["metrics"].get(m) for c in clips]) for m in names},
        "probes": pass_rates([_R(c["probes"]) for c in clips]) if captions else {},
        "unavailable": missing,
    }
    return {"clips": clips, "summary": summary, "_frames": frames_of}


def _mean(vals) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def format_summary(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"{'metric':<22} {'mean':>9}  clips", f"{'-' * 22} {'-' * 9}  -----"]
    for m, v in s["metrics"].items():
        n = sum(c["metrics"].get(m) is not None for c in doc["clips"])
        lines.append(f"{m:<22} {'-' if v is None else f'{v:9.4f}':>9}  {n}")
    if s["probes"]:
        lines += ["", f"{'probe':<22} {'passed':>9}  rate", f"{'-' * 22} {'-' * 9}  ----"]
        for p, r in s["probes"].items():
            rate = "-" if r["rate"] is None else f"{r['rate']:.0%}"
            lines.append(f"{p:<22} {r['passed']:>4}/{r['judged']:<4}  {rate}")
    for m, why in s["unavailable"].items():
        lines.append(f"not computed: {why}")
    sk = s["skipped"]
    lines.append(f"eval: {s['clips']}/{s['files']} clips scored; skipped {sk['unreadable']} unreadable, "
                 f"{sk['mismatched']} without a matching reference, {sk['no_caption']} without a usable caption")
    return "\n".join(lines)


def write_sheets(doc: dict, out_dir, worst: int = 4) -> list[Path]:
    """A contact sheet per metric (its ``worst`` lowest clips; dynamic degree: its static ones) and per probe
    (clips that fail it), in ``out_dir``."""
    from ..data.io import write_contact_sheet

    out, written = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    frames = doc["_frames"]
    for m in doc["summary"]["metrics"]:
        scored = sorted((c for c in doc["clips"] if c["metrics"].get(m) is not None), key=lambda c: c["metrics"][m])
        picked = scored[:worst]
        if picked:
            caps = [f"{c['file']}  {m}={c['metrics'][m]:.4g}" for c in picked]
            written.append(write_contact_sheet(out / f"worst_{m}.png", [frames[c["file"]] for c in picked], caps))
    for p in doc["summary"].get("probes", {}):
        picked = [c for c in doc["clips"] if c["probes"].get(p) is False][:worst]
        if picked:
            caps = [f"{c['file']}: {c['caption']}" for c in picked]
            written.append(write_contact_sheet(out / f"failed_{p}.png", [frames[c["file"]] for c in picked], caps))
    return written


def cmd_eval(args) -> int:
    if args.worst < 1:
        raise ValueError(f"--worst must be >= 1, got {args.worst}")
    doc = evaluate_folder(args.video_dir, captions=args.captions, reference=args.reference,
                          progress=not args.no_progress)
    print(format_summary(doc))
    if args.sheets:
        sheets = write_sheets(doc, args.sheets, args.worst)
        print(f"wrote {len(sheets)} contact sheets to {args.sheets}")
    doc.pop("_frames")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="model-free video metrics and world-model probes of a folder of clips",
                       description="Scores every video or image of VIDEO_DIR: temporal flickering, dynamic degree and "
                                   "motion smoothness (the eval extra: OpenCV), PSNR / SSIM against --reference clips "
                                   "(scikit-image), and with --captions the world-model probes of each clip's "
                                   "caption. Prints a summary table; unreadable and mismatched files are skipped "
                                   "and counted.")
    e.add_argument("video_dir", metavar="VIDEO_DIR", help="folder of clips (mp4, webm, gif, png, ...)")
    e.add_argument("--captions", action="store_true",
                   help="read each clip's caption from NAME.txt beside it and run the probes it calls for")
    e.add_argument("--reference", metavar="DIR", help="reference clips of the same names: adds PSNR and SSIM")
    e.add_argument("--json", metavar="OUT", help="write per-clip and summary results as JSON")
    e.add_argument("--sheets", metavar="DIR", default="eval_sheets",
                   help="contact sheets of the worst clips per metric and the failures per probe "
                        "(default: %(default)s; '' for none)")
    e.add_argument("--worst", type=int, default=4, metavar="K", help="clips per contact sheet (default: %(default)s)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)
