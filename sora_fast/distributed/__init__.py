"""sora_fast on ``torch.distributed``: FSDP2 training, Ulysses sequence parallelism, CFG-parallel sampling.

Launch with ``torchrun`` (``sora-fast train`` / ``generate`` detect it); see :mod:`.mesh` for the
``(dp | cfg, sp)`` device mesh every feature runs on.
"""
from .cfg_parallel import CFGParallelDenoiser, make_denoiser
from .checkpoint import latest_sharded, list_sharded, load_sharded, save_sharded
from .fsdp import apply_fsdp, full_state_dict
from .mesh import ParallelMesh, check_same_on_all_ranks, init_distributed, launched_by_torchrun, make_mesh
from .packs import even_splits, select_sequences, select_timesteps, select_videos, token_shard, video_ranges
from .trainer import DistributedTrainer
from .ulysses import (
                      SequenceParallelDenoiser,
                      ShardedPackedVideos,
                      UlyssesAttention,
                      enable_sequence_parallel,
                      sequence_parallel_forward,
                      shard_videos,
                      ulysses_attention,
)

__all__ = [
    "CFGParallelDenoiser", "DistributedTrainer", "ParallelMesh", "SequenceParallelDenoiser", "ShardedPackedVideos",
    "UlyssesAttention", "apply_fsdp", "check_same_on_all_ranks", "enable_sequence_parallel", "even_splits",
    "full_state_dict", "init_distributed", "latest_sharded", "launched_by_torchrun", "list_sharded",
    "load_sharded", "make_denoiser", "make_mesh", "save_sharded", "select_sequences", "select_timesteps",
    "select_videos", "sequence_parallel_forward", "shard_videos", "token_shard", "ulysses_attention", "video_ranges",
]
