"""``python -m sora_fast.bench``: the same as ``sora-fast bench``."""
import sys

from .runner import main

sys.exit(main(prog="python -m sora_fast.bench"))
