"""Reading an attention mask: where each row's text ends, and the position ids that left padding needs."""

from __future__ import annotations

import torch as th


def last_token_index(attention_mask: th.Tensor) -> th.Tensor:
    """Index of the last attended token of each row of a ``(batch, length)`` mask: ``(batch,)`` int64 (-1 if none)."""
    positions = th.arange(attention_mask.shape[1], device=attention_mask.device)
    return th.where(attention_mask.bool(), positions, -1).amax(dim=1)


def position_ids(attention_mask: th.Tensor) -> th.Tensor:
    """Position ids that count attended tokens only (exact under left padding): ``(batch, length)`` int64."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
