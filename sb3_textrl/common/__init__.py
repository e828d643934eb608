"""The SB3 pieces every algorithm shares: spaces, rollout buffers, the KL penalty, callbacks, evaluation, the
vectorized text env, input validation, plotting and resumable training checkpoints; and for the group methods
(GRPO, RLOO), the group advantages, the grouped vec env, its buffers and the algorithm base class (``group_*``).

Import from the modules (``sb3_textrl.common.callbacks``...) or from :mod:`sb3_textrl` itself, which re-exports the
main classes; this package exports nothing of its own.
"""

__all__: list[str] = []
