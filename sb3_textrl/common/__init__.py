"""The SB3 pieces every algorithm shares: spaces, rollout buffers, the KL penalty, callbacks, evaluation, the
vectorized text env, input validation, plotting and resumable training checkpoints.

Import from the modules (``sb3_textrl.common.callbacks``...) or from :mod:`sb3_textrl` itself, which re-exports the
main classes; this package exports nothing of its own.
"""

__all__: list[str] = []
