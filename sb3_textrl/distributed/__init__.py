"""Training across processes (``torchrun``): data-parallel PPO with averaged gradients, or FSDP-sharded training state.

:mod:`sb3_textrl.distributed.data_parallel` runs stock SB3 in every rank and keeps the ranks one run;
:mod:`sb3_textrl.distributed.fsdp` shards the gradients and Adam state instead (``prepare_model(model, fsdp=True)``).
Everything public of both is importable from here. See ``docs/distributed.md``.
"""

from sb3_textrl.distributed import data_parallel, fsdp
from sb3_textrl.distributed.data_parallel import *  # noqa: F403
from sb3_textrl.distributed.fsdp import *  # noqa: F403

__all__ = [*data_parallel.__all__, *fsdp.__all__]
