"""The ``sora-fast`` command: ``demo``, ``train``, ``generate``, ``eval``, ``caption``, ``report``, ``bench`` ...
(``sora-fast --help`` lists them all, ``sora-fast CMD --help`` documents each)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .commands.generate import (  # noqa: F401
    MAX_NAME_BYTES,
    _check_solver_args,
    _finite,
    _keyframe,
    _size,
    attention_window_arg,
    cmd_calibrate_cache,
    cmd_generate,
    output_stems,
)
from .commands.train import TrainRunConfig, cmd_train, load_run_config, previous_run  # noqa: F401

__all__ = ["main", "TrainRunConfig", "load_run_config", "output_stems", "previous_run", "is_user_error"]


def cmd_report(args) -> int:
    from .tools import kernel_report

    return kernel_report.main(args.args, prog="sora-fast report")


def cmd_bench(args) -> int:
    from .bench import runner

    return runner.main(args.args, prog="sora-fast bench")


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, world=args.world, progress=not args.no_progress)
    return 0


def cmd_profile(args) -> int:
    from .pipeline import VideoPipeline
    from .profile import PROFILE_PRESETS, build_preset_pipeline, default_size, format_report, profile_pipeline

    if args.preset is not None and args.pipeline is not None:
        raise ValueError(f"give at most one of --preset and --pipeline, got --preset {args.preset} and "
                         f"--pipeline {args.pipeline}")
    for flag, v, lo in (("--steps", args.steps, 1), ("--prompts", args.prompts, 1), ("--warmup", args.warmup, 0),
                        ("--top", args.top, 1)):
        if v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    _finite("--guidance", args.guidance)
    _check_solver_args(args)
    if args.pipeline is not None:
        pipe = VideoPipeline.load(args.pipeline)
    else:
        if (args.preset or "tiny") not in PROFILE_PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PROFILE_PRESETS)}; got {args.preset!r}")
        pipe = build_preset_pipeline(args.preset or "tiny")
    size = pipe.check_size(args.size, name="--size") if args.size else default_size(pipe)
    prompts = [f"profile prompt {i}" for i in range(args.prompts)]
    report = profile_pipeline(pipe, prompts=prompts, size=size, steps=args.steps, guidance=args.guidance,
                              warmup=args.warmup, trace=args.trace, top=args.top, solver=args.solver,
                              order=args.order, cache=args.cache)
    print(format_report(report, top=args.top))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


# --- parser --------------------------------------------------------------------------------------
def _add_solver_args(p: argparse.ArgumentParser, pipeline_default: bool = False) -> None:
    """``--solver`` / ``--order`` / ``--cache``; with ``pipeline_default`` the solver defaults to the pipeline's."""
    default = "the pipeline's: a diffusers pipeline's scheduler (UniPC for Wan), else euler" if pipeline_default \
        else "%(default)s"
    p.add_argument("--solver", default=None if pipeline_default else "euler", choices=["euler", "unipc", "dpm++"],
                   help="flow solver: euler, unipc (UniPC predictor-corrector) or dpm++ (DPM-Solver++ multistep); "
                        f"one DiT forward per step each (default: {default})")
    p.add_argument("--order", type=int, metavar="K",
                   help="solver order: unipc 1-3 (default 2), dpm++ 1-2 (default 2), euler 1"
                        + (" (default with the pipeline's solver: its scheduler's)" if pipeline_default else ""))
    p.add_argument("--cache", metavar="SPEC",
                   help="step cache, decided per video and CFG half: first-block:THRESH (e.g. first-block:0.05) or "
                        "teacache:THRESH[:C_n,...,C_0] (coefficients from `sora-fast calibrate-cache`); default none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora-fast",
                                     description="sora_fast: packed video diffusion with custom kernels. "
                                                 "`sora-fast COMMAND --help` documents each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="data -> VAE -> packed DiT training -> sampling -> videos, on a CPU",
                       description="Runs every stage on a CPU with no download: synthetic captioned clips, a VAE "
                                   "and a DiT trained from scratch, packed CFG sampling, MP4/GIF + contact sheet, "
                                   "an automatic checker of the clips and a latency table. About 8 minutes on 2 "
                                   "cores (--quick: about 1 minute, a smoke run whose clips are not expected to "
                                   "pass the checker).")
    d.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (tiny data and step counts)")
    d.add_argument("--out", default="sora_fast_demo", metavar="DIR", help="output directory (default: %(default)s)")
    d.add_argument("--world", action="store_true",
                   help="train on the synthetic world (gravity, occlusion, two objects, camera motion; 17-frame "
                        "clips) instead of the plain synthetic clips: about 15 minutes on 2 cores")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train or fine-tune the DiT on a video folder",
                       description="Train (or fine-tune, full or LoRA) the DiT of a saved pipeline on a folder of "
                                   "captioned videos and images at native resolution. " + TrainRunConfig.__doc__)
    t.add_argument("--config", required=True, metavar="FILE", help="run description (.json or .toml), see above")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="delete the earlier run in the run directory (checkpoints, pipeline/, metrics.jsonl, "
                        "loss.png) and start over; without --resume or --overwrite an existing run is refused")
    t.add_argument("--steps", type=int, metavar="N", help="override train.steps")
    t.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: split each packed batch's tokens over N ranks (Ulysses; N must divide the "
                        "DiT's heads); the world size / N groups train data-parallel; weights are FSDP2-sharded "
                        "over all ranks (default: %(default)s)")
    t.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the pipeline's and the resumed checkpoint's files (sizes are still "
                        "checked; a warning names what is skipped): for huge files on trusted storage")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate videos from prompts with a saved pipeline",
                       description="All prompts are denoised together in one packed stream (CFG in the same "
                                   "forward), then decoded chunk by chunk.")
    g.add_argument("--pipeline", required=True, metavar="DIR",
                   help="a saved pipeline (e.g. the demo's pipeline/) or a diffusers Wan pipeline directory "
                        "(model_index.json, e.g. Wan2.1-T2V-1.3B-Diffusers)")
    g.add_argument("--prompt", required=True, action="append", metavar="TEXT", help="a prompt; repeat for several")
    g.add_argument("--expand", choices=["schema", "chat"],
                   help="rewrite each prompt into a caption in the training captions' style first: schema (read its "
                        "words, fill what it leaves out from the pipeline's caption statistics; no network) or chat "
                        "(an OpenAI-compatible chat model, --expand-base-url and --expand-model); default: off")
    g.add_argument("--expand-base-url", metavar="URL",
                   help="with --expand chat: the server's base URL, e.g. http://localhost:8000/v1 (the API key is read "
                        "from OPENAI_API_KEY)")
    g.add_argument("--expand-model", metavar="NAME", help="with --expand chat: the chat model's name")
    g.add_argument("--lora", metavar="PATH",
                   help="a Wan LoRA to apply: a diffusers (pytorch_lora_weights.safetensors, or its directory), "
                        "ComfyUI or sora_fast adapter file; for a two-expert pipeline (Wan 2.2 A14B) a directory "
                        "holding high_noise/ and low_noise/ (what sora-fast train writes)")
    g.add_argument("--size", action="append", type=_size, metavar="TxHxW",
                   help="frames x height x width, once for all or once per prompt (default 9x32x32, or the --edit "
                        "video's size)")
    g.add_argument("--steps", type=int, default=20, metavar="N",
                   help="solver steps, one DiT forward each (default: %(default)s)")
    _add_solver_args(g, pipeline_default=True)
    g.add_argument("--guidance", type=float, default=4.0, metavar="G", help="CFG scale (default: %(default)s)")
    g.add_argument("--guidance-2", type=float, default=None, metavar="G",
                   help="a two-expert pipeline's (Wan 2.2 A14B) CFG scale on the low-noise expert's steps (default: "
                        "--guidance)")
    g.add_argument("--shift", default=None, metavar="S",
                   help="schedule shift: a number, or 'auto' per video from its size (default: a diffusers "
                        "pipeline's scheduler shift, else auto)")
    g.add_argument("--negative-prompt", default="", metavar="TEXT", help="unconditional text (default: empty)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="video i uses seed + i (default: %(default)s)")
    g.add_argument("--edit", metavar="PATH",
                   help="edit this video or image (SDEdit) with every --prompt; the size defaults to its own "
                        "(a different --size is an error: it is never resized); needs --strength")
    g.add_argument("--strength", type=float, metavar="S",
                   help="with --edit: 0 keeps the video (VAE round trip), 1 generates anew from the seed's "
                        "noise; in between, re-noised to that level and denoised over the remaining steps")
    g.add_argument("--image", metavar="PATH",
                   help="image-to-video: this image is the first frame of every prompt's video; the size defaults "
                        "to 9 frames (--frames N with a long video) at the image's height and width")
    g.add_argument("--video", metavar="PATH",
                   help="extend this clip (needs --extend); the size defaults to 2n - 1 frames (n the clip's; --frames "
                        "N with a long video) at its height and width")
    g.add_argument("--extend", choices=["forward", "backward"],
                   help="with --video: forward puts the clip at the start and generates what follows, backward "
                        "puts it at the end and generates what comes before")
    g.add_argument("--keyframe", action="append", type=_keyframe, metavar="PATH@FRAME",
                   help="an image (or clip) at pixel frame FRAME of every video (negative from the end: -1 is the "
                        "last); FRAME must land on a multiple of 4; repeat for several (e.g. first.png@0 "
                        "last.png@-1)")
    g.add_argument("--frames", type=int, metavar="N",
                   help="a long video of N pixel frames (1 + 4k) per prompt, rolled out in windows of --window "
                        "frames, each given the previous one's last --overlap latent frames; --size (if given) is "
                        "the whole video's (default Nx32x32, or the --image / --video / --keyframe / --edit media's "
                        "height and width). Takes --image, --video --extend, --keyframe (frames count in the whole "
                        "video; each goes to the window that covers it) and --edit --strength (an N-frame video)")
    g.add_argument("--window", type=int, metavar="W",
                   help="with --frames: pixel frames per window (1 + 4m, m >= 1; e.g. the trained length)")
    g.add_argument("--overlap", type=int, metavar="K",
                   help="with --frames: latent frames each window takes from the previous one (1 <= K < the "
                        "window's latent frames, 1 + (W - 1)/4; a multiple of the DiT's temporal patch)")
    g.add_argument("--schedule", choices=["synchronous", "staggered"], default=None,
                   help="with --frames: synchronous (default: every frame of a window on one noise level) or "
                        "staggered (Diffusion Forcing: each frame starts --ar-step steps after the one before, so "
                        "later frames are noisier; steps + ar_step x (frames - 1) DiT forwards per window)")
    g.add_argument("--ar-step", type=int, default=None, metavar="N",
                   help="with --schedule staggered: steps each latent frame lags the one before (default 1; 0 is "
                        "the synchronous schedule)")
    g.add_argument("--attention-window", type=attention_window_arg, default=None, metavar="WT,WH,WW",
                   help="training-free local self-attention: each token attends only to tokens within WT latent "
                        "frames, WH and WW patches (half-sizes; cross-attention stays dense); default: the "
                        "model's own (dense)")
    g.add_argument("--format", nargs="+", default=["mp4", "gif"], choices=["mp4", "gif"],
                   help="files to write per clip (default: mp4 gif; 1-frame clips as png instead of mp4)")
    g.add_argument("--fps", type=float, default=8.0, metavar="F", help="frames per second (default: %(default)s)")
    g.add_argument("--out", default="samples", metavar="DIR", help="output directory (default: %(default)s)")
    g.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: split the packed stream's tokens over N ranks at every step (Ulysses; N "
                        "must divide the DiT's heads) (default: %(default)s)")
    g.add_argument("--cfg-parallel", action="store_true",
                   help="under torchrun: conditional and unconditional CFG halves on different ranks "
                        "(world size = 2 x --sequence-parallel)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the pipeline's weight files (sizes are still checked; a warning "
                        "names what is skipped): for huge files on trusted storage")
    g.set_defaults(func=cmd_generate)

    cc = sub.add_parser("calibrate-cache", help="fit TeaCache's rescaling polynomial on a saved pipeline's DiT",
                        description="Samples held-out prompts with every step computed, records per video and CFG "
                                    "half the relative change of the DiT's modulated input and of its output residual "
                                    "between steps, fits a polynomial of one to the other and prints the "
                                    "--cache teacache:THRESH:C_n,...,C_0 spec to generate with.")
    cc.add_argument("--pipeline", required=True, metavar="DIR", help="a saved pipeline")
    cc.add_argument("--prompts", type=int, default=8, metavar="N",
                    help="held-out prompts to sample (default: %(default)s)")
    cc.add_argument("--size", type=_size, metavar="TxHxW", help="frames x height x width (default 9x32x32)")
    cc.add_argument("--steps", type=int, default=20, metavar="N", help="solver steps (default: %(default)s)")
    cc.add_argument("--guidance", type=float, default=4.0, metavar="G", help="CFG scale (default: %(default)s)")
    cc.add_argument("--solver", default="euler", choices=["euler", "unipc", "dpm++"],
                    help="the solver the cache will be used with (default: %(default)s)")
    cc.add_argument("--order", type=int, metavar="K", help="solver order (default: the solver's)")
    cc.add_argument("--degree", type=int, default=4, metavar="D", help="polynomial degree (default: %(default)s)")
    cc.add_argument("--seed", type=int, default=0, metavar="N", help="prompts and noise seed (default: %(default)s)")
    cc.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the pipeline's weight files")
    cc.set_defaults(func=cmd_calibrate_cache)

    from .commands.evaluate import add_parser as add_eval_parser

    add_eval_parser(sub)

    from .commands.caption import add_parser as add_caption_parser

    add_caption_parser(sub)

    pr = sub.add_parser("profile", help="inference latency of a pipeline: stages, top ops, memory, throughput",
                        description="Warm-up run(s), then one timed run of generate (text encode, every denoising "
                                    "step, VAE decode), one under torch.profiler (top ops, optional Chrome trace) "
                                    "and, on a CPU, one under a tensor-memory tracker. With no --pipeline, a "
                                    "random-weight tiny pipeline is profiled (no checkpoint needed).")
    pr.add_argument("--preset", metavar="NAME",
                    help="random-weight pipeline to profile: tiny or demo (default: tiny unless --pipeline)")
    pr.add_argument("--pipeline", metavar="DIR", help="a saved pipeline to profile instead of a preset")
    pr.add_argument("--size", type=_size, metavar="TxHxW",
                    help="frames x height x width of every video (default 9x32x32, or the smallest valid size)")
    pr.add_argument("--prompts", type=int, default=1, metavar="N",
                    help="videos generated together in one packed stream (default: %(default)s)")
    pr.add_argument("--steps", type=int, default=10, metavar="N", help="solver steps (default: %(default)s)")
    _add_solver_args(pr)
    pr.add_argument("--guidance", type=float, default=4.0, metavar="G",
                    help="CFG scale; 1 runs without the unconditional copy (default: %(default)s)")
    pr.add_argument("--warmup", type=int, default=1, metavar="N",
                    help="unmeasured runs before the measured one (default: %(default)s)")
    pr.add_argument("--trace", metavar="PATH", help="write a Chrome trace of the profiled run (chrome://tracing)")
    pr.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    pr.add_argument("--top", type=int, default=15, metavar="K", help="ops listed in the table (default: %(default)s)")
    pr.set_defaults(func=cmd_profile)

    r = sub.add_parser("report", add_help=False,
                       help="offline sm_90 report of every shipped Triton config and CUDA kernel (registers, "
                            "spills, shared memory, tensor-core / vector-load counts, occupancy)",
                       description="See `sora-fast report --help`.")
    r.add_argument("args", nargs=argparse.REMAINDER,
                   help="the report's own options (`sora-fast report --help` lists them)")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", add_help=False,
                       help="kernel benchmarks: every op across providers side by side (ms, TFLOP/s or GB/s, %% of "
                            "floor), checked against a reference before timing; JSON, CSV and plots",
                       description="See `sora-fast bench --help`.")
    b.add_argument("args", nargs=argparse.REMAINDER,
                   help="the benchmark's own options (`sora-fast bench --help` lists them)")
    b.set_defaults(func=cmd_bench)
    return parser


