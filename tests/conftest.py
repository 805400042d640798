"""Test-suite setup: Triton interpreter on CPU-only machines, fresh reproducible seeds, markers."""
import os
import random

import pytest

try:  # the interpreter must be chosen before triton (or any kernel module) is imported
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test gets fresh random inputs; the seed is printed on failure and can be replayed
    with SORA_FAST_TEST_SEED=<seed>."""
    seed = int(os.environ.get("SORA_FAST_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with SORA_FAST_TEST_SEED={seeds[0]}"))


@pytest.fixture(autouse=True)
def accelerate_every_size(monkeypatch):
    """accelerate() hands small CPU calls of Wan back to diffusers' own code (``wan.CPU_MIN_ELEMENTS``); the
    tests' tiny models must run the patched path, so the threshold is 0 unless a test sets it."""
    from sora_fast.integrations.diffusers import wan  # imports no diffusers module itself

    monkeypatch.setattr(wan, "CPU_MIN_ELEMENTS", 0)


@pytest.fixture
def tiny_pipeline(tmp_path):
    """A saved pipeline of the tiny presets with random DiT weights: ``(pipeline, its directory)``."""
    from sora_fast.models.dit import VideoDiT
    from sora_fast.models.text import TinyTextEncoder
    from sora_fast.models.vae import CausalVAE
    from sora_fast.pipeline import VideoPipeline

    dit = VideoDiT.from_name("tiny")
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pipe = VideoPipeline(dit, CausalVAE("tiny"), TinyTextEncoder(dim=dit.config.text_dim))
    return pipe, pipe.save(tmp_path / "pipe")
