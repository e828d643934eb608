"""Training across processes (``torchrun``): data-parallel PPO with averaged gradients, or FSDP-sharded training state.

:mod:`sb3_textrl.distributed.data_parallel` runs stock SB3 in every rank and keeps the ranks one run;
:mod:`sb3_textrl.distributed.fsdp` shards the gradients and Adam state instead (``prepare_model(model, fsdp=True)``).
See ``docs/distributed.md``.
"""

from sb3_textrl.distributed.data_parallel import (
    BUCKET_ELEMENTS,
    DistributedCallback,
    DistributedEpisodeRolloutBuffer,
    GradientAverager,
    barrier,
    broadcast_module,
    check_in_sync,
    cleanup_distributed,
    is_main_process,
    launched_distributed,
    prepare_model,
    rank,
    rank_seed,
    reseed_replica,
    setup_distributed,
    split_minibatches,
    world_size,
)
from sb3_textrl.distributed.fsdp import ShardedPolicy, check_fsdp_policy

__all__ = [
    "BUCKET_ELEMENTS",
    "DistributedCallback",
    "DistributedEpisodeRolloutBuffer",
    "GradientAverager",
    "ShardedPolicy",
    "barrier",
    "broadcast_module",
    "check_fsdp_policy",
    "check_in_sync",
    "cleanup_distributed",
    "is_main_process",
    "launched_distributed",
    "prepare_model",
    "rank",
    "rank_seed",
    "reseed_replica",
    "setup_distributed",
    "split_minibatches",
    "world_size",
]
