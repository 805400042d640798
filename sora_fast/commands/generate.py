"""``sora-fast generate``: arguments checked before any model loads, conditions and edits read from files,
long rollouts, and the files written (names bounded in bytes)."""
from __future__ import annotations

import argparse
from typing import Sequence


# --- generate --------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is FRAMESxHEIGHTxWIDTH, e.g. 9x32x48; got {text!r}") from None
    return t, h, w


def attention_window_arg(text: str) -> tuple[int, int, int]:
    """``WT,WH,WW`` -> 3 ints >= 0 (half-sizes in latent patches of a local self-attention window)."""
    try:
        window = tuple(int(v) for v in text.split(","))
    except ValueError:
        window = ()
    if len(window) != 3 or min(window) < 0:
        raise argparse.ArgumentTypeError(f"an attention window is WT,WH,WW: 3 ints >= 0 (half-sizes in latent "
                                         f"patches), e.g. 1,4,4; got {text!r}")
    return window


MAX_NAME_BYTES = 100  # file names built from prompts, in UTF-8 bytes (file systems allow 255)


def output_stems(prompts: Sequence[str], max_bytes: int = MAX_NAME_BYTES) -> list[str]:
    """File names (without extension) for the videos of ``prompts``: the index, then the prompt's first
    words (letters and digits only), cut to at most ``max_bytes`` UTF-8 bytes on a character boundary, and
    unique (a hash of the prompt is appended should two ever agree)."""
    import hashlib

    width = max(2, len(str(len(prompts) - 1)))
    stems, used = [], set()
    for i, p in enumerate(prompts):
        words = ("".join(c for c in w if c.isalnum()) for w in p.split()[:6])
        stem = f"{i:0{width}d}_" + "_".join(w for w in words if w)
        stem = stem.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore").rstrip("_")
        if stem.lower() in used:
            tag = "_" + hashlib.sha1(f"{i}:{p}".encode("utf-8")).hexdigest()[:8]
            stem = stem.encode("utf-8")[:max_bytes - len(tag)].decode("utf-8", errors="ignore") + tag
        used.add(stem.lower())
        stems.append(stem)
    return stems


def _keyframe(text: str) -> tuple[str, int]:
    path, sep, frame = text.rpartition("@")
    try:
        if not sep or not path:
            raise ValueError
        return path, int(frame)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a keyframe is PATH@FRAME (FRAME a pixel frame index, negative from the "
                                         f"end, e.g. last.png@-1); got {text!r}") from None


def _check_condition_args(args) -> None:
    """``--image`` / ``--video --extend`` / ``--keyframe`` -> ``args.conditions`` (a list of Condition for every
    prompt, media read) and ``args.condition_size`` (the default size they imply), checked without a model."""
    from ..pipeline import Condition, read_media

    args.conditions, args.condition_size = [], None
    if args.extend is not None and args.video is None:
        raise ValueError("--extend needs --video PATH (the clip to extend)")
    if args.video is not None and args.extend is None:
        raise ValueError("--video needs --extend forward|backward (where the clip goes: at the start or the end)")
    if args.image is not None and args.video is not None:
        raise ValueError("--image and --video --extend both give the video's frames; use one (add frames at other "
                         "places with --keyframe PATH@FRAME)")
    keyframes = args.keyframe or []
    if args.edit is not None and (args.image is not None or args.video is not None or keyframes):
        raise ValueError("--edit cannot be combined with --image, --video or --keyframe on the command line (use "
                         "VideoPipeline.generate(init_videos=..., conditions=...) for both)")
    if args.image is not None:
        img = read_media(args.image, "--image")
        if img.shape[1] != 1:
            raise ValueError(f"--image {args.image!r} has {img.shape[1]} frames; give an image (use --video --extend "
                             "for a clip)")
        args.conditions.append(("--image", Condition(img, 0)))
        args.condition_size = (9, *img.shape[2:])
    if args.video is not None:
        clip = read_media(args.video, "--video")
        n = clip.shape[1]
        frame = 0 if args.extend == "forward" else -n
        args.conditions.append((f"--video (--extend {args.extend})", Condition(clip, frame)))
        args.condition_size = (2 * n - 1, *clip.shape[2:])
    for path, frame in keyframes:
        media = read_media(path, f"--keyframe {path}@{frame}")
        args.conditions.append((f"--keyframe {path}@{frame}", Condition(media, frame)))
        if args.condition_size is None:
            args.condition_size = (9, *media.shape[2:])
    if args.frames is not None and args.condition_size is not None:  # a long video: --frames is the whole video's
        args.condition_size = (args.frames, *args.condition_size[1:])
    for i, s in enumerate((args.size or [args.condition_size]) if args.conditions else []):
        t, h, w = s
        for flag, c in args.conditions:
            n, ch, cw = c.media.shape[1:]
            where = f"--size #{i + 1} {t}x{h}x{w}" if args.size else f"the default size {t}x{h}x{w}"
            if (ch, cw) != (h, w):
                raise ValueError(f"{flag} is {ch}x{cw} (height x width) but {where} was requested; a condition is "
                                 "never resized: pass --size with its height and width (or leave --size out)")
            if n > t:
                raise ValueError(f"{flag} has {n} frames, more than the {t} of {where}")
            if not -t <= c.frame < t:
                raise ValueError(f"{flag}: frame {c.frame} is outside the video ({where}: frames {-t}..{t - 1})")


