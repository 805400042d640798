"""The memory plan of a fine-tune (python -m sora_fast.tools.memory): measured saved activations grow linearly
in blocks and shrink with checkpointing; the plan's weights and optimizer bytes follow the parameter count."""
from sora_fast.models.dit import DiTConfig, VideoDiT
from sora_fast.tools.memory import main, memory_plan, saved_activations


def test_saved_activations_linear_in_blocks_and_checkpointing_saves():
    cfg = DiTConfig.from_name("tiny")
    plain = [saved_activations(cfg, 128, checkpointing=False, layers=k) for k in (1, 2, 3)]
    ckpt = [saved_activations(cfg, 128, checkpointing=True, layers=k) for k in (1, 2, 3)]
    assert plain[2] - plain[1] == plain[1] - plain[0] > 0
    assert ckpt[2] - ckpt[1] == ckpt[1] - ckpt[0] > 0
    assert ckpt[1] - ckpt[0] < (plain[1] - plain[0]) / 4


def test_plan_and_cli(capsys):
    r = memory_plan("tiny", 128)
    n = sum(p.numel() for p in VideoDiT(DiTConfig.from_name("tiny")).parameters())
    assert r["params"] == n and r["weights"] == 2 * n and r["grads_optimizer"] == 12 * n
    assert r["activations_per_1k_tokens_checkpointed"] < r["activations_per_1k_tokens"]
    lora = memory_plan("tiny", 128, lora_rank=4)
    assert 0 < lora["grads_optimizer"] < r["grads_optimizer"]
    assert main(["--preset", "tiny", "--tokens", "128"]) == 0
    assert "| tiny |" in capsys.readouterr().out
