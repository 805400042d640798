"""A diffusers Wan text-to-video pipeline -> :class:`sora_fast.pipeline.VideoPipeline`, from a directory as it is
distributed (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; Wan 2.2 A14B adds ``transformer_2/``, its low-noise expert, and ``boundary_ratio``) or from a
``WanPipeline`` object.

Nothing is copied twice. From a directory the transformer's and the VAE's safetensors files are read tensor by
tensor, each cast and converted as it is read and taken as the model's own (``assign``) on a model built on the
meta device: the peak is the converted model plus one tensor. From a ``WanPipeline`` object the models *share*
diffusers' storage (a cast to another dtype or a move to another device copies). Neither diffusers nor
accelerate is needed for a directory (safetensors and, for the umT5 encoder, transformers).

Everything that can be checked from the JSON files is checked before any weight is read: the pipeline class,
each component's presence and class, the text encoder's width against the transformer's ``text_dim``, the
VAE's latent channels against the transformer's, the second expert's config against the first's and its
``boundary_ratio``, the scheduler's options.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch

from ..._files import CorruptFileError, read_json

__all__ = ["is_diffusers_pipeline_dir", "load_wan_pipeline", "scheduler_settings", "WAN_COMPONENTS"]

PIPELINE_CLASSES = ("WanPipeline",)
WAN_COMPONENTS = {  # component -> the classes sora_fast reads (None: any)
    "transformer": ("WanTransformer3DModel",),
    "vae": ("AutoencoderKLWan",),
    "text_encoder": ("UMT5EncoderModel", "T5EncoderModel"),
    "tokenizer": None,
    "scheduler": ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"),
}
# diffusers' WanTransformer3DModel._keep_in_fp32_modules: these stay fp32 whatever ``dtype`` says, as in diffusers
_KEEP_FP32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
_EULER_UNSUPPORTED = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                      "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
# UniPCMultistepScheduler options -> the value sora_fast reproduces (the others do not change a flow-sigma run:
# the betas, timestep_spacing and steps_offset are overwritten by the flow levels). solver_type "bh1" is refused:
# diffusers' bh1 computes B(h)·0 with B(h) = -inf on the last step to σ = 0 and returns NaN.
_UNIPC_REPRODUCED = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "predict_x0": True,
                     "solver_type": "bh2", "lower_order_final": True, "final_sigmas_type": "zero",
                     "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                     "use_beta_sigmas": False, "use_dynamic_shifting": False, "shift_terminal": None,
                     "disable_corrector": [], "solver_p": None}


def is_diffusers_pipeline_dir(path) -> bool:
    """Whether ``path`` is a directory holding a diffusers pipeline (``model_index.json``)."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "model_index.json").is_file()


def _model_index(d: Path) -> dict:
    """``model_index.json`` checked: a Wan text-to-video pipeline with every component sora_fast reads."""
    index = read_json(d / "model_index.json", "a diffusers pipeline index (_class_name and its components)")
    if not isinstance(index, dict):
        raise ValueError(f"{str(d / 'model_index.json')!r} must be a JSON object, got {type(index).__name__}")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ValueError(f"{str(d)!r} holds a diffusers {cls!r}, expected a Wan text-to-video pipeline "
                         f"({', '.join(PIPELINE_CLASSES)}: Wan 2.1 / 2.2 T2V)")
    for name, classes in WAN_COMPONENTS.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise ValueError(f"{str(d)!r}: model_index.json has no {name!r} component (found {entry!r}), expected "
                             f"[library, class]" + (f" with class {' or '.join(classes)}" if classes else ""))
        if classes is not None and entry[1] not in classes:
            raise ValueError(f"{str(d)!r}: component {name!r} is a {entry[1]}, expected {' or '.join(classes)}")
        if not (d / name).is_dir():
            raise FileNotFoundError(f"{str(d)!r}: the {name!r} component ({entry[1]}) is missing: expected the "
                                    f"directory {str(d / name)!r}")
    second = index.get("transformer_2")
    if second not in (None, [None, None]):
        if not (isinstance(second, list) and len(second) == 2 and second[1] in WAN_COMPONENTS["transformer"]):
            raise ValueError(f"{str(d)!r}: component 'transformer_2' is {second!r}, expected [library, "
                             f"{WAN_COMPONENTS['transformer'][0]!r}] (Wan 2.2 A14B's low-noise expert)")
        if not (d / "transformer_2").is_dir():
            raise FileNotFoundError(f"{str(d)!r}: the 'transformer_2' component ({second[1]}) is missing: expected "
                                    f"the directory {str(d / 'transformer_2')!r}")
    _boundary_ratio(second not in (None, [None, None]), index.get("boundary_ratio"), str(d / "model_index.json"))
    return index