def _finite(flag: str, value: float, positive: bool = False) -> float:
    import math

    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{flag} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return value


def _check_solver_args(args) -> None:
    """``--solver`` / ``--order`` / ``--cache``, errors naming the flag (``--solver`` None: the pipeline's, checked
    with ``--order`` once it is loaded)."""
    from ..sampling import MAX_ORDER, check_solver, parse_cache

    try:
        if args.solver is not None:
            check_solver(args.solver, args.order)
        elif args.order is not None and not 1 <= args.order <= max(MAX_ORDER.values()):
            raise ValueError(f"order must be in 1..{max(MAX_ORDER.values())} (unipc 1-3, dpm++ 1-2, euler 1), got "
                             f"{args.order}")
    except (ValueError, TypeError) as e:
        raise ValueError(f"--order/--solver: {e}") from None
    try:
        parse_cache(args.cache)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--cache: {e}") from None


def _check_expand_args(args) -> None:
    """``--expand`` / ``--expand-base-url`` / ``--expand-model``: the chat expander needs both, nothing else does."""
    chat = {"--expand-base-url": args.expand_base_url, "--expand-model": args.expand_model}
    if args.expand == "chat":
        missing = [f for f, v in chat.items() if not v]
        if missing:
            raise ValueError(f"--expand chat needs {' and '.join(missing)} (an OpenAI-compatible server and its model)")
    else:
        given = [f for f, v in chat.items() if v]
        if given:
            raise ValueError(f"{' and '.join(given)} only apply to --expand chat, got --expand {args.expand}")


def _expand_prompts(pipe, args, mesh) -> list:
    """Each ``--prompt``'s :class:`~sora_fast.captions.expand.Expansion` (under torchrun rank 0 expands and
    every rank takes its prompts, so a chat model's answer is the same everywhere), printed."""
    from ..captions.expand import Expansion, make_expander

    if args.expand is None:
        return [Expansion(p, p) for p in args.prompt]
    main = mesh is None or mesh.is_main
    found = None
    if main:
        expander = make_expander(args.expand, stats=pipe.caption_stats, base_url=args.expand_base_url,
                                 model=args.expand_model)
        found = expander.expand_many(args.prompt)
    if mesh is not None:
        import torch.distributed as dist

        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    if main:
        for i, e in enumerate(found):
            print(f"expand ({args.expand}) prompt {i + 1}: {e.describe()}")
    return found


