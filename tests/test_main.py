"""`python -m sora_fast`: the install check a newcomer runs first."""
import subprocess
import sys

from sora_fast.__main__ import main, self_check


def test_self_check_packed_equals_alone():
    assert self_check(seed=3) < 1e-5


def test_main_prints_backends_and_passes(capsys):
    assert main(["--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "spacetime_attention" in out and "torch" in out
    assert "self-check" in out and "OK" in out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "sora_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--seed" in proc.stdout
