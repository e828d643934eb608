"""The language model's side, in torch and transformers only (no SB3 import): loading a causal LM and its tokenizer,
token bookkeeping, and the machinery that makes one token per env step cheap to sample and to train on.

- :mod:`~sb3_textrl.lm.loading`: model ids, GGUF files and local paths to a model, a tokenizer, EOS ids.
- :mod:`~sb3_textrl.lm.tokens`: prompt encoding, last-token indices, position ids under left padding.
- :mod:`~sb3_textrl.lm.log_probs`: LM-head logits, log-probabilities, entropy and sampling.
- :mod:`~sb3_textrl.lm.attention`: SDPA over packed rows (several sequences in one row) and its 4D mask.
- :mod:`~sb3_textrl.lm.kv_cache`: the KV cache carried across rollout steps.
- :mod:`~sb3_textrl.lm.prefix_sharing`: the prompt opening every row shares, run once.
- :mod:`~sb3_textrl.lm.packing`: training forwards over episodes bin-packed into rows.
- :mod:`~sb3_textrl.lm.weight_prepacking`: oneDNN-prepacked copies of the linear layers' weights for rollouts.
- :mod:`~sb3_textrl.lm.activation_checkpointing`, :mod:`~sb3_textrl.lm.lean_activations`: less memory kept for backward.
- :mod:`~sb3_textrl.lm.optim`: Adam's state made before the first step.
"""

__all__: list[str] = []