def _check_generate_args(args) -> None:
    """Every argument of ``generate`` that needs no model, checked before anything loads or runs."""
    _finite("--guidance", args.guidance)
    if args.guidance_2 is not None:
        _finite("--guidance-2", args.guidance_2)
        if args.frames is not None:
            raise ValueError("--guidance-2 applies to generate's two-expert sampling; a long video (--frames) takes "
                             "--guidance for both experts: leave out --guidance-2")
    _check_expand_args(args)
    _check_solver_args(args)
    if args.cache is not None and (args.sequence_parallel > 1 or args.cfg_parallel):
        raise ValueError("--cache runs the DiT block by block on one process; leave out --sequence-parallel and "
                         "--cfg-parallel with it")
    if args.shift not in (None, "auto"):
        _finite("--shift", args.shift, positive=True)
    _finite("--fps", args.fps, positive=True)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    sizes = args.size or [(9, 32, 32)]
    if len(sizes) not in (1, len(args.prompt)):
        raise ValueError(f"--size given {len(sizes)} times; give it once or once per --prompt ({len(args.prompt)})")
    args.format = list(dict.fromkeys(args.format))  # each format once
    _check_long_args(args)  # before any media is read
    args.edit_video = None
    if args.strength is not None and args.edit is None:
        raise ValueError("--strength needs --edit VIDEO (the strength of an edit; plain generation has none)")
    if args.edit is not None:
        if args.strength is None:
            raise ValueError("--edit needs --strength S in [0, 1] (0 keeps the video, 1 generates anew)")
        if not 0.0 <= args.strength <= 1.0:  # NaN fails too
            raise ValueError(f"--strength must be a number in [0, 1], got {args.strength!r}")
        from ..pipeline import read_media

        args.edit_video = read_media(args.edit, "--edit")
        have = tuple(args.edit_video.shape[1:])
        if args.frames is not None and have[0] != args.frames:
            raise ValueError(f"--edit video has {have[0]} frames but --frames is {args.frames}; an edited long video "
                             "is never cut: give --frames its frame count")
        for i, s in enumerate(args.size or []):
            if tuple(s) != have:
                raise ValueError(f"--size #{i + 1} {'x'.join(map(str, s))} differs from the --edit video's size "
                                 f"{'x'.join(map(str, have))} (frames x height x width); an edited video is never "
                                 "resized: leave out --size, it defaults to the video's")
    _check_condition_args(args)


