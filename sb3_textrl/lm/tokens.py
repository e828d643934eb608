"""Tokens in and out of the LM: prompt encoding, where each row's text ends, position ids under left padding."""

from __future__ import annotations

import torch as th

__all__ = ["encode_prompt", "last_token_index", "position_ids", "right_align"]


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt, chat-formatted (with the generation prompt) when ``use_chat_template``."""
    if use_chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def last_token_index(attention_mask: th.Tensor) -> th.Tensor:
    """Index of the last attended token of each row of a ``(batch, length)`` mask: ``(batch,)`` int64 (-1 if none)."""
    positions = th.arange(attention_mask.shape[1], device=attention_mask.device)
    return th.where(attention_mask.bool(), positions, -1).amax(dim=1)


def position_ids(attention_mask: th.Tensor) -> th.Tensor:
    """Position ids that count attended tokens only (exact under left padding): ``(batch, length)`` int64."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def right_align(input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Roll each row so that its last attended token is in the last column (keeps the mask's holes)."""
    width = input_ids.shape[1]
    positions = th.arange(width, device=input_ids.device)
    last = last_token_index(attention_mask)
    index = (positions[None, :] - (width - 1 - last[:, None])) % width
    return input_ids.gather(1, index), attention_mask.gather(1, index)
