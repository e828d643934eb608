"""The SB3 pieces every algorithm shares: spaces, rollout buffers, the KL penalty, callbacks, evaluation, the
vectorized text env, input validation, plotting and resumable training checkpoints."""
