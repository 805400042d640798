"""sora_fast.distributed on CPU: 2 gloo processes spawned by the test against single-process references.

One spawned run (process start-up dominates on CPU) holds every 2-rank check; each rank writes its results
to a file and the assertions run here, against the same computation in this single process:
  * Ulysses sequence parallel forward and backward of a fp64 DiT (windows, fused RoPE, uneven shards
    cutting through videos, a 1-token video, an empty caption) == one process;
  * FSDP2 training, mesh (dp=1, sp=2) and (dp=2, sp=1): the losses of the single-process Trainer, also
    with a conditioning mix (given frames, per-frame levels, images in the same batches);
  * a sharded checkpoint written at world size 2 resumes at world size 1 onto the same loss curve;
  * CFG-parallel and sequence-parallel sampling == single-process sample_euler for the same seed, also with
    given frames (per-frame timesteps) and edits joining the pack mid-way; the CFG-parallel denoiser's forward
    with per-video and per-frame timesteps == the DiT's in one process; `sora-fast generate --cfg-parallel`
    under torchrun writes the single process's videos, plain, conditioned and long;
  * bad input (heads not divisible, mismatched meshes, a checkpoint of another model) raises the same clear
    error on every rank and nothing hangs: the process group's timeout bounds every collective, and the
    spawned run as a whole is killed (and the test failed) after a deadline.
"""
import contextlib
import math
import os
import random
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sora_fast.distributed import (
    CFGParallelDenoiser,
    DistributedTrainer,
    ParallelMesh,
    enable_sequence_parallel,
    init_distributed,
    make_denoiser,
    make_mesh,
    sequence_parallel_forward,
)
from sora_fast.models._convert import StateDictMismatchError
from sora_fast.models.dit import DiTConfig, VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.packing import pack_sequences, pack_videos
from sora_fast.sampling import sample_euler
from sora_fast.training.trainer import TrainConfig, Trainer

WORLD = 2
DEADLINE_S = 240          # the whole spawned run; a hang fails the test instead of blocking CI
COLLECTIVE_TIMEOUT_S = 60

SHAPES = [(4, 1, 4, 6), (4, 3, 2, 4), (4, 2, 6, 2), (4, 1, 2, 2), (4, 4, 4, 4)]   # 6, 6, 6, 1, 16 tokens
CAPTIONS = ["a red circle", "blue square up", "green", "", "a yellow dot moving left fast"]