def is_user_error(e: BaseException) -> bool:
    """Errors the CLI reports as one line and exit status 2 (no traceback): bad arguments and values
    (ValueError, TypeError), files that are missing, unreadable or broken (OSError and its kinds, the
    safetensors parser's error), a missing optional package (ImportError), memory exhausted, and the
    project's own error classes (BackendUnavailableError, DiffusersHooksError, ...)."""
    if isinstance(e, (ValueError, TypeError, OSError, ImportError, MemoryError)):
        return True
    cls = type(e)
    module = cls.__module__ or ""
    return (module == "sora_fast" or module.startswith("sora_fast.")
            or any(c.__name__ in ("SafetensorError", "OutOfMemoryError") for c in cls.__mro__))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # the report parses its own options (argparse's REMAINDER misses a leading flag)
        return cmd_report(argparse.Namespace(args=argv[1:]))
    if argv[:1] == ["bench"]:  # the same for the benchmark
        return cmd_bench(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    if getattr(args, "shift", None) not in (None, "auto"):
        try:
            args.shift = float(args.shift)
        except ValueError:
            print(f"sora-fast {args.command}: error: --shift must be a number or 'auto', got {args.shift!r}",
                  file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except Exception as e:
        if os.environ.get("SORA_FAST_DEBUG") or not is_user_error(e):
            raise
        print(f"sora-fast {args.command}: error: {e} (SORA_FAST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sora-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