def _check_long_args(args) -> None:
    """``--frames N --window W --overlap K`` (long videos): all three or none, ``--schedule`` / ``--ar-step`` only
    with them, a ``--size`` whose frames are ``--frames``; checked without a model (the VAE's frame rules are
    checked by ``VideoPipeline.plan_long`` once it is loaded, before any work). ``--image``, ``--video``,
    ``--keyframe`` and ``--edit`` combine with them: frames count in the whole long video."""
    flags = {"--frames": args.frames, "--window": args.window, "--overlap": args.overlap}
    if all(v is None for v in flags.values()):
        given = [f for f, v in (("--schedule", args.schedule), ("--ar-step", args.ar_step)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to long videos only "
                             "(--frames N --window W --overlap K)")
        return
    missing = [f for f, v in flags.items() if v is None]
    if missing:
        raise ValueError(f"long videos need --frames N --window W --overlap K together; missing {', '.join(missing)}")
    if args.ar_step is not None and args.schedule != "staggered":
        raise ValueError(f"--ar-step needs --schedule staggered (got --schedule {args.schedule or 'synchronous'})")
    if args.ar_step is not None and args.ar_step < 0:
        raise ValueError(f"--ar-step must be >= 0 (steps each frame lags the one before), got {args.ar_step}")
    if args.window < 1:
        raise ValueError(f"--window must be a positive number of pixel frames (1 + 4m, m >= 1), got {args.window}")
    if args.frames < args.window:
        raise ValueError(f"--frames must be >= --window ({args.window}), got {args.frames}")
    if args.overlap < 1:
        raise ValueError(f"--overlap must be >= 1 latent frame, got {args.overlap}")
    for i, s in enumerate(args.size or []):
        if s[0] != args.frames:
            raise ValueError(f"--size #{i + 1} {'x'.join(map(str, s))} has {s[0]} frames but --frames is "
                             f"{args.frames}; with a long video --size is the whole video's (or give only --frames "
                             "and a size of the same frames)")


def _generate_long(pipe, args, prompts, sizes, mesh) -> list:
    """Every prompt rolled out alone by ``generate_long`` (prompt i with seed + i), a progress bar over its
    windows; returns the clips and sets ``pipe.last_timings`` to the sums over prompts."""
    from ..distributed import make_denoiser
    from ..training.metrics import ProgressBar

    plans = [pipe.plan_long(args.frames, args.window, args.overlap, tuple(s[1:])) for s in sizes]  # before work
    denoiser = None if mesh is None else pipe.denoiser(lambda dit: make_denoiser(dit, mesh))
    kw = dict(schedule=args.schedule or "synchronous", ar_step=args.ar_step)
    if args.conditions:
        kw["conditions"] = [c for _, c in args.conditions]
    if args.edit_video is not None:
        kw.update(init_video=args.edit_video, strength=args.strength)
    clips, total, evaluations = [], {"text": 0.0, "denoise": 0.0, "decode": 0.0}, []
    for i, (prompt, s, plan) in enumerate(zip(prompts, sizes, plans)):
        bar = ProgressBar(len(plan), desc=f"video {i + 1}/{len(sizes)} windows",
                          disable=mesh is not None and not mesh.is_main, print_every=1)
        clips.append(pipe.generate_long(prompt, args.frames, window=args.window, overlap=args.overlap,
                                        size=tuple(s[1:]), steps=args.steps, guidance=args.guidance,
                                        shift=args.shift, negative_prompt=args.negative_prompt, seed=args.seed + i,
                                        progress=lambda k, n: bar.update(), denoiser=denoiser,
                                        solver=args.solver, order=args.order, cache=args.cache,
                                        attention_window=args.attention_window, **kw))
        bar.close()
        for k in total:
            total[k] += pipe.last_timings[k]
        evaluations.append(pipe.last_timings["evaluations"])
    pipe.last_timings = {**total, "evaluations": evaluations}
    return clips


def cmd_generate(args) -> int:
    from ..data import write_contact_sheet, write_video
    from ..distributed import make_denoiser
    from ..distributed.launch import sampling_mesh
    from ..pipeline import VideoPipeline
    from ..training.checkpoint import check_writable

    _check_generate_args(args)
    stems = output_stems(args.prompt)
    mesh = sampling_mesh(args.sequence_parallel, args.cfg_parallel, args.guidance)  # None unless under torchrun
    out = check_writable(args.out)
    pipe = VideoPipeline.load(args.pipeline, verify=not args.no_verify)
    args.solver, args.order = pipe.solver_settings(args.solver, args.order)
    _check_solver_args(args)
    if args.guidance_2 is not None and pipe.dit_2 is None:
        raise ValueError(f"--guidance-2 is the low-noise expert's CFG scale; {args.pipeline} has one DiT (no second "
                         "expert): leave out --guidance-2")
    if args.lora is not None:
        from ..training.lora_formats import load_expert_lora_files, load_lora_file

        if pipe.dit_2 is not None:  # Wan 2.2 A14B: the pair sora-fast train writes (high_noise/, low_noise/)
            try:
                load_expert_lora_files(pipe.dit, pipe.dit_2, args.lora)
            except ValueError as e:
                raise ValueError(f"--lora: {args.pipeline} has two experts (Wan 2.2 A14B): {e}") from None
        else:
            load_lora_file(pipe.dit, args.lora)
    edit = args.edit_video
    long = args.frames is not None
    sizes = args.size or [args.condition_size or ((9 if not long else args.frames, 32, 32) if edit is None
                                                  else tuple(edit.shape[1:]))]
    if len(sizes) not in (1, len(args.prompt)):
        raise ValueError(f"--size given {len(sizes)} times; give it once or once per --prompt ({len(args.prompt)})")
    sizes = sizes * len(args.prompt) if len(sizes) == 1 else sizes
    for i, s in enumerate(sizes):
        if not long:
            pipe.check_size(s, name=f"--edit {args.edit}" if edit is not None else f"--size #{i + 1}")
    kw = {} if edit is None else dict(init_videos=[edit] * len(args.prompt), strength=args.strength)
    if args.conditions:
        kw["conditions"] = [[c for _, c in args.conditions] for _ in args.prompt]
    expansions = _expand_prompts(pipe, args, mesh)
    prompts = [e.expanded for e in expansions]      # what the model sees
    if long:
        clips = _generate_long(pipe, args, prompts, sizes, mesh)
    else:
        clips = pipe.generate(prompts, sizes, steps=args.steps, guidance=args.guidance, shift=args.shift,
                              negative_prompt=args.negative_prompt, seed=args.seed, **kw, guidance_2=args.guidance_2,
                              denoiser=None if mesh is None else pipe.denoiser(lambda dit: make_denoiser(dit, mesh)),
                              solver=args.solver, order=args.order, cache=args.cache,
                              attention_window=args.attention_window)
    if mesh is not None and not mesh.is_main:
        return 0  # every rank holds the same clips; rank 0 writes them
    written = []
    for clip, stem in zip(clips, stems):
        for fmt in args.format:
            ext = "png" if fmt == "mp4" and clip.shape[1] == 1 else fmt
            written.append(write_video(out / f"{stem}.{ext}", clip, fps=args.fps))
    write_contact_sheet(out / "contact_sheet.png", clips, prompts)
    t = pipe.last_timings
    expand = {} if args.expand is None else {"expand": args.expand, "expanded_prompts": prompts,
                                             "expansions": [e.to_dict() for e in expansions]}
    _write_metadata(out / "generate.json", {
        "prompts": list(args.prompt), **expand, "sizes": [list(c.shape[1:]) for c in clips], "seed": args.seed,
        "steps": args.steps, "guidance": args.guidance, **({} if args.guidance_2 is None else
                                                          {"guidance_2": args.guidance_2}),
        "solver": args.solver, "order": args.order,
        "cache": args.cache, "attention_window": args.attention_window, "files": [p.name for p in written],
        "evaluations": t["evaluations"], "seconds": {k: t[k] for k in ("text", "denoise", "decode") if k in t},
        **({} if not long else {"long": {"frames": args.frames, "window": args.window, "overlap": args.overlap,
                                         "schedule": args.schedule or "synchronous", "ar_step": args.ar_step}})})
    if long:
        lag = 1 if args.ar_step is None else args.ar_step
        stagger = f", staggered by {lag}" if args.schedule == "staggered" else ""
        print(f"text {t['text'] * 1e3:.0f} ms | denoise {t['denoise']:.2f} s (windows of {args.window} frames, "
              f"{args.steps} {args.solver} steps each{stagger}; DiT evaluations per video {t['evaluations']}) | "
              f"decode {t['decode'] * 1e3:.0f} ms")
    else:
        print(f"text {t['text'] * 1e3:.0f} ms | denoise {t['denoise']:.2f} s ({args.steps} {args.solver} steps, "
              f"{1e3 * t['denoise'] / args.steps:.0f} ms/step; DiT evaluations per video {t['evaluations']}) | "
              f"decode {t['decode'] * 1e3:.0f} ms")
    print(f"wrote {len(written)} files, contact_sheet.png and generate.json to {out}")
    return 0


def _write_metadata(path, meta: dict) -> None:
    """``meta`` as JSON at ``path``, written to a temporary file first and moved into place."""
    import json
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, path)