# --- shared setups (built identically in every process) ------------------------------------------
@contextlib.contextmanager
def _fp64_throughout():
    """Keep fp64 tensors fp64 where the DiT computes in fp32 on purpose (modulation tables, QK RMSNorm):
    ``Tensor.float()`` of a fp64 tensor returns it unchanged. Then a fp64 model is fp64 end to end and the
    only differences between two evaluation orders are fp64 roundings."""
    orig = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else orig(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = orig


def _sp_problem(seed):
    """A fp64 DiT with a local window, and an awkward pack: 25 tokens (shards of 13 and 12 cut through the
    first two videos' boundary), a 1-token video, an empty caption."""
    torch.manual_seed(seed)
    dit = VideoDiT(DiTConfig.from_name("tiny", window=(1, 1, 2))).double()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.1)   # adaLN-zero init would zero most gradients
    g = torch.Generator().manual_seed(seed + 1)
    f64 = dict(generator=g, dtype=torch.float64)
    lat = [torch.randn(4, 3, 4, 6, **f64), torch.randn(4, 1, 2, 2, **f64), torch.randn(4, 2, 6, 2, **f64)]
    texts = [torch.randn(3, 32, **f64), torch.randn(0, 32, dtype=torch.float64), torch.randn(5, 32, **f64)]
    t = torch.rand(3, **f64) * 1000
    target = torch.randn(sum(a * b * c // 4 for _, a, b, c in (x.shape for x in lat)), 16, **f64)
    return dit, lat, texts, t, target


def _sp_loss_and_grads(dit, out, target):
    (out * target).sum().backward()
    return {n: p.grad.clone() for n, p in dit.named_parameters()}


# every conditioning mode but t2v (images still train as t2v), so the dp ranges cut through videos with
# given frames and per-frame levels: the 3- and 4-frame videos never draw t2v, and 3 steps are an epoch
COND = dict(cond_mix={"i2v": 1.0, "extend_forward": 1.0, "extend_backward": 1.0,
                      "interpolate": 1.0, "keyframes": 1.0, "diffusion_forcing": 1.0},
            cond_frames=2, cond_noise=0.05)


def _train_parts(run_dir, mesh=None, seed=0, steps=3, dit_config=None, model_config="tiny", token_budget=24,
                 **cond):
    torch.manual_seed(seed)
    dit = VideoDiT(dit_config or DiTConfig.from_name("tiny"))
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    text = TinyTextEncoder(dim=dit.config.text_dim)
    items = [{"latent": torch.randn(s, generator=torch.Generator().manual_seed(seed + i)), "caption": c}
             for i, (s, c) in enumerate(zip(SHAPES, CAPTIONS))]
    cfg = TrainConfig(steps=steps, token_budget=token_budget, lr=1e-3, warmup_steps=2, save_every=2, log_every=1,
                      seed=seed, **cond)
    kw = dict(model_config={"dit": model_config}, progress=False)
    if mesh is False:
        return Trainer(dit, text, items, cfg, run_dir, **kw)
    return DistributedTrainer(dit, text, items, cfg, run_dir, mesh=mesh, **kw)


def _sampling_problem(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    dit = VideoDiT.from_name("tiny").eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    dit.to(dtype)
    g, kw = torch.Generator().manual_seed(seed + 7), dict(dtype=dtype)
    noise = [torch.randn(4, 3, 4, 6, generator=g).to(dtype), torch.randn(4, 1, 2, 2, generator=g).to(dtype)]
    text = pack_sequences([torch.randn(4, 32, generator=g).to(dtype), torch.randn(2, 32, generator=g).to(dtype)])
    uncond = pack_sequences([torch.zeros(0, 32, **kw), torch.zeros(0, 32, **kw)])
    return dit, noise, dict(text=text, uncond_text=uncond, patch=(1, 2, 2), steps=4, guidance=4.0, shift="auto")


def _given(seed, dtype=torch.float32):
    """Given frames for :func:`_sampling_problem`: video 0's first and last latent frames (at 0 and 0.1),
    video 1 none; the sampler then passes per-frame timesteps."""
    x0 = torch.randn(4, 3, 4, 6, generator=torch.Generator().manual_seed(seed + 11)).to(dtype)
    levels = torch.tensor([0.0, float("nan"), 0.1], dtype=torch.float64)
    return dict(given=[x0, None], given_levels=[levels, None])


def _edit(seed, dtype=torch.float32):
    """Editing for :func:`_sampling_problem`: both videos from clean latents at strengths 0.5 and 0.75, so they
    join the pack at different steps (the pack the denoiser sees grows from one video's two copies to all)."""
    g = torch.Generator().manual_seed(seed + 13)
    return dict(init=[torch.randn(4, 3, 4, 6, generator=g).to(dtype), torch.randn(4, 1, 2, 2, generator=g).to(dtype)],
                strength=[0.5, 0.75])


def _cfg_forward_problem(seed):
    """A fp64 DiT and a guided-looking pack of 4 videos with 3, 1, 2 and 2 latent frames (so a rank's frame
    rows are not its video rows), an empty caption, and timesteps per video (4,) and per frame (8,): some
    frames at 0 (given), the others spread over (0, 1000)."""
    torch.manual_seed(seed)
    dit = VideoDiT(DiTConfig.from_name("tiny")).double().eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(seed + 3)
    f64 = dict(generator=g, dtype=torch.float64)
    lat = [torch.randn(4, *s, **f64) for s in [(3, 4, 6), (1, 2, 2), (2, 6, 2), (2, 2, 2)]]
    texts = [torch.randn(3, 32, **f64), torch.randn(2, 32, **f64), torch.zeros(0, 32, dtype=torch.float64),
             torch.zeros(0, 32, dtype=torch.float64)]
    t_video = torch.rand(4, **f64) * 1000
    t_frame = torch.rand(8, **f64) * 1000
    t_frame[[0, 2, 4, 7]] = 0
    return dit, pack_videos(lat, (1, 2, 2)), pack_sequences(texts), {"video": t_video, "frame": t_frame}


def _triton_sp_fp32(seed, group):
    """The fp32 DiT of :func:`_sp_problem` with the Triton attention kernel: forward and summed gradients,
    sequence-parallel over ``group`` (None: one process)."""
    dit, lat, texts, t, target = _sp_problem(seed)
    dit.float().backend = {"attention": "triton"}
    x, text = pack_videos([v.float() for v in lat], (1, 2, 2)), pack_sequences([v.float() for v in texts])
    if group is not None:
        enable_sequence_parallel(dit, dist.get_world_size(group))
    out = sequence_parallel_forward(dit, x, t.float(), text, group)
    grads = _sp_loss_and_grads(dit, out, target.float())
    for gr in grads.values() if group is not None else ():
        dist.all_reduce(gr, group=group)
    return {"out": out.detach(), "grads": grads}


def _assert_no_worse(got, lowp, exact, what, eps=torch.finfo(torch.float32).eps, scale=None):
    """flash-attention's rule: ``got``'s error against the exact result is at most twice the error of the
    single-process low-precision computation ``lowp``, plus one rounding of the result's scale (``scale``,
    default the exact result's largest magnitude)."""
    err, base = (got - exact).abs().max().item(), (lowp - exact).abs().max().item()
    scale = exact.abs().max().item() if scale is None else scale
    assert err <= 2 * base + eps * scale, f"{what}: error {err:.3g}, one process {base:.3g}"


# --- the spawned ranks ----------------------------------------------------------------------------
def _attempt(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # every rank records its error; the test asserts them all
        return ("error", type(e).__name__, str(e), traceback.format_exc())


def _rank_main(rank, port, out_dir, seed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert init_distributed(timeout_s=COLLECTIVE_TIMEOUT_S)
    out_dir = Path(out_dir)
    res = {}

    def sp_forward_backward():
        dit, lat, texts, t, target = _sp_problem(seed)
        enable_sequence_parallel(dit, WORLD)
        with _fp64_throughout():
            out = sequence_parallel_forward(dit, pack_videos(lat, (1, 2, 2)), t, pack_sequences(texts),
                                            dist.group.WORLD)
            grads = _sp_loss_and_grads(dit, out, target)
        for gr in grads.values():
            dist.all_reduce(gr)        # what FSDP2's reduce-scatter sums
        return {"out": out.detach(), "grads": grads}
    res["sp"] = _attempt(sp_forward_backward)
    res["sp_triton"] = _attempt(lambda: _triton_sp_fp32(seed, dist.group.WORLD))

    def train(sp, name, **cond):
        tr = _train_parts(out_dir / name, make_mesh(sp), seed, **cond)
        return {"losses": tr.train()["losses"],
                "local_numel": sum(p.to_local().numel() for p in tr.model.parameters())}
    res["train_sp"] = _attempt(lambda: train(2, "sp"))
    res["train_dp"] = _attempt(lambda: train(1, "dp"))
    res["train_mix_sp"] = _attempt(lambda: train(2, "mix_sp", **COND))
    res["train_mix_dp"] = _attempt(lambda: train(1, "mix_dp", **COND))

    def sample(sp):
        dit, noise, kw = _sampling_problem(seed)
        mesh = make_mesh(sp, outer="cfg")
        return sample_euler(make_denoiser(dit, mesh), noise, **kw)
    res["sample_cfg"] = _attempt(lambda: sample(1))
    res["sample_sp"] = _attempt(lambda: sample(2))

    def sample_given(sp):
        dit, noise, kw = _sampling_problem(seed)
        return sample_euler(make_denoiser(dit, make_mesh(sp, outer="cfg")), noise, **kw, **_given(seed))
    res["sample_given_cfg"] = _attempt(lambda: sample_given(1))
    res["sample_given_sp"] = _attempt(lambda: sample_given(2))

    def sample_edit_given():
        dit, noise, kw = _sampling_problem(seed)
        return sample_euler(make_denoiser(dit, make_mesh(1, outer="cfg")), noise, **kw, **_given(seed), **_edit(seed))
    res["sample_edit_given_cfg"] = _attempt(sample_edit_given)

    def cfg_forward():
        dit, x, text, ts = _cfg_forward_problem(seed)
        with _fp64_throughout():
            return {k: CFGParallelDenoiser(dit, dist.group.WORLD)(x, t, text) for k, t in ts.items()}
    res["cfg_forward"] = _attempt(cfg_forward)

    # bad input: every rank must raise
    res["bad_heads"] = _attempt(lambda: enable_sequence_parallel(
        VideoDiT(DiTConfig(dim=96, ffn_dim=64, num_heads=3, num_layers=1, in_channels=4, out_channels=4,
                           text_dim=32, freq_dim=32)), WORLD))
    res["bad_mesh"] = _attempt(lambda: make_mesh(2 if rank == 0 else 1))
    res["bad_ckpt"] = _attempt(lambda: _train_parts(out_dir / "sp", make_mesh(2), seed, model_config="tiny-3-layers",
                                                    dit_config=DiTConfig.from_name("tiny", num_layers=3)).resume())
    res["bad_dp_batches"] = _attempt(lambda: _train_parts(out_dir / "small", make_mesh(1), seed, token_budget=16))
    res["cfg_odd_pack"] = _attempt(lambda: CFGParallelDenoiser(_sampling_problem(seed)[0], dist.group.WORLD)(
        pack_videos([torch.randn(4, 1, 2, 2)], (1, 2, 2)), torch.ones(1), pack_sequences([torch.zeros(1, 32)])))

    def sigterm_on_rank_0():
        """SIGTERM reaches rank 0 only (after step 1): every rank stops after that step, with a checkpoint."""
        import signal

        tr = _train_parts(out_dir / "term", make_mesh(1), seed, steps=4)

        def on_step(step, metrics):
            if step == 1 and rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)
        s = tr.train(on_step=on_step)
        return {"interrupted": s["interrupted"], "signal": s["signal"], "steps": s["steps"],
                "checkpoint": Path(s["checkpoint"]).name, "handler": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL}
    res["sigterm"] = _attempt(sigterm_on_rank_0)
    torch.save(res, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run :func:`_rank_main` on 2 spawned gloo processes (bounded by DEADLINE_S); their result dicts."""
    out = tmp_path_factory.mktemp("dist")
    seed = int(os.environ.get("SORA_FAST_TEST_SEED", random.randrange(2**31 - 100)))   # fresh inputs every run
    ctx = mp.start_processes(_rank_main, args=(_free_port(), str(out), seed), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD}-process run did not finish within {DEADLINE_S} s (a hang); "
                        f"replay with SORA_FAST_TEST_SEED={seed}")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], seed


def _ok(res, key):
    status, *rest = res[key]
    assert status == "ok", f"{key} failed on a rank: {rest[0]}: {rest[1]}\n{rest[2]}"
    return rest[0]


def _replay(ranks) -> str:
    return f"replay the 2-process run with SORA_FAST_TEST_SEED={ranks[2]}"


# --- the checks -------------------------------------------------------------------------------------
def test_sequence_parallel_forward_backward_equals_one_process(ranks):
    dit, lat, texts, t, target = _sp_problem(ranks[2])
    x, text = pack_videos(lat, (1, 2, 2)), pack_sequences(texts)
    with _fp64_throughout():
        ref = dit(x, t, text)
        ref_grads = _sp_loss_and_grads(dit, ref, target)
    # fp64 rounding of reductions over at most N tokens (and the all-to-all moves values exactly)
    tol = x.num_tokens * torch.finfo(torch.float64).eps
    for res in ranks[1]:
        got = _ok(res, "sp")
        torch.testing.assert_close(got["out"], ref.detach(), rtol=0, atol=tol * ref.abs().max().item())
        assert got["grads"].keys() == ref_grads.keys()
        for n, g in got["grads"].items():
            torch.testing.assert_close(g, ref_grads[n], rtol=0, atol=tol * _grad_scale(n, ref_grads),
                                       msg=lambda m: f"{n}: {m}; {_replay(ranks)}")


def _grad_scale(name: str, grads: dict) -> float:
    """The magnitude a gradient's rounding error is relative to.

    A key bias's gradient is zero in exact arithmetic (it adds q·b to every logit of a query, and softmax
    ignores a constant shift), so its computed value is rounding noise of a sum over tokens; that noise
    scales with the key projection's weight gradient (the same tokens' dK), not with the noise itself.
    """
    scale = grads[name].abs().max().item()
    if name.endswith(".to_k.bias"):
        scale = max(scale, grads[name[: -len("bias")] + "weight"].abs().max().item())
    return scale


def test_sequence_parallel_with_the_triton_kernel(ranks):
    """The Triton varlen kernel (interpreted on CPU) inside the all-to-alls, fp32: no less accurate against
    the fp64 result than the same kernel in one process."""
    dit, lat, texts, t, target = _sp_problem(ranks[2])
    with _fp64_throughout():
        ref = dit(pack_videos(lat, (1, 2, 2)), t, pack_sequences(texts))
        ref_grads = _sp_loss_and_grads(dit, ref, target)
    one = _triton_sp_fp32(ranks[2], None)
    for res in ranks[1]:
        got = _ok(res, "sp_triton")
        _assert_no_worse(got["out"].double(), one["out"].double(), ref.detach(), f"output; {_replay(ranks)}")
        for n, g in got["grads"].items():
            _assert_no_worse(g.double(), one["grads"][n].double(), ref_grads[n], f"{n}; {_replay(ranks)}",
                             scale=_grad_scale(n, ref_grads))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ranks):
    """The single-process Trainer on the same model and data: its losses and parameter shapes."""
    tr = _train_parts(tmp_path_factory.mktemp("ref"), False, ranks[2])
    losses = tr.train()["losses"]
    return losses, [tuple(p.shape) for p in tr.model.parameters()]


# the loss is a fp32 value; one process and the mesh evaluate the same fp32 sums in other orders (per shard,
# then across ranks), which changes it by a few ulps per step (measured: at most 1 ulp over 4 steps)
LOSS_RTOL = 16 * torch.finfo(torch.float32).eps


def test_fsdp_training_losses_equal_one_process(ranks, reference_run):
    ref, shapes = reference_run
    total = sum(math.prod(s) for s in shapes)
    shard = sum(math.ceil(s[0] / WORLD) * math.prod(s[1:]) for s in shapes)      # FSDP2: dim-0 chunks
    for key in ("train_sp", "train_dp"):
        per_rank = [_ok(res, key) for res in ranks[1]]
        for got in per_rank:
            assert got["losses"] == pytest.approx(ref, rel=LOSS_RTOL, abs=0), f"{key}; {_replay(ranks)}"
        # weights sharded, not duplicated: the ranks' local shards add up to the model
        assert sum(g["local_numel"] for g in per_rank) == total
        assert max(g["local_numel"] for g in per_rank) <= shard


def test_fsdp_training_with_the_conditioning_mix_equals_one_process(ranks, tmp_path):
    """The mix's given frames, per-frame levels and loss mask on both meshes: the single-process losses."""
    tr = _train_parts(tmp_path / "ref_mix", False, ranks[2], **COND)
    ref = tr.train()["losses"]
    modes = {m for s in range(3) for m in tr.draw(s)["modes"]}
    assert modes - {"t2v"}, f"no conditioned video drawn; {_replay(ranks)}"
    for key in ("train_mix_sp", "train_mix_dp"):
        for res in ranks[1]:
            got = _ok(res, key)
            assert got["losses"] == pytest.approx(ref, rel=LOSS_RTOL, abs=0), f"{key}; {_replay(ranks)}"


def test_checkpoint_from_world_size_2_resumes_at_world_size_1(ranks, reference_run):
    """The world-size-2 run's step-2 checkpoint, resumed in one process, continues onto the losses of the
    single-process run and ends in the world-size-2 run's own final state (its step-3 checkpoint)."""
    out, _, seed = ranks
    uninterrupted = _train_parts(out / "sp", None, seed)
    assert uninterrupted.resume(out / "sp" / "dcp_step_000003") == 3
    resumed = _train_parts(out / "sp", None, seed)    # one process, no process group
    assert resumed.resume(out / "sp" / "dcp_step_000002") == 2
    assert resumed.train()["losses"] == pytest.approx(reference_run[0][2:], rel=LOSS_RTOL, abs=0), _replay(ranks)
    # Weights, AdamW moments and EMA shadow all came back, so the step taken after resuming is the world-size-2
    # run's own: both start from one state and differ only by the rounding of that step's gradient, which moves
    # a well-conditioned Adam step (at most lr per element) by far less than 1% of lr; fresh moments or a fresh
    # EMA would be off by a sizeable fraction of lr.
    # Not compared with the single-process run's weights: Adam's first step of an element is g / (|g| + eps),
    # whose slope is ~1/eps where |g| ~ eps (1e-8), so an element whose first gradient is that small (a chance
    # near-cancellation) turns the rounding difference between 1 and 2 processes into a step difference of a
    # few % of lr, already in the step-2 checkpoint: not the resume's doing.
    # The text encoder's key biases get no gradient at all (softmax ignores a shift shared by every key of a
    # row), so theirs is pure rounding noise, which Adam normalizes into steps of up to ~lr whatever its size:
    # the two may differ by up to 2 lr per step taken after resuming, and those slices are held to that.
    atol = 1e-2 * resumed.config.lr
    atol_no_signal = 2 * resumed.config.lr * (resumed.config.steps - 2)
    for tag, got, ref in (("", resumed.model.state_dict(), uninterrupted.model.state_dict()),
                          ("EMA ", resumed.ema.params, uninterrupted.ema.params)):
        assert got.keys() == ref.keys()
        for name, want in ref.items():
            have = got[name]
            if name.startswith("text.") and name.endswith("qkv.bias"):
                d = want.shape[0] // 3
                torch.testing.assert_close(have[d:2 * d], want[d:2 * d], rtol=0, atol=atol_no_signal,
                                           msg=lambda m: f"{tag}{name} (key part): {m}; {_replay(ranks)}")
                have, want = torch.cat([have[:d], have[2 * d:]]), torch.cat([want[:d], want[2 * d:]])
            torch.testing.assert_close(have, want, rtol=0, atol=atol,
                                       msg=lambda m: f"{tag}{name}: {m}; {_replay(ranks)}")
    assert resumed.ema.num_updates == uninterrupted.ema.num_updates == 3


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint(ranks):
    out = ranks[0]
    for r, res in enumerate(ranks[1]):
        got = _ok(res, "sigterm")
        assert got == {"interrupted": True, "signal": "SIGTERM", "steps": 1, "checkpoint": "dcp_step_000001",
                       "handler": True}, f"rank {r}: {got}"
    assert (out / "term" / "latest_dcp").read_text().strip() == "dcp_step_000001"


def test_cfg_and_sequence_parallel_sampling_equal_one_process(ranks):
    """Same seed, same videos: the 2-rank fp32 samples are no further from the fp64 samples than the
    single-process fp32 ones (flash-attention's rule)."""
    dit, noise, kw = _sampling_problem(ranks[2])
    one = sample_euler(dit, noise, **kw)
    dit64, noise64, kw64 = _sampling_problem(ranks[2], torch.float64)
    with _fp64_throughout():
        exact = sample_euler(dit64, noise64, **kw64)
    for key in ("sample_cfg", "sample_sp"):
        for res in ranks[1]:
            for i, (a, b, e) in enumerate(zip(_ok(res, key), one, exact)):
                _assert_no_worse(a.double(), b.double(), e, f"{key} video {i}; {_replay(ranks)}")


def test_sampling_with_given_frames_in_parallel_equals_one_process(ranks):
    """Given frames make the sampler pass per-frame timesteps (F,): CFG-parallel (each rank the frames of its
    half of the videos) and sequence-parallel samples follow the same rule as without them."""
    dit, noise, kw = _sampling_problem(ranks[2])
    one = sample_euler(dit, noise, **kw, **_given(ranks[2]))
    dit64, noise64, kw64 = _sampling_problem(ranks[2], torch.float64)
    with _fp64_throughout():
        exact = sample_euler(dit64, noise64, **kw64, **_given(ranks[2], torch.float64))
    for key in ("sample_given_cfg", "sample_given_sp"):
        for res in ranks[1]:
            got = _ok(res, key)
            assert torch.equal(got[0][:, [0, 2]], _given(ranks[2])["given"][0][:, [0, 2]])   # held exactly
            for i, (a, b, e) in enumerate(zip(got, one, exact)):
                _assert_no_worse(a.double(), b.double(), e, f"{key} video {i}; {_replay(ranks)}")


def test_editing_with_given_frames_under_cfg_parallel_equals_one_process(ranks):
    """Edited videos (strengths 0.5 and 0.75: they join the pack at different steps) with given frames: each
    CFG-parallel rank runs its half of a pack that grows; the same rule as the samples above."""
    dit, noise, kw = _sampling_problem(ranks[2])
    one = sample_euler(dit, noise, **kw, **_given(ranks[2]), **_edit(ranks[2]))
    dit64, noise64, kw64 = _sampling_problem(ranks[2], torch.float64)
    with _fp64_throughout():
        exact = sample_euler(dit64, noise64, **kw64, **_given(ranks[2], torch.float64),
                             **_edit(ranks[2], torch.float64))
    for res in ranks[1]:
        got = _ok(res, "sample_edit_given_cfg")
        assert torch.equal(got[0][:, [0, 2]], _given(ranks[2])["given"][0][:, [0, 2]])   # held exactly
        for i, (a, b, e) in enumerate(zip(got, one, exact)):
            _assert_no_worse(a.double(), b.double(), e, f"video {i}; {_replay(ranks)}")


@pytest.mark.parametrize("form", ["video", "frame"])
def test_cfg_parallel_forward_takes_per_video_and_per_frame_timesteps(ranks, form):
    """The CFG-parallel denoiser with timesteps (B,) or (F,) == the DiT in one process (fp64)."""
    dit, x, text, ts = _cfg_forward_problem(ranks[2])
    with _fp64_throughout():
        ref = dit(x, ts[form], text)
    tol = x.num_tokens * torch.finfo(torch.float64).eps    # as the sequence-parallel forward
    for res in ranks[1]:
        torch.testing.assert_close(_ok(res, "cfg_forward")[form], ref, rtol=0, atol=tol * ref.abs().max().item(),
                                   msg=lambda m: f"{form}: {m}; {_replay(ranks)}")


@pytest.mark.parametrize("key, error, words", [
    ("bad_heads", "ValueError", ["sequence_parallel=2", "num_heads=3"]),
    ("bad_mesh", "ValueError", ["same on every rank", "rank 0: (2, 'dp')", "rank 1: (1, 'dp')"]),
    ("bad_ckpt", "StateDictMismatchError", ["config differs", "tiny-3-layers", "blocks.2"]),
    ("cfg_odd_pack", "ValueError", ["multiple of 2", "got 1 videos"]),
    ("bad_dp_batches", "ValueError", ["fewer videos (1) than the 2 data-parallel groups", "token_budget (16)"]),
])
def test_bad_input_raises_on_every_rank(ranks, key, error, words):
    for res in ranks[1]:
        status, name, msg, _ = res[key]
        assert (status, name) == ("error", error), res[key]
        for w in words:
            assert w in msg, (w, msg)


def test_select_timesteps_cuts_video_rows_or_frame_rows():
    """(B,) -> rows lo:hi; (F,) -> the rows of videos lo..hi-1's frames; B == F reads the same both ways."""
    from sora_fast.distributed import select_timesteps
    x = pack_videos([torch.zeros(4, t, 2, 2) for t in (3, 1, 2, 2)], (1, 2, 2))     # frames at rows 0-2, 3, 4-5, 6-7
    t_video, t_frame = torch.arange(4.0), torch.arange(8.0)
    assert select_timesteps(x, t_video, 1, 3).tolist() == [1.0, 2.0]
    assert select_timesteps(x, t_frame, 0, 2).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert select_timesteps(x, t_frame, 2, 4).tolist() == [4.0, 5.0, 6.0, 7.0]
    ones = pack_videos([torch.zeros(4, 1, 2, 2)] * 4, (1, 2, 2))                      # B == F == 4
    assert select_timesteps(ones, t_video, 2, 4).tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match=r"\(4,\) or \(8,\).*got \(5,\)"):
        select_timesteps(x, torch.zeros(5), 0, 2)
    with pytest.raises(ValueError, match="non-empty"):
        select_timesteps(x, t_video, 2, 2)


def test_cutting_packs_keeps_the_packing_consistent():
    """Token shards and video ranges against packing the same videos directly (random sizes, 1-token videos)."""
    from sora_fast.distributed import even_splits, select_videos, token_shard, video_ranges

    sizes = [tuple(int(v) for v in torch.randint(1, 4, (3,))) for _ in range(5)] + [(1, 1, 1)]
    lat = [torch.randn(3, t, 2 * h, 2 * w) for t, h, w in sizes]
    x = pack_videos(lat, (1, 2, 2))
    for parts in (2, 3, 5):
        lo = 0
        for n in even_splits(x.num_tokens, parts):
            shard = token_shard(x, lo, lo + n)
            assert torch.equal(shard.tokens, x.tokens[lo:lo + n]) and torch.equal(shard.coords, x.coords[lo:lo + n])
            # cu_seqlens describe the shard's rows: sequence i holds exactly the rows whose seq_id is i
            want = torch.bincount(shard.seq_ids.long(), minlength=len(lat))
            assert torch.equal(shard.cu_seqlens.diff().long(), want) and shard.cu_seqlens[-1] == n
            assert shard.max_seqlen == int(want.max())
            lo += n
        assert lo == x.num_tokens
        ranges = video_ranges(x.seqlens, parts)
        assert [a for a, _ in ranges][1:] == [b for _, b in ranges][:-1] and ranges[0][0] == 0
        assert ranges[-1][1] == len(lat) and all(a < b for a, b in ranges)
        for a, b in ranges:
            got, want = select_videos(x, a, b), pack_videos(lat[a:b], (1, 2, 2))
            for f in ("tokens", "cu_seqlens", "grid", "coords", "seq_ids"):
                assert torch.equal(getattr(got, f), getattr(want, f)), f
            assert got.max_seqlen == want.max_seqlen
    with pytest.raises(ValueError, match="a pack of 2 videos cannot be split across 3 ranks"):
        video_ranges([4, 5], 3)


def test_single_process_mesh_and_errors():
    assert make_mesh(1).mesh is None and not init_distributed()
    with pytest.raises(ValueError, match="must divide the world size 1"):
        make_mesh(2)
    with pytest.raises(ValueError, match="outer must be one of"):
        make_mesh(1, outer="tp")
    assert issubclass(StateDictMismatchError, ValueError)
    assert ParallelMesh.single().world_size == 1


# --- the command line under torchrun ----------------------------------------------------------------
def _save_pipeline(path, std):
    from sora_fast.models.vae import CausalVAE
    from sora_fast.pipeline import VideoPipeline

    torch.manual_seed(0)
    dit = VideoDiT.from_name("tiny")
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=std)
    return VideoPipeline(dit, CausalVAE("tiny"), TinyTextEncoder(dim=dit.config.text_dim)).save(path)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    return _save_pipeline(tmp_path_factory.mktemp("pipe") / "pipe", 0.05)


@pytest.fixture(scope="module")
def sampling_pipeline(tmp_path_factory):
    """Weights large enough (std 0.2) that the timesteps move the decoded frames by tens of 8-bit levels
    (std 0.05: under one), so a frame given the wrong timestep shows in the written files."""
    return _save_pipeline(tmp_path_factory.mktemp("pipe") / "pipe", 0.2)


def _gif(path):
    from PIL import Image, ImageSequence

    return torch.stack([torch.from_numpy(__import__("numpy").array(f.convert("RGB"))).int()
                        for f in ImageSequence.Iterator(Image.open(path))])


@pytest.mark.parametrize("extra, size", [
    ([], "5x16x16"),
    (["--image", "{first}", "--keyframe", "{last}@-1"], "9x16x16"),       # given frames: per-frame timesteps
    (["--frames", "9", "--window", "5", "--overlap", "1"], "9x16x16"),    # a long video: windows 2.. are given
], ids=["plain", "conditions", "long"])
def test_generate_cfg_parallel_under_torchrun_matches_one_process(sampling_pipeline, tmp_path, extra, size):
    """`sora-fast generate --cfg-parallel` on 2 ranks writes the single process's videos: plain, conditioned
    (image-to-video and a last keyframe) and a long rollout."""
    import subprocess
    import sys

    from sora_fast import cli
    from sora_fast.data import write_video

    g = torch.Generator().manual_seed(random.randrange(2**31))
    media = {}
    for name in ("first", "last"):
        media[name] = str(write_video(tmp_path / f"{name}.png", torch.rand(3, 1, 16, 16, generator=g) * 2 - 1))
    flags = ["generate", "--pipeline", str(sampling_pipeline), "--prompt", "a red circle", "--prompt", "blue",
             "--size", size, "--steps", "3", "--format", "gif", *(a.format(**media) for a in extra)]
    assert cli.main(flags + ["--out", str(tmp_path / "one")]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sora_fast.cli", *flags, "--cfg-parallel", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=DEADLINE_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote 2 files") == 1          # rank 0 alone writes
    for name in ("00_a_red_circle.gif", "01_blue.gif"):
        a, b = _gif(tmp_path / "one" / name), _gif(tmp_path / "two" / name)
        # the latents agree to fp32 rounding (tests above); 8-bit frames may round across one level
        assert a.shape == b.shape and (a - b).abs().max() <= 1


def test_parallel_flags_without_torchrun_are_clear_errors(saved_pipeline, tmp_path, capsys):
    from sora_fast import cli

    base = ["generate", "--pipeline", str(saved_pipeline), "--prompt", "x", "--out", str(tmp_path / "g")]
    assert cli.main(base + ["--cfg-parallel"]) == 2
    assert "--cfg-parallel needs 2 processes: launch with torchrun --nproc_per_node 2" in capsys.readouterr().err
    assert cli.main(base + ["--sequence-parallel", "0"]) == 2
    assert "--sequence-parallel must be a positive int, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_train_under_torchrun_then_resume_on_one_rank(saved_pipeline, tmp_path):
    """`sora-fast train --sequence-parallel 2` on 2 ranks, then `--resume` of its sharded checkpoint on 1."""
    import json
    import subprocess
    import sys

    from sora_fast.data import make_synthetic_dataset
    from sora_fast.pipeline import VideoPipeline

    make_synthetic_dataset(tmp_path / "data", 6, seed=1, sizes=((16, 16), (16, 32)), lengths=(1, 5), progress=False)
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"data": str(tmp_path / "data"), "out": str(tmp_path / "run"),
                             "pipeline": str(saved_pipeline),
                             "train": {"steps": 2, "token_budget": 64, "save_every": 1, "log_every": 1}}))

    def torchrun(n, *extra):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                            "-m", "sora_fast.cli", "train", "--config", str(f), *extra],
                           capture_output=True, text=True, timeout=2 * DEADLINE_S)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    torchrun(2, "--sequence-parallel", "2")
    assert (tmp_path / "run" / "latest_dcp").read_text().strip() == "dcp_step_000002"
    r = torchrun(1, "--resume", "--steps", "3")
    assert "resuming from step 2" in r.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    VideoPipeline.load(tmp_path / "run" / "pipeline")        # the unsharded pipeline loads in one process


