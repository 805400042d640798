"""Inference latency of a pipeline configuration: where the time and the memory of ``generate`` go.

:func:`profile_pipeline` runs ``VideoPipeline.generate`` a few times on the same request:

1. ``warmup`` runs, not measured (first-call costs: allocator growth, kernel selection, lazy builds);
2. a timed run: seconds per stage (text encode, every denoising step, VAE decode), DiT throughput, and
   on a GPU the peak of ``torch.cuda.max_memory_allocated`` plus NVML telemetry sampled in a thread;
3. a run under ``torch.profiler`` (only if ``op_breakdown`` or ``trace``): the top ops by self time
   and an optional Chrome trace;
4. on the CPU, a run under :class:`sora_fast.tools.memory.PeakMemory` (peak live tensor bytes).

The instrumented runs are separate from the timed one so that neither the profiler's nor the memory
tracker's overhead is in the stage times. :func:`format_report` renders the result as a table.
"""
from __future__ import annotations

import platform
import threading
import time
from typing import Optional, Sequence

import torch

__all__ = ["PROFILE_PRESETS", "build_preset_pipeline", "default_size", "profile_pipeline", "format_report"]

PROFILE_PRESETS = ("tiny", "demo")  # DiT preset = VAE preset = this name; text width = the DiT's text_dim

_PROMPTS = ("a red circle moves to the right", "a blue square falls down", "a green triangle spins",
            "a yellow ball bounces", "two white dots drift apart", "a purple bar slides left")


def build_preset_pipeline(name: str, *, seed: int = 0):
    """A random-weight pipeline of a preset: DiT ``name``, VAE ``name``, TinyTextEncoder of the DiT's text width.

    The DiT's in/out channels are set to the VAE's latent channels. Latency does not depend on the weights,
    so no checkpoint is needed.
    """
    from .models.dit import DiTConfig, VideoDiT
    from .models.text import TinyTextEncoder
    from .models.vae import CausalVAE
    from .pipeline import VideoPipeline

    if name not in PROFILE_PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PROFILE_PRESETS)}; got {name!r}")
    torch.manual_seed(seed)
    vae = CausalVAE(name)
    c = vae.latent_channels
    dit = VideoDiT(DiTConfig.from_name(name, in_channels=c, out_channels=c))
    return VideoPipeline(dit, vae, TinyTextEncoder(dim=dit.config.text_dim))


def default_size(pipe) -> tuple[int, int, int]:
    """9x32x32 if the pipeline accepts it, else its smallest valid ``(frames, height, width)``."""
    try:
        return pipe.check_size((9, 32, 32))
    except ValueError:
        pt, ph, pw = pipe.dit.config.patch
        s = pipe.vae.spatial_factor
        return (1 + pipe.vae.temporal_factor * max(1, pt - 1), s * ph, s * pw)  # max(2, pt) latent frames


def _stats(xs: Sequence[float]) -> dict:
    return {"mean_s": sum(xs) / len(xs), "min_s": min(xs), "max_s": max(xs), "total_s": sum(xs), "count": len(xs)}


class _NvmlSampler:
    """NVML readings (clocks, power, memory, utilization) every ``interval`` seconds in a daemon thread."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.interval, self.samples, self.info = interval, [], {}
        self.unavailable: Optional[str] = None
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda":
            self.unavailable = f"the pipeline runs on {device.type}, not a CUDA GPU"
            return
        try:
            import pynvml
        except ImportError:
            self.unavailable = "pynvml not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            # NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber them, the PCI bus id does not
            props = torch.cuda.get_device_properties(device)
            if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
                bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
                self._h = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            else:
                self._h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            name = pynvml.nvmlDeviceGetName(self._h)
            self.info = {"name": name.decode() if isinstance(name, bytes) else name,
                         "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(self._h, pynvml.NVML_CLOCK_SM),
                         "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(self._h) / 1000,
                         "memory_total_mib": pynvml.nvmlDeviceGetMemoryInfo(self._h).total / 2**20}
        except Exception as e:  # NVML errors are its own exception classes
            self.unavailable = f"NVML failed: {e}"
        self._nvml = pynvml

    def _read(self) -> dict:
        n, h = self._nvml, self._h
        return {"sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                "mem_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
                "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000,
                "memory_used_mib": n.nvmlDeviceGetMemoryInfo(h).used / 2**20,
                "gpu_util_pct": n.nvmlDeviceGetUtilizationRates(h).gpu,
                "temperature_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)}

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception as e:
                self.unavailable = f"NVML read failed: {e}"
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.unavailable is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if self.unavailable is not None:
            return {"available": False, "reason": self.unavailable}
        out = {"available": True, **self.info, "samples": len(self.samples), "interval_s": self.interval}
        for key in (self.samples[0] if self.samples else {}):
            vals = [s[key] for s in self.samples]
            out[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        return out


def _op_table(prof, on_gpu: bool, top: int) -> dict:
    """Top ops by self time (device time on a GPU): name, calls, total ms, % of all ops' self time."""
    avgs = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    times = [(e, getattr(e, key, 0.0)) for e in avgs]
    total = sum(t for _, t in times)
    rows = sorted(times, key=lambda et: et[1], reverse=True)[:top]
    ops = [{"name": e.key, "calls": e.count, "total_ms": t / 1e3, "percent": 100 * t / total if total else 0.0}
           for e, t in rows if t > 0]
    return {"sorted_by": "self CUDA time" if on_gpu else "self CPU time", "total_ms": total / 1e3, "ops": ops}


