"""The observation space of text environments: token ids plus an attention mask, tagged with the LM they are for."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

__all__ = ["TokenObservationSpace"]


class TokenObservationSpace(spaces.Dict):
    """
    ``Dict(input_ids=Box(0, vocab_size - 1, (max_length,), int64), attention_mask=Box(0, 1, (max_length,), int64))``.

    The mask tells real tokens from padding, so it stays exact when ``pad_token_id == eos_token_id``.
    The space also records ``model_name_or_path``, the LM the environment tokenizes for, so that
    ``PPO("LMPolicy", env)`` can build the same LM without ``policy_kwargs``.

    :param max_length: number of token slots of an observation
    :param vocab_size: number of token ids (the LM's logits width): ids are in ``[0, vocab_size)``
    :param model_name_or_path: the LM (alias or local path) the token ids belong to (default: not recorded)
    :param seed: seed of the space's own sampler (``spaces.Dict``'s ``seed``; default: random)
    """

    def __init__(self, max_length: int, vocab_size: int, model_name_or_path: str | None = None, seed=None):
        super().__init__(
            {
                "input_ids": spaces.Box(0, vocab_size - 1, (max_length,), np.int64),
                "attention_mask": spaces.Box(0, 1, (max_length,), np.int64),
            },
            seed=seed,
        )
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        self.model_name_or_path = model_name_or_path
