"""Nothing saved is silently lost or silently wrong: per-file sha256 in checkpoints and pipelines (verified on
load, with fallback to the newest good checkpoint), a crash between the pipeline swap's two renames, broken
files that name themselves, and files written with the user's umask. The faults are injected here: flipped
bytes, truncated and empty files, broken JSON, a crash between two renames."""
import hashlib
import json
import os
import shutil
import stat
import struct
import warnings

import pytest
import torch
from torch import nn

from sora_fast import _files, cli
from sora_fast import pipeline as pipeline_mod
from sora_fast._files import CorruptFileError, load_safetensors, read_json, sha256_file
from sora_fast.data import latents as latents_mod
from sora_fast.distributed.checkpoint import load_sharded, save_sharded
from sora_fast.models.dit import VideoDiT
from sora_fast.models.text import T5TextEncoder, TinyTextEncoder
from sora_fast.models.vae import CausalVAE
from sora_fast.pipeline import VideoPipeline
from sora_fast.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from sora_fast.training.ema import EMA
from sora_fast.training.trainer import TrainConfig, Trainer


def _flip(path, byte=0):
    """Flip the lowest bit of byte ``byte`` of a safetensors file's first tensor (the size stays the same;
    for float data it is the least significant mantissa bit, so the values stay finite)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + byte] ^= 1
    path.write_bytes(bytes(data))


def _toy(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))


def _run_with_two_checkpoints(run):
    model = _toy(0)
    ema = EMA(model, 0.9)
    save_checkpoint(run, model=model, ema=ema, state={"step": 1})
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    save_checkpoint(run, model=model, ema=ema, state={"step": 2})
    return first


def _strip_hashes(ckpt):
    """Make ``ckpt`` look written by a version without hashes: sizes only in its ``complete`` marker."""
    marker = json.loads((ckpt / "complete").read_text())
    marker.pop("sha256", None)
    marker["files"] = {p.name: p.stat().st_size for p in ckpt.iterdir() if p.name != "complete"}
    (ckpt / "complete").write_text(json.dumps(marker))


# ----------------------------------------------------------------------------------------------
# the shared hash


def test_one_streamed_sha256_shared_with_the_latent_cache(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(3000))
    assert sha256_file(f, chunk_size=64) == sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert latents_mod._sha256(f) == sha256_file(f)


# ----------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("fname", ["model.safetensors", "ema.safetensors", "extra.safetensors"])
def test_flipped_byte_in_a_checkpoint_is_refused_and_resume_falls_back(tmp_path, fname):
    run = tmp_path / "run"
    first = _run_with_two_checkpoints(run)
    bad = run / "step_000002"
    marker = json.loads((bad / "complete").read_text())
    assert set(marker["sha256"]) == set(marker["files"]) == {p.name for p in bad.iterdir()} - {"complete"}
    _flip(bad / fname)

    model = _toy(5)
    with pytest.raises(CorruptFileError, match=rf"step_000002/{fname}.* has sha256 .* recorded"):
        load_checkpoint(bad, model, ema=EMA(model))
    with pytest.warns(UserWarning) as record:
        state = load_checkpoint(run, model, ema=EMA(model))
    messages = [str(w.message) for w in record]
    assert any("step_000002" in m and "corrupt" in m and fname in m for m in messages), messages
    assert any("falling back to checkpoint" in m and "step_000001" in m for m in messages), messages
    assert state["step"] == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in first.items())


def test_every_checkpoint_corrupt_is_an_error_naming_them(tmp_path):
    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    for ckpt in list_checkpoints(run):
        _flip(ckpt / "model.safetensors")
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(CorruptFileError, match="no loadable checkpoint"):
        load_checkpoint(run, _toy(0))


def test_verify_false_checks_sizes_only_and_says_so(tmp_path):
    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    _flip(run / "step_000002" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"verify=False: the sha256 of .*model\.safetensors.* is not checked"):
        assert load_checkpoint(run, _toy(0), verify=False)["step"] == 2
    (run / "step_000002" / "model.safetensors").write_bytes(b"x")     # sizes are still checked
    with pytest.raises(CorruptFileError, match=r"model\.safetensors' is 1 bytes, its 'complete' marker says"):
        load_checkpoint(run / "step_000002", _toy(0), verify=False)


def test_checkpoint_without_hashes_loads_with_a_note_and_sizes_checked(tmp_path):
    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    old = run / "step_000002"
    _strip_hashes(old)
    with pytest.warns(UserWarning, match="without content hashes"):
        assert load_checkpoint(old, _toy(0))["step"] == 2
    data = (old / "model.safetensors").read_bytes()
    (old / "model.safetensors").write_bytes(data[:-3])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors' is \d+ bytes, its 'complete' marker says"):
        load_checkpoint(old, _toy(0))


def test_broken_marker_state_json_and_safetensors_name_the_file(tmp_path):
    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    ckpt = run / "step_000002"
    (ckpt / "complete").write_text('{"step": 2, "fi')                     # a torn marker: latest is skipped
    with pytest.raises(CorruptFileError, match=r"step_000002/complete' is not valid JSON"):
        load_checkpoint(ckpt, _toy(0))
    with pytest.warns(UserWarning, match=r"step_000002.*not valid JSON"):
        assert load_checkpoint(run, _toy(0))["step"] == 1

    ckpt = run / "step_000001"                                           # an old checkpoint (no hashes)
    _strip_hashes(ckpt)
    good_state = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(good_state[: len(good_state) // 2])
    _strip_hashes(ckpt)
    with pytest.warns(UserWarning), pytest.raises(CorruptFileError, match=r"step_000001/state\.json' is not valid"):
        load_checkpoint(ckpt, _toy(0))
    (ckpt / "state.json").write_text(good_state)
    (ckpt / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{")  # header claims more than the file
    _strip_hashes(ckpt)
    with pytest.warns(UserWarning), pytest.raises(
            CorruptFileError, match=r"step_000001/model\.safetensors' is not a readable safetensors file"):
        load_checkpoint(ckpt, _toy(0))


@pytest.mark.parametrize("name", ["Tensor", "nn", "manual_seed", "float16; import os", 3])
def test_checkpoint_decoder_accepts_only_real_dtype_names(tmp_path, name):
    model = _toy(0)
    ckpt = save_checkpoint(tmp_path, model=model, state={"step": 0, "dt": torch.bfloat16})
    assert load_checkpoint(ckpt, _toy(1))["dt"] is torch.bfloat16
    meta = json.loads((ckpt / "state.json").read_text())
    meta["state"]["dt"] = {"__dtype__": name}
    (ckpt / "state.json").write_text(json.dumps(meta))
    _strip_hashes(ckpt)
    with pytest.warns(UserWarning), pytest.raises(CorruptFileError, match=r"state\.json'.*not a torch dtype name"):
        load_checkpoint(ckpt, _toy(1))


def test_checkpoint_and_pipeline_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt = save_checkpoint(tmp_path / "run", model=_toy(0), state={"step": 0})
        pipe_dir = _pipe().save(tmp_path / "pipe")
    finally:
        os.umask(old)
    for f in ckpt.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE(pipe_dir.stat().st_mode) == 0o755
    for f in pipe_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _tiny_trainer(run):
    torch.manual_seed(0)
    dit = VideoDiT.from_name("tiny")
    items = [{"latent": torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(i)), "caption": c}
             for i, c in enumerate(["a red dot", "blue"])]
    cfg = TrainConfig(steps=2, token_budget=8, lr=1e-3, warmup_steps=0, save_every=1, log_every=1, seed=3)
    return Trainer(dit, TinyTextEncoder(dim=dit.config.text_dim), items, cfg, run, model_config={"dit": "tiny"},
                   progress=False)


def test_trainer_resume_falls_back_past_a_corrupt_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _tiny_trainer(run).train()
    assert [p.name for p in list_checkpoints(run)] == ["step_000001", "step_000002"]
    _flip(run / "step_000002" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"step_000002.* is corrupt"):
        assert _tiny_trainer(run).resume() == 1
    with pytest.warns(UserWarning, match="verify=False"):
        assert _tiny_trainer(run).resume(verify=False) == 2


# ----------------------------------------------------------------------------------------------
# sharded checkpoints


def test_sharded_checkpoint_hashes_verify_and_fall_back(tmp_path):
    run = tmp_path / "run"
    model = _toy(0)
    save_sharded(run, 1, model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1)
    bad = save_sharded(run, 2, model)
    record = json.loads((bad / "meta.json").read_text())
    files = [p for p in bad.iterdir() if p.name != "meta.json"]
    assert set(record["sha256"]) == {p.name for p in files} and record["files"]
    shard = next(p for p in files if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    fresh = _toy(3)
    with pytest.raises(CorruptFileError, match=rf"dcp_step_000002/{shard.name}' has sha256"):
        load_sharded(bad, fresh)
    with pytest.warns(UserWarning, match=r"dcp_step_000002.* is corrupt"):
        assert load_sharded(run, fresh)["step"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in first.items())
    with pytest.warns(UserWarning, match=r"verify=False: the sha256 of the \d+ files of .*dcp_step_000001"):
        assert load_sharded(run / "dcp_step_000001", _toy(3), verify=False)["step"] == 1
    (bad / "meta.json").write_text("{")
    with pytest.raises(CorruptFileError, match=r"dcp_step_000002/meta\.json' is not valid JSON"):
        load_sharded(bad, fresh)


# ----------------------------------------------------------------------------------------------
# pipelines


def _pipe(seed=0):
    torch.manual_seed(seed)
    dit = VideoDiT.from_name("tiny")
    return VideoPipeline(dit, CausalVAE("tiny"), TinyTextEncoder(dim=dit.config.text_dim))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pipeline_records_hashes_and_refuses_a_flipped_byte(tmp_path):
    d = _pipe().save(tmp_path / "p")
    desc = json.loads((d / "pipeline.json").read_text())
    assert set(desc["sha256"]) == set(desc["files"]) == {"dit.safetensors", "vae.safetensors", "text.safetensors"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VideoPipeline.load(d)                                         # a good pipeline loads without a warning
    _flip(d / "vae.safetensors")
    with pytest.raises(CorruptFileError, match=r"p/vae\.safetensors' has sha256 .*pipeline\.json recorded"):
        VideoPipeline.load(d)
    with pytest.warns(UserWarning, match=r"verify=False: the sha256 of .*vae\.safetensors.* is not checked"):
        VideoPipeline.load(d, verify=False)
    (d / "dit.safetensors").write_bytes(b"")                          # sizes are checked even without verify
    with pytest.raises(CorruptFileError, match=r"p/dit\.safetensors' is 0 bytes, pipeline\.json says"):
        VideoPipeline.load(d, verify=False)


def _break_json(d, **changes):
    desc = json.loads((d / "pipeline.json").read_text())
    for k, v in changes.items():
        if v is None:
            desc.pop(k, None)
        else:
            desc[k] = v
    (d / "pipeline.json").write_text(json.dumps(desc))


def test_broken_pipeline_files_name_themselves(tmp_path):
    d = _pipe().save(tmp_path / "p")
    good = (d / "pipeline.json").read_text()
    (d / "pipeline.json").write_text(good[:40])
    with pytest.raises(CorruptFileError, match=r"p/pipeline\.json' is not valid JSON .*expected a pipeline"):
        VideoPipeline.load(d)
    (d / "pipeline.json").write_text(good)
    _break_json(d, format=7)
    with pytest.raises(ValueError, match=r"p/pipeline\.json' has format 7; .* reads pipelines of format 1"):
        VideoPipeline.load(d)
    (d / "pipeline.json").write_text(good)
    _break_json(d, text={"kind": "clip", "path": "x"})
    with pytest.raises(ValueError, match=r"p/pipeline\.json': text\.kind is 'clip', expected one of 'tiny', 't5'"):
        VideoPipeline.load(d)
    (d / "pipeline.json").write_text(good)
    _break_json(d, dit={**json.loads(good)["dit"], "no_such_field": 1})
    with pytest.raises(ValueError, match=r"p/pipeline\.json': its 'dit' entry does not describe a valid model"):
        VideoPipeline.load(d)

    # a pipeline saved before hashes (no sizes either): a truncated / empty weight file names itself
    (d / "pipeline.json").write_text(good)
    _break_json(d, files=None, sha256=None)
    data = (d / "dit.safetensors").read_bytes()
    (d / "dit.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="records no file sizes or hashes"), pytest.raises(
            CorruptFileError, match=r"p/dit\.safetensors' is not a readable safetensors file .*truncated"):
        VideoPipeline.load(d)
    (d / "dit.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CorruptFileError, match=r"p/dit\.safetensors' is empty"):
        VideoPipeline.load(d)


def test_crash_between_the_two_renames_of_a_pipeline_save_is_recovered(tmp_path, monkeypatch):
    old_pipe, new_pipe = _pipe(0), _pipe(1)
    d = old_pipe.save(tmp_path / "p")
    real = os.replace
    calls = []

    def crash_after_first(src, dst):                                  # the process dies after one rename:
        calls.append((src, dst))                                      # every later rename fails too
        if len(calls) > 1:
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(pipeline_mod.os, "replace", crash_after_first)
    with pytest.raises(OSError, match="simulated crash"):
        new_pipe.save(d)
    monkeypatch.undo()
    assert not d.exists() and (tmp_path / ".p.old" / "pipeline.json").is_file()
    with pytest.warns(UserWarning, match=r"p' was missing .*recovered it from .*\.p\.old"):
        back = VideoPipeline.load(d)
    assert _same(back, old_pipe) and d.is_dir()

    # a kill -9 leaves the complete new directory too: the new pipeline is the one recovered
    new_pipe.save(tmp_path / "staged")
    os.rename(d, tmp_path / ".p.old")
    os.rename(tmp_path / "staged", tmp_path / ".p.new-x1")
    with pytest.warns(UserWarning, match=r"recovered it from .*\.p\.new-x1"):
        assert _same(VideoPipeline.load(d), new_pipe)

    # ... unless it is not intact: then the previous one
    shutil.rmtree(tmp_path / ".p.old")
    os.rename(d, tmp_path / ".p.old")
    new_pipe.save(tmp_path / "staged")
    _flip(tmp_path / "staged" / "dit.safetensors")
    os.rename(tmp_path / "staged", tmp_path / ".p.new-x2")
    with pytest.warns(UserWarning, match=r"recovered it from .*\.p\.old"):
        assert _same(VideoPipeline.load(d), new_pipe)                 # .p.old held the new pipeline here

    # the next save cleans up what the crashes left
    old_pipe.save(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert _same(VideoPipeline.load(d), old_pipe)


def test_a_failed_second_rename_puts_the_previous_pipeline_back(tmp_path, monkeypatch):
    old_pipe = _pipe(0)
    d = old_pipe.save(tmp_path / "p")
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(pipeline_mod.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk full"):
        _pipe(1).save(d)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert _same(VideoPipeline.load(d), old_pipe)


# ----------------------------------------------------------------------------------------------
# other files


def test_read_helpers_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.json' is missing: expected a thing"):
        read_json(tmp_path / "nothing.json", "a thing")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptFileError, match=r"bin\.json' is not UTF-8"):
        read_json(tmp_path / "bin.json", "a thing")
    with pytest.raises(FileNotFoundError, match=r"w\.safetensors' is missing: expected a safetensors file with"):
        load_safetensors(tmp_path / "w.safetensors", "weights")
    assert issubclass(CorruptFileError, ValueError) and _files.CorruptFileError is CorruptFileError


def test_a_directory_that_is_not_a_tokenizer_names_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{tmp_path.name}' is not a tokenizer directory: expected one of"):
        T5TextEncoder(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{tmp_path.name}' holds no readable T5/umT5 tokenizer"):
        T5TextEncoder(str(tmp_path))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=r"tok' holds no readable T5/umT5 tokenizer"):
        T5TextEncoder(str(tmp_path), tokenizer_path=str(tok))


def test_no_verify_flag_reaches_the_loads(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_load(directory, *, device=None, verify=True):
        seen.append(verify)
        raise FileNotFoundError(f"{directory}: stop here")

    monkeypatch.setattr(VideoPipeline, "load", staticmethod(fake_load))
    base = ["generate", "--pipeline", str(tmp_path / "p"), "--prompt", "x", "--out", str(tmp_path / "o")]
    assert cli.main(base) == 2 and cli.main(base + ["--no-verify"]) == 2
    assert seen == [True, False]
    args = cli.build_parser().parse_args(["train", "--config", "r.json", "--no-verify"])
    assert args.no_verify is True


def test_diffusers_transformer_directory_with_broken_files_names_them(tmp_path):
    import diffusers
    m = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=20,
                                        in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=32,
                                        num_layers=1)
    m.save_pretrained(tmp_path, safe_serialization=True)
    VideoDiT.from_diffusers_dir(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match=r"diffusion_pytorch_model\.safetensors' is not a readable safetensors"):
        VideoDiT.from_diffusers_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "WanTra')
    with pytest.raises(CorruptFileError, match=r"config\.json' is not valid JSON .*WanTransformer3DModel config"):
        VideoDiT.from_diffusers_dir(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"index\.json' has no 'weight_map' object"):
        VideoDiT.from_diffusers_dir(tmp_path)


def test_a_garbled_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    from sora_fast.distributed.checkpoint import latest_sharded
    from sora_fast.training.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    save_sharded(run, 3, _toy(0))
    (run / "latest").write_bytes(b"\xff\xfe step_0")
    (run / "latest_dcp").write_bytes(b"\xff../dcp_step_000003")
    assert latest_checkpoint(run) == run / "step_000002"
    assert latest_sharded(run) == run / "dcp_step_000003"
