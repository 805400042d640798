"""Accelerated diffusers models as users keep them: a deep copy (an EMA copy, a snapshot) and a pickled /
torch.save'd model compute with their own weights and carry a handle that acts on themselves. Every
accelerated family: ``FAMILIES`` of _diffusers_utils."""
import copy
import io
import subprocess
import sys
from pathlib import Path

import _diffusers_utils
import pytest
import torch
from _diffusers_utils import FAMILIES, FP32_REL, tiny_ltx
from test_dit import rel_err

from sora_fast.integrations import diffusers as integ
from sora_fast.integrations.diffusers import accelerate

calls = _diffusers_utils.calls  # the shared fixture


def _edit(model, names):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(0.5)


def _handle(model):
    return getattr(model, integ.HANDLE_ATTR)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deep_copy_follows_the_copy(family, calls):
    """accelerate, deepcopy, edit the copy's weights: the copy computes with its own weights (what the
    plain copy computes, within fp32 error), the original is untouched; the copy's handle undoes the
    copy alone, the original's handle the original alone."""
    make, names = FAMILIES[family]
    model, fwd = make()
    plain = copy.deepcopy(model)
    handle = accelerate(model)
    ours = fwd(model)
    clone = copy.deepcopy(model)
    _edit(clone, names)
    _edit(plain, names)
    want = fwd(plain)
    assert rel_err(want, ours) > 1e-3                             # the edit matters
    calls.clear()
    got = fwd(clone)
    assert calls, "the copy is not accelerated"
    assert rel_err(got, want) <= FP32_REL, rel_err(got, want)
    assert torch.equal(fwd(model), ours)                          # the original is untouched
    copy_handle = _handle(clone)
    assert copy_handle is not _handle(model) and copy_handle.active
    copy_handle.undo()
    assert not copy_handle.active and not hasattr(clone, integ.HANDLE_ATTR)
    assert all("forward" not in vars(m) for m in clone.modules())
    assert torch.equal(fwd(clone), want)                          # the copy is plain diffusers again
    assert handle.active and _handle(model).active               # the original is still accelerated
    calls.clear()
    assert torch.equal(fwd(model), ours) and calls
    handle.undo()
    assert not _handle_or_none(model) and torch.equal(fwd(clone), want)


def _handle_or_none(model):
    return getattr(model, integ.HANDLE_ATTR, None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pickle_round_trip(family, calls):
    """torch.save / torch.load of an accelerated model (the plain one pickles too): the loaded model is
    accelerated, computes what the original does, and its handle undoes it alone."""
    make, names = FAMILIES[family]
    model, fwd = make()
    ref = fwd(model)
    buf = io.BytesIO()
    torch.save(model, buf)                                        # the plain model pickles
    handle = accelerate(model)
    ours = fwd(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    calls.clear()
    assert torch.equal(fwd(loaded), ours) and calls
    _edit(loaded, names)
    assert rel_err(fwd(loaded), ours) > 1e-3                      # the loaded model runs its own weights
    _handle(loaded).undo()
    assert torch.equal(fwd(model), ours) and handle.active
    handle.undo()
    assert torch.equal(fwd(model), ref)


def test_pickled_dispatcher_backend_loads_in_a_fresh_process(tmp_path):
    """A saved HunyuanVideo/LTX processor holds the dispatcher backend: loading it in a process that has
    not registered the sora_fast backends registers them."""
    model = tiny_ltx()
    accelerate(model)
    path = tmp_path / "ltx.pt"
    torch.save(model, path)
    code = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
            "print(m.transformer_blocks[0].attn1.processor._attention_backend.value)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "sora_fast"