def _environment(device: torch.device) -> dict:
    from ._version import __version__

    env = {"device": str(device), "torch": torch.__version__, "sora_fast": __version__,
           "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def profile_pipeline(pipe, *, prompts: Sequence[str], size: tuple[int, int, int], steps: int, guidance: float,
                     warmup: int = 1, trace: Optional[str] = None, op_breakdown: bool = True, top: int = 15,
                     seed: int = 0, solver: str = "euler", order: Optional[int] = None, cache=None) -> dict:
    """Latency, op breakdown, peak memory and throughput of ``pipe.generate(prompts, size, ...)``.

    Args:
        pipe: a :class:`~sora_fast.pipeline.VideoPipeline` (on the device to measure).
        prompts: B strings, all generated at ``size`` = ``(frames, height, width)``.
        steps, guidance: as in ``generate``; tokens/s counts both CFG copies when ``guidance != 1``.
        solver, order, cache: as in ``generate``; ``stages["evaluations"]`` lists the full DiT evaluations per
            prompt (CFG copies apart) of the timed run.
        warmup: runs before the measured one, excluded from every number.
        trace: a path for a Chrome trace (``chrome://tracing``, Perfetto) of the profiled run.
        op_breakdown: profile a run with ``torch.profiler`` and list the ``top`` ops by self time.
    Returns a JSON-serializable dict: ``config``, ``stages`` (seconds), ``throughput``, ``memory``,
    ``ops`` (or None), ``telemetry``, ``environment``, ``trace``.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be an int >= 1, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"--warmup must be an int >= 0, got {warmup!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"--top must be an int >= 1, got {top!r}")
    size = pipe.check_size(tuple(size) if isinstance(size, list) else size, name="--size")
    from .sampling import check_solver, parse_cache

    check_solver(solver, order)
    parse_cache(cache)
    gen = dict(steps=steps, guidance=guidance, seed=seed, solver=solver, order=order, cache=cache)
    prompts, dev = list(prompts), pipe.device
    on_gpu = dev.type == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize(dev)

    def run():
        if not on_gpu:
            pipe.generate(prompts, size, **gen)
            return dict(pipe.last_timings)
        # Kernels run asynchronously: the pipeline's own step clock would time launches. Synchronize at the
        # first DiT call and after every step, and time the steps between those points instead.
        marks = []

        def first_call(*_):
            if not marks:
                sync()
                marks.append(time.perf_counter())

        def step_done(*_):
            sync()
            marks.append(time.perf_counter())

        hook = pipe.dit.register_forward_pre_hook(first_call)
        try:
            pipe.generate(prompts, size, progress=step_done, **gen)
        finally:
            hook.remove()
        t = dict(pipe.last_timings)
        t["steps"] = [b - a for a, b in zip(marks, marks[1:])]
        return t

    for _ in range(warmup):
        run()

    # --- timed run --------------------------------------------------------------------------------
    if on_gpu:
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    with _NvmlSampler(dev) as nvml:
        t0 = time.perf_counter()
        t = run()
        wall = time.perf_counter() - t0
    stages = {"text_s": t["text"], "denoise_s": t["denoise"], "steps": _stats(t["steps"]),
              "step_times_s": list(t["steps"]), "decode_s": t["decode"], "total_s": wall,
              "evaluations": list(t.get("evaluations", []))}

    c, lt, lh, lw = pipe.latent_shape(size)
    pt, ph, pw = pipe.dit.config.patch
    latent_tokens = (lt // pt) * (lh // ph) * (lw // pw) * len(prompts)
    cfg_copies = 2 if guidance != 1.0 else 1
    frames = size[0] * len(prompts)
    throughput = {"latent_tokens": latent_tokens, "cfg_copies": cfg_copies,
                  "dit_tokens_per_s": latent_tokens * cfg_copies * steps / t["denoise"],
                  "frames_per_s": frames / wall, "videos_per_s": len(prompts) / wall,
                  "ms_per_step": 1e3 * t["denoise"] / steps}

    weights = sum(p.numel() * p.element_size() for p in pipe.parameters())
    weights += sum(b.numel() * b.element_size() for b in pipe.buffers())
    memory = {"weights_bytes": weights}
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(dev)
        memory.update(method="torch.cuda.max_memory_allocated", peak_bytes=peak, peak_above_start_bytes=peak - base)

    # --- profiled run -----------------------------------------------------------------------------
    ops = None
    if op_breakdown or trace:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=acts) as prof:
            run()
        if op_breakdown:
            ops = _op_table(prof, on_gpu, top)
        if trace:
            prof.export_chrome_trace(str(trace))

    # --- memory run (CPU) --------------------------------------------------------------------------
    if not on_gpu:
        from .tools.memory import PeakMemory

        with PeakMemory(exclude=[*pipe.parameters(), *pipe.buffers()]) as mem:
            run()
        memory.update(method="PeakMemory (live tensor storage, weights excluded)", peak_bytes=mem.peak)

    return {"config": {"prompts": len(prompts), "size": list(size), "steps": steps, "guidance": guidance,
                       "solver": solver, "order": order, "cache": None if cache is None else str(cache),
                       "warmup_runs": warmup, "seed": seed,
                       "latent_shape": [c, lt, lh, lw], "dit": _short_config(pipe.dit.config)},
            "stages": stages, "throughput": throughput, "memory": memory, "ops": ops,
            "telemetry": nvml.summary(), "environment": _environment(dev),
            "trace": str(trace) if trace else None}


def _short_config(cfg) -> dict:
    return {"dim": cfg.dim, "layers": cfg.num_layers, "heads": cfg.num_heads, "patch": list(cfg.patch)}


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(r: dict, top: Optional[int] = None) -> str:
    """A readable table of a :func:`profile_pipeline` result (``top`` ops at most)."""
    cfg, st, tp, mem, env = r["config"], r["stages"], r["throughput"], r["memory"], r["environment"]
    t, h, w = cfg["size"]
    d = cfg["dit"]
    lines = [f"profile: {cfg['prompts']} prompt(s) at {t}x{h}x{w}, {cfg['steps']} steps, guidance {cfg['guidance']}"
             f" | DiT dim {d['dim']} x {d['layers']} layers, patch {'x'.join(map(str, d['patch']))}"
             f" | latent {'x'.join(map(str, cfg['latent_shape']))}",
             f"{cfg['warmup_runs']} warm-up run(s) excluded; times from one measured run "
             f"(profiler and memory tracker ran separately)", ""]
    s = st["steps"]
    rows = [("text encode", st["text_s"], ""),
            ("denoise", st["denoise_s"], f"{s['count']} steps ({cfg.get('solver', 'euler')}): mean "
                                         f"{1e3 * s['mean_s']:.2f} / min {1e3 * s['min_s']:.2f} / max "
                                         f"{1e3 * s['max_s']:.2f} ms; DiT evaluations per prompt "
                                         f"{st.get('evaluations', [])}"),
            ("VAE decode", st["decode_s"], ""),
            ("total", st["total_s"], "end to end, as the caller sees it")]
    lines.append(f"{'stage':<14}{'ms':>10}{'%':>7}  detail")
    for name, sec, note in rows:
        lines.append(f"{name:<14}{1e3 * sec:>10.2f}{100 * sec / st['total_s']:>7.1f}  {note}".rstrip())
    lines += ["", f"throughput: {tp['dit_tokens_per_s']:,.0f} DiT tokens/s ({tp['latent_tokens']} latent tokens x "
                  f"{tp['cfg_copies']} CFG x {cfg['steps']} steps / denoise), {tp['frames_per_s']:.2f} frames/s, "
                  f"{tp['ms_per_step']:.2f} ms/step"]
    peak = mem.get("peak_bytes")
    lines.append(f"memory: peak {_mib(peak) if peak is not None else 'n/a'} ({mem.get('method', 'not measured')}); "
                 f"weights {_mib(mem['weights_bytes'])}")
    ops = r.get("ops")
    if ops:
        shown = ops["ops"][:top] if top else ops["ops"]
        lines += ["", f"top {len(shown)} ops by {ops['sorted_by']} (all ops: {ops['total_ms']:.1f} ms, profiled run)",
                  f"{'op':<44}{'calls':>7}{'ms':>10}{'%':>7}"]
        for o in shown:
            name = o["name"] if len(o["name"]) <= 43 else o["name"][:40] + "..."
            lines.append(f"{name:<44}{o['calls']:>7}{o['total_ms']:>10.2f}{o['percent']:>7.1f}")
    tel = r["telemetry"]
    lines.append("")
    if not tel["available"]:
        lines.append(f"telemetry: unavailable ({tel['reason']})")
    else:
        def rng(k, unit):
            v = tel.get(k)
            return f"{v['mean']:.0f} {unit} (min {v['min']:.0f}, max {v['max']:.0f})" if v else "n/a"
        lines.append(f"telemetry: {tel['name']}, {tel['samples']} samples: SM clock {rng('sm_clock_mhz', 'MHz')} of "
                     f"{tel['max_sm_clock_mhz']}, power {rng('power_w', 'W')} of {tel['power_limit_w']:.0f}, "
                     f"memory used {rng('memory_used_mib', 'MiB')}, util {rng('gpu_util_pct', '%')}")
    dev = env.get("gpu") or env.get("cpu")
    lines.append(f"environment: {env['device']} ({dev}), {env['cpu_threads']} CPU threads, torch {env['torch']}, "
                 f"sora_fast {env['sora_fast']}, python {env['python']}")
    if r.get("trace"):
        lines.append(f"chrome trace: {r['trace']}")
    return "\n".join(lines)