def _boundary_ratio(two: bool, ratio, where: str) -> Optional[float]:
    """``boundary_ratio`` checked against the presence of a second expert: a number in [0, 1] with one, None
    without (diffusers would ignore a transformer_2 without it, and fail at the boundary without transformer_2)."""
    if not two:
        if ratio is not None:
            raise ValueError(f"{where}: boundary_ratio={ratio!r} but no transformer_2 (the low-noise expert it "
                             "switches to); expected boundary_ratio None for one transformer")
        return None
    if ratio is None:
        raise ValueError(f"{where}: transformer_2 (Wan 2.2 A14B's low-noise expert) without boundary_ratio (the "
                         "fraction of num_train_timesteps below which it runs); expected a number in [0, 1], got None")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{where}: boundary_ratio must be a number in [0, 1] with transformer_2, got {ratio!r}")
    return float(ratio)


def _check_experts_configs(first: Mapping, second: Mapping, where: str) -> None:
    """The two experts must share one architecture (sora_fast runs both on one config)."""
    keys = sorted(k for k in set(first) | set(second) if not k.startswith("_"))      # not _class_name, ...
    diff = [k for k in keys if first.get(k) != second.get(k)]
    if diff:
        raise ValueError(f"{where}: mismatched experts: transformer_2's config differs from transformer's in "
                         + ", ".join(f"{k} (transformer: {first.get(k)!r}, transformer_2: {second.get(k)!r})"
                                     for k in diff) + "; expected the same architecture")


def scheduler_settings(class_name: str, config: Mapping, where: str = "scheduler") -> dict:
    """A diffusers scheduler (class name + config) -> ``VideoPipeline.sampling``: ``solver``, ``shift`` and
    ``schedule`` (:func:`sora_fast.sampling.schedule_sigmas`), and for UniPC its ``order``. Options sora_fast does
    not reproduce are errors naming the option, what it reproduces and what was found.

    ``FlowMatchEulerDiscreteScheduler``: flow Euler on its levels. ``UniPCMultistepScheduler`` (Wan's default:
    flow sigmas, flow prediction, ``flow_shift``): sora_fast's UniPC (bh2, data prediction, ``solver_order`` 1-3,
    lower order on the last step, to σ = 0) on its levels, the model seeing its integer timesteps."""
    cfg = dict(config)
    t = int(cfg.get("num_train_timesteps", 1000))
    if class_name == "FlowMatchEulerDiscreteScheduler":
        on = [k for k in _EULER_UNSUPPORTED if cfg.get(k)]
        if on:
            raise ValueError(f"{where}: FlowMatchEulerDiscreteScheduler options {', '.join(on)} are set; sora_fast "
                             f"reproduces the plain shifted schedule only (expected them off)")
        return {"solver": "euler", "shift": float(cfg.get("shift", 1.0)),
                "schedule": {"kind": "diffusers_flow_euler", "num_train_timesteps": t}}
    if class_name == "UniPCMultistepScheduler":
        from ...sampling import MAX_ORDER

        defaults = {"use_flow_sigmas": False, "prediction_type": "epsilon", "predict_x0": True, "solver_type": "bh2",
                    "lower_order_final": True, "final_sigmas_type": "zero", "disable_corrector": []}
        for key, want in _UNIPC_REPRODUCED.items():
            got = cfg.get(key, defaults.get(key, want))
            if got != want and not (want in (None, False, []) and not got):
                raise ValueError(f"{where}: UniPCMultistepScheduler option {key}={got!r}; sora_fast reproduces "
                                 f"{key}={want!r} (a flow-matching Wan UniPC: use_flow_sigmas=True, prediction_type="
                                 "'flow_prediction', bh2, lower order on the last step to sigma 0)")
        order = cfg.get("solver_order", 2)
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER["unipc"]:
            raise ValueError(f"{where}: UniPCMultistepScheduler option solver_order={order!r}; sora_fast reproduces "
                             f"solver_order 1..{MAX_ORDER['unipc']}")
        shift = cfg.get("flow_shift", 1.0)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"{where}: UniPCMultistepScheduler option flow_shift={shift!r}; expected a positive "
                             "number")
        return {"solver": "unipc", "order": order, "shift": float(shift),
                "schedule": {"kind": "diffusers_flow_unipc", "num_train_timesteps": t}}
    raise ValueError(f"{where}: scheduler {class_name!r}, expected one of {', '.join(WAN_COMPONENTS['scheduler'])}")