# --- calibrate-cache -------------------------------------------------------------------------------
def calibrate_pipeline_teacache(pipe, prompts: Sequence[str], size, *, steps: int = 20, guidance: float = 4.0,
                                solver: str = "euler", order=None, degree: int = 4, seed: int = 0) -> tuple:
    """TeaCache's rescaling polynomial for ``pipe``'s DiT, fitted on ``prompts`` at ``size`` (frames, height,
    width) with the sampling settings it will be used with (:func:`sora_fast.sampling.calibrate_teacache`)."""
    import torch

    from ..sampling import calibrate_teacache

    shape = pipe.latent_shape(size)
    dev = pipe.device
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)).to(dev) for i in range(len(prompts))]
    with torch.no_grad():
        text = pipe.text_encoder.encode(list(prompts)).to(dev)
        uncond = pipe.text_encoder.encode([""] * len(prompts)).to(dev) if guidance != 1.0 else None
    return calibrate_teacache(pipe.dit.eval(), noise, text, uncond_text=uncond, patch=pipe.dit.config.patch,
                              steps=steps, guidance=guidance, shift="auto", solver=solver, order=order, degree=degree)


def cmd_calibrate_cache(args) -> int:
    from ..data import prompts as held_out
    from ..pipeline import VideoPipeline

    _finite("--guidance", args.guidance)
    _check_solver_args(argparse.Namespace(solver=args.solver, order=args.order, cache=None))
    if args.prompts < 1 or args.steps < 3:
        raise ValueError(f"--prompts must be >= 1 and --steps >= 3, got {args.prompts} and {args.steps}")
    pipe = VideoPipeline.load(args.pipeline, verify=not args.no_verify)
    size = pipe.check_size(args.size or (9, 32, 32), name="--size")
    coef = calibrate_pipeline_teacache(pipe, held_out(args.prompts, seed=args.seed), size, steps=args.steps,
                                       guidance=args.guidance, solver=args.solver, order=args.order,
                                       degree=args.degree, seed=args.seed)
    print(f"TeaCache polynomial (highest degree first) fitted on {args.prompts} prompts x {args.steps} "
          f"{args.solver} steps: {', '.join(f'{c:.6g}' for c in coef)}")
    print("use: --cache teacache:0.1:" + ",".join(f"{c:.6g}" for c in coef))
    return 0
