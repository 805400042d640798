"""A diffusers WanPipeline with Wan's default scheduler, UniPC on flow sigmas, generates on sora_fast what diffusers'
WanPipeline.__call__ does (its levels, integer timesteps, order warm-up and last step), from the API and the CLI;
UniPC options sora_fast does not reproduce are refused by name."""
import json
import re
import shutil
import warnings

import pytest
import torch
from _diffusers_utils import assert_wan_parity, tiny_wan_pipeline, wan_unipc
from diffusers import UniPCMultistepScheduler

from sora_fast import cli
from sora_fast.integrations.diffusers.wan_pipeline import scheduler_settings
from sora_fast.pipeline import VideoPipeline
from sora_fast.sampling import schedule_sigmas, schedule_timesteps

PROMPT, NEG, SIZE, GUIDANCE = "a red ball rolls left", "blue cube", (9, 32, 48), 4.5
UNIPC = {"kind": "diffusers_flow_unipc", "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def unipc_pipe():
    """A tiny random one-transformer WanPipeline with UniPC (flow_shift 3, diffusers' default solver_order 2)."""
    pipe = tiny_wan_pipeline(two_experts=False)
    pipe.scheduler = wan_unipc()
    return pipe


def _saved(pipe, tmp_path, **options):
    if options:
        pipe.scheduler = wan_unipc(**options)
    d = tmp_path / "wan"
    shutil.rmtree(d, ignore_errors=True)
    pipe.save_pretrained(d)
    return d


@pytest.mark.parametrize("steps, shift, t", [(1, 3.0, 1000), (2, 3.0, 1000), (5, 5.0, 1000), (8, 1.0, 1000),
                                             (30, 12.0, 1000), (7, 3.0, 800)])
def test_schedule_is_diffusers_unipc(steps, shift, t):
    """Levels and the timesteps the model sees, exactly as UniPCMultistepScheduler.set_timesteps sets them."""
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                  num_train_timesteps=t)
    sch.set_timesteps(steps)
    schedule = {**UNIPC, "num_train_timesteps": t}
    assert torch.equal(schedule_sigmas(steps, shift, schedule), sch.sigmas.double())
    assert torch.equal(schedule_timesteps(steps, shift, schedule), sch.timesteps.double())
    assert schedule_timesteps(steps, shift, None) is None


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [2, 5, 8])
def test_generation_equals_diffusers_unipc(unipc_pipe, tmp_path, order, steps):
    """from_diffusers(dir).generate() with the defaults it records == WanPipeline.__call__ (fp32 rule, fp64 ref)."""
    d = _saved(unipc_pipe, tmp_path, solver_order=order)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = VideoPipeline.from_diffusers(d)
    assert not [w for w in caught if "UniPC" in str(w.message)]
    assert ours.sampling == {"solver": "unipc", "order": order, "shift": 3.0, "schedule": UNIPC}
    assert ours.solver_settings() == ("unipc", order)
    seed = int(torch.randint(0, 2**31, ()))
    video = ours.generate([PROMPT], SIZE, steps=steps, guidance=GUIDANCE, negative_prompt=NEG, seed=seed)[0]
    noise = torch.randn(ours.latent_shape(SIZE), generator=torch.Generator().manual_seed(seed))
    assert_wan_parity(video, unipc_pipe, noise, SIZE, prompt=PROMPT, negative_prompt=NEG, num_inference_steps=steps,
                      guidance_scale=GUIDANCE)


def test_pipeline_object_and_saved_copy_generate_the_same(unipc_pipe, tmp_path):
    d = _saved(unipc_pipe, tmp_path, solver_order=2)
    from_dir, from_obj = VideoPipeline.from_diffusers(d), VideoPipeline.from_diffusers(unipc_pipe)
    assert from_obj.sampling == from_dir.sampling
    kw = dict(steps=3, guidance=GUIDANCE, seed=5)
    ref = from_dir.generate([PROMPT, ""], [SIZE, (1, 16, 32)], **kw)
    assert all(torch.equal(a, b) for a, b in zip(from_obj.generate([PROMPT, ""], [SIZE, (1, 16, 32)], **kw), ref))
    from_dir.save(tmp_path / "saved")
    back = VideoPipeline.load(tmp_path / "saved")
    assert back.sampling == from_dir.sampling
    assert all(torch.equal(a, b) for a, b in zip(back.generate([PROMPT, ""], [SIZE, (1, 16, 32)], **kw), ref))
    # an explicit solver still wins; its own default order, not the scheduler's
    assert back.solver_settings("euler") == ("euler", None) and back.solver_settings("unipc", 3) == ("unipc", 3)


@pytest.mark.parametrize("option, value", [
    ("solver_type", "bh1"), ("lower_order_final", False), ("final_sigmas_type", "sigma_min"), ("predict_x0", False),
    ("thresholding", True), ("use_karras_sigmas", True), ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
    ("use_dynamic_shifting", True), ("shift_terminal", 0.1), ("disable_corrector", [0]), ("use_flow_sigmas", False),
    ("prediction_type", "epsilon"), ("solver_order", 4), ("solver_order", 0)])
def test_unreproduced_unipc_options_are_refused(option, value):
    config = {**dict(wan_unipc().config), option: value}
    with pytest.raises(ValueError, match=re.escape(f"sched: UniPCMultistepScheduler option {option}={value!r}; "
                                                   f"sora_fast reproduces {option}")):
        scheduler_settings("UniPCMultistepScheduler", config, "sched")


def test_refused_from_a_directory(unipc_pipe, tmp_path):
    d = _saved(unipc_pipe, tmp_path)
    path = d / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "solver_type": "bh1"}))
    with pytest.raises(ValueError, match=r"scheduler: UniPCMultistepScheduler option solver_type='bh1'; sora_fast "
                                         r"reproduces solver_type='bh2'"):
        VideoPipeline.from_diffusers(d)


def test_cli_generates_with_the_directorys_unipc(unipc_pipe, tmp_path, capsys):
    """``sora-fast generate --pipeline DIR`` runs diffusers' UniPC by default: the API's video (itself diffusers'
    video, above), its solver and order in generate.json."""
    from sora_fast.data import write_video

    d = _saved(unipc_pipe, tmp_path, solver_order=3)
    out = tmp_path / "gen"
    assert cli.main(["generate", "--pipeline", str(d), "--prompt", PROMPT, "--size", "5x16x32", "--steps", "4",
                     "--seed", "7", "--format", "gif", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "4 unipc steps" in capsys.readouterr().out
    ref = VideoPipeline.from_diffusers(d).generate([PROMPT], (5, 16, 32), steps=4, guidance=4.0, seed=7)[0]
    (gif,) = out.glob("*.gif")
    assert gif.read_bytes() == write_video(tmp_path / "ref.gif", ref).read_bytes()
    meta = json.loads((out / "generate.json").read_text())
    assert (meta["solver"], meta["order"]) == ("unipc", 3)
    # the pipeline's solver is only a default: an explicit one runs instead, its order checked once it is known
    assert cli.main(["generate", "--pipeline", str(d), "--prompt", PROMPT, "--size", "1x16x32", "--steps", "2",
                     "--solver", "euler", "--format", "gif", "--out", str(out)]) == 0
    assert json.loads((out / "generate.json").read_text())["solver"] == "euler"
    assert cli.main(["generate", "--pipeline", str(d), "--prompt", PROMPT, "--order", "4", "--out", str(out)]) == 2
    assert "--order/--solver: order must be in 1..3 (unipc 1-3, dpm++ 1-2, euler 1), got 4" in capsys.readouterr().err