def _boundary(ratio: float, scheduler_config: Mapping) -> float:
    """The timestep where the second expert takes over: diffusers' ``boundary_ratio · num_train_timesteps``."""
    return float(ratio) * int(scheduler_config.get("num_train_timesteps", 1000))


def _caster(dtype: Optional[torch.dtype], keep_fp32: bool) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        if dtype is None or not t.is_floating_point():
            return t
        if keep_fp32 and any(p in _KEEP_FP32 for p in name.split(".")):
            return t.float()
        return t.to(dtype)
    return cast


class _LazyTensors(Mapping):
    """The tensors of some safetensors files, each read (and cast) only when iterated or looked up."""

    def __init__(self, files: list[Path], cast, device: str, what: str):
        from safetensors import safe_open

        self._open, self._cast, self._device, self._what = safe_open, cast, device, what
        self._where: dict[str, Path] = {}
        for f in files:
            for k in self._handle(f).keys():
                self._where[k] = f

    def _handle(self, f: Path):
        if not f.is_file():
            raise FileNotFoundError(f"{str(f)!r} is missing: expected {self._what}")
        try:
            return self._open(str(f), framework="pt", device=self._device)
        except Exception as e:  # SafetensorError for a truncated or foreign file
            raise CorruptFileError(f"{str(f)!r} is not a readable safetensors file ({type(e).__name__}: "
                                   f"{str(e).strip()[:200]}): expected {self._what}") from e

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._cast(key, self._handle(self._where[key]).get_tensor(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def items(self):  # one open per file, tensors one at a time
        by_file: dict[Path, list[str]] = {}
        for k, f in self._where.items():
            by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            h = self._handle(f)
            for k in keys:
                yield k, self._cast(k, h.get_tensor(k))


def _weight_files(d: Path, stem: str) -> list[Path]:
    index = d / f"{stem}.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "a safetensors index with a 'weight_map' of tensor -> file")
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict):
            raise ValueError(f"{str(index)!r} has no 'weight_map' object (tensor name -> file)")
        return [d / f for f in sorted(set(wm.values()))]
    if (d / f"{stem}.safetensors").is_file():
        return [d / f"{stem}.safetensors"]
    raise FileNotFoundError(f"{str(d)!r} holds no {stem}.safetensors (or sharded {stem}-*.safetensors with an "
                            "index): sora_fast reads safetensors weights only")


def _assigned(build: Callable[[], torch.nn.Module], sd: Mapping[str, torch.Tensor], source: str):
    from ...models._convert import load_converted

    with torch.device("meta"):
        model = build()                                  # no memory, no init: every tensor is assigned below
    load_converted(model, sd, source, assign=True)
    return model.eval()


def _check_widths(tcfg: Mapping, vcfg: Mapping, text_dim: int, where: str) -> None:
    if tcfg.get("text_dim", 4096) != text_dim:
        raise ValueError(f"{where}: mismatched text encoder: its width (d_model) is {text_dim}, the transformer's "
                         f"text_dim is {tcfg.get('text_dim', 4096)}; expected them equal")
    z = vcfg.get("z_dim", 16)
    for key in ("in_channels", "out_channels"):
        if tcfg.get(key) not in (None, z):
            raise ValueError(f"{where}: the transformer's {key}={tcfg.get(key)} differs from the VAE's latent "
                             f"channels z_dim={z}; expected them equal")


def _from_dir(d: Path, dtype, vae_dtype, device, max_length: int):
    from ...models.convert import convert_wan_transformer_state_dict, convert_wan_vae_state_dict
    from ...models.dit import DiTConfig, VideoDiT
    from ...models.text import T5TextEncoder
    from ...models.vae import CausalVAE, VAEConfig
    from ...pipeline import VideoPipeline

    index = _model_index(d)
    tcfg = read_json(d / "transformer" / "config.json", "a WanTransformer3DModel config")
    two = index.get("transformer_2") not in (None, [None, None])
    if two:
        _check_experts_configs(tcfg, read_json(d / "transformer_2" / "config.json", "a WanTransformer3DModel config"),
                               str(d))
    vcfg = read_json(d / "vae" / "config.json", "an AutoencoderKLWan config")
    ecfg = read_json(d / "text_encoder" / "config.json", "a T5 / umT5 encoder config")
    scfg = read_json(d / "scheduler" / "scheduler_config.json", "a scheduler config")
    if ecfg.get("model_type") not in ("t5", "umt5"):
        raise ValueError(f"{str(d / 'text_encoder')!r}: mismatched text encoder: model_type "
                         f"{ecfg.get('model_type')!r}, expected 'umt5' (Wan's umT5) or 't5'")
    _check_widths(tcfg, vcfg, ecfg.get("d_model"), str(d))
    dit_config = DiTConfig.from_diffusers_config(tcfg)          # I2V / image fields refused by name here
    vae_config = VAEConfig.from_diffusers_config(vcfg)          # Wan 2.1, or TI2V-5B's residual VAE; bad options named
    sampling = scheduler_settings(index["scheduler"][1], scfg, str(d / "scheduler"))
    boundary = _boundary(index.get("boundary_ratio"), scfg) if two else None
    dev = "cpu" if device is None else str(torch.device(device))

    def dit_from(tdir: Path):
        raw = _LazyTensors(_weight_files(tdir, "diffusion_pytorch_model"), _caster(dtype, True), dev,
                           "WanTransformer3DModel weights")
        return _assigned(lambda: VideoDiT(dit_config), convert_wan_transformer_state_dict(raw, dit_config),
                         f"diffusers WanTransformer3DModel in {tdir}")

    dit = dit_from(d / "transformer")
    dit_2 = dit_from(d / "transformer_2") if two else None
    vdir = d / "vae"
    raw = _LazyTensors(_weight_files(vdir, "diffusion_pytorch_model"), _caster(vae_dtype, False), dev,
                       "AutoencoderKLWan weights")
    vae = _assigned(lambda: CausalVAE(vae_config), convert_wan_vae_state_dict(raw, vae_config),
                    f"diffusers AutoencoderKLWan in {vdir}")
    text = T5TextEncoder(os.path.abspath(d / "text_encoder"), tokenizer_path=os.path.abspath(d / "tokenizer"),
                         max_length=max_length,
                         pad_to=max_length, dtype=dtype or "auto", device=device)
    return VideoPipeline(dit, vae, text, sampling=sampling, dit_2=dit_2, boundary=boundary)


def _from_object(pipe, dtype, vae_dtype, device, max_length: int):
    from ...models.convert import convert_wan_transformer_state_dict, convert_wan_vae_state_dict
    from ...models.dit import DiTConfig, VideoDiT
    from ...models.text import T5TextEncoder
    from ...models.vae import CausalVAE, VAEConfig
    from ...pipeline import VideoPipeline

    name = type(pipe).__name__
    if name not in PIPELINE_CLASSES:
        raise TypeError(f"path_or_pipeline must be a Wan pipeline directory or a {' / '.join(PIPELINE_CLASSES)}, got "
                        f"a {name}")
    tr_2 = getattr(pipe, "transformer_2", None)
    ratio = _boundary_ratio(tr_2 is not None, pipe.config.get("boundary_ratio"), f"the {name}")
    if tr_2 is not None:
        if type(tr_2).__name__ not in WAN_COMPONENTS["transformer"]:
            raise ValueError(f"the {name}'s 'transformer_2' is a {type(tr_2).__name__}, expected "
                             f"{WAN_COMPONENTS['transformer'][0]}")
        _check_experts_configs(pipe.transformer.config, tr_2.config, f"the {name}")
    for comp, classes in WAN_COMPONENTS.items():
        obj = getattr(pipe, comp, None)
        if obj is None:
            raise ValueError(f"the {name} has no {comp!r} component, expected "
                             + (" or ".join(classes) if classes else "a tokenizer"))
        if classes is not None and type(obj).__name__ not in classes:
            raise ValueError(f"the {name}'s {comp!r} is a {type(obj).__name__}, expected {' or '.join(classes)}")
    tr, vae_d = pipe.transformer, pipe.vae
    _check_widths(tr.config, vae_d.config, pipe.text_encoder.config.d_model, f"the {name}")
    dit_config = DiTConfig.from_diffusers_config(tr.config)
    vae_config = VAEConfig.from_diffusers_config(vae_d.config)
    sampling = scheduler_settings(type(pipe.scheduler).__name__, pipe.scheduler.config, f"the {name}'s scheduler")

    def shared(sd, cast):  # diffusers' own tensors (views), cast / moved only where asked
        return {k: (cast(k, v) if device is None else cast(k, v).to(device)) for k, v in sd.items()}

    def dit_from(model, what: str):
        return _assigned(lambda: VideoDiT(dit_config),
                         convert_wan_transformer_state_dict(shared(model.state_dict(), _caster(dtype, True)),
                                                            dit_config), f"the {name}'s {what}")

    dit = dit_from(tr, "WanTransformer3DModel")
    dit_2 = None if tr_2 is None else dit_from(tr_2, "transformer_2 (WanTransformer3DModel)")
    boundary = None if tr_2 is None else _boundary(ratio, pipe.scheduler.config)
    vae = _assigned(lambda: CausalVAE(vae_config),
                    convert_wan_vae_state_dict(shared(vae_d.state_dict(), _caster(vae_dtype, False)), vae_config),
                    f"the {name}'s AutoencoderKLWan")
    enc = pipe.text_encoder
    if dtype is not None or device is not None:
        enc = enc.to(dtype=dtype, device=device)
    text = T5TextEncoder.from_model(enc, pipe.tokenizer, max_length=max_length, pad_to=max_length)
    return VideoPipeline(dit, vae, text, sampling=sampling, dit_2=dit_2, boundary=boundary)


def load_wan_pipeline(path_or_pipeline, *, dtype: Optional[torch.dtype] = None,
                      vae_dtype: Optional[torch.dtype] = torch.float32, device=None, max_length: int = 512):
    """See :meth:`sora_fast.pipeline.VideoPipeline.from_diffusers`."""
    for arg, v in (("dtype", dtype), ("vae_dtype", vae_dtype)):
        if v is not None and not (isinstance(v, torch.dtype) and v.is_floating_point):
            raise TypeError(f"{arg} must be None or a floating torch.dtype, got {v!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if isinstance(path_or_pipeline, (str, os.PathLike)):
        d = Path(path_or_pipeline)
        if not d.is_dir():
            raise FileNotFoundError(f"path_or_pipeline {str(d)!r} is not a directory: expected a diffusers Wan "
                                    "pipeline directory (model_index.json, transformer/, vae/, text_encoder/, "
                                    "tokenizer/, scheduler/)")
        if not is_diffusers_pipeline_dir(d):
            found = ", ".join(sorted(p.name for p in d.iterdir())[:12]) or "nothing"
            raise ValueError(f"{str(d)!r} is not a diffusers pipeline directory: expected model_index.json, found "
                             f"{found}")
        return _from_dir(d, dtype, vae_dtype, device, max_length)
    return _from_object(path_or_pipeline, dtype, vae_dtype, device, max_length)