def _torchrun_train(tmp_path, saved_pipeline, n, *extra, steps=1):
    import json
    import subprocess
    import sys

    from sora_fast.data import make_synthetic_dataset

    if not (tmp_path / "data").exists():
        make_synthetic_dataset(tmp_path / "data", 4, seed=1, sizes=((16, 16),), lengths=(1, 5), progress=False)
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"data": str(tmp_path / "data"), "out": str(tmp_path / "run"),
                             "pipeline": str(saved_pipeline),
                             "train": {"steps": steps, "token_budget": 64, "save_every": 1, "log_every": 1}}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           "-m", "sora_fast.cli", "train", "--config", str(f), *extra],
                          capture_output=True, text=True, timeout=2 * DEADLINE_S)


def test_train_under_torchrun_refuses_an_existing_run_on_every_rank(saved_pipeline, tmp_path):
    """Rank 0 looks at the run directory and broadcasts what it found: both ranks stop with the message,
    before any rank writes."""
    run = tmp_path / "run"
    (run / "step_000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    r = _torchrun_train(tmp_path, saved_pipeline, 2)
    assert r.returncode != 0
    assert r.stderr.count("already holds a training run (metrics.jsonl, step_000004); pass --resume") == 2, \
        r.stderr[-3000:]
    assert "sora_fast/cli.py" not in r.stderr                  # one line per rank, no traceback of ours
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "step_000004"]


@pytest.mark.slow
def test_train_under_torchrun_overwrite_starts_over(saved_pipeline, tmp_path):
    import json

    run = tmp_path / "run"
    (run / "step_000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    r = _torchrun_train(tmp_path, saved_pipeline, 2, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("--overwrite: deleted the earlier run") == 1                  # rank 0 deletes
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "step_000004").exists() and (run / "latest_dcp").read_text().strip() == "dcp_step_000001"
