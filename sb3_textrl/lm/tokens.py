"""Tokens in and out of the LM: prompt encoding, where each row's text ends, position ids under left padding."""

from __future__ import annotations

import torch as th

__all__ = ["encode_prompt", "last_token_index", "position_ids", "right_align"]


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool, system_prompt: str | None = None) -> list[int]:
    """
    Token ids of a prompt, chat-formatted (with the generation prompt) when ``use_chat_template``.

    :param tokenizer: a Hugging Face tokenizer (with a chat template when ``use_chat_template``)
    :param prompt: the user's text
    :param use_chat_template: wrap the prompt in the tokenizer's chat template as a user message, followed by the
        assistant's generation prompt; else tokenize the plain text (with the tokenizer's special tokens, if it adds any)
    :param system_prompt: a system message before the user's, chat template only; ``None`` (default) or empty: none
    :return: the token ids, Python ints
    :raises ValueError: (from transformers) if ``use_chat_template`` and the tokenizer has no chat template
    """
    if use_chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def last_token_index(attention_mask: th.Tensor) -> th.Tensor:
    """
    Index of the last attended token of each row.

    :param attention_mask: ``(batch, length)`` int64 or bool (1/True: attended)
    :return: ``(batch,)`` int64 column indices (-1 for a row that attends to nothing)
    """
    positions = th.arange(attention_mask.shape[1], device=attention_mask.device)
    return th.where(attention_mask.bool(), positions, -1).amax(dim=1)


def position_ids(attention_mask: th.Tensor) -> th.Tensor:
    """
    Position ids that count attended tokens only (exact under left padding): an attended column gets the number of
    attended tokens before it; padding gets a value in ``[0, length)`` that no attended token reads.

    :param attention_mask: ``(batch, length)`` int64 (1: attended)
    :return: ``(batch, length)`` int64
    """
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def right_align(input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    Roll each row so that its last attended token is in the last column (keeps the mask's holes).

    :param input_ids: ``(batch, length)`` int64
    :param attention_mask: ``(batch, length)`` int64 or bool; each row attends to at least one token
    :return: ``input_ids`` and ``attention_mask`` rolled, same shapes and dtypes
    """
    width = input_ids.shape[1]
    positions = th.arange(width, device=input_ids.device)
    last = last_token_index(attention_mask)
    index = (positions[None, :] - (width - 1 - last[:, None])) % width
    return input_ids.gather(1, index), attention_mask.gather(1, index)


# --- rows that one forward pass serves (appended for sb3_textrl.policies) ---------------------------------------------

__all__ += ["covering_rows", "steps_out_of_order"]

# bound on the elements of the (chunk, batch, length) comparison that finds covering rows
_COVER_CHUNK_ELEMENTS = 1 << 24


def covering_rows(input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    Group observations that are prefixes of one another, so one forward pass serves them all.

    Under causal attention, the hidden state at the last token of row ``i`` only depends on the tokens and mask up to
    that position. Row ``j`` *covers* row ``i`` when both agree there; then row ``i``'s outputs can be read off row
    ``j``'s forward pass at the same position. All the steps of one episode are covered by its last observation.

    :param input_ids: ``(batch, length)`` int64 token ids
    :param attention_mask: ``(batch, length)`` int64 mask
    :return: ``rows``, the indices of the rows to run (``(n_rows,)``), and ``cover``, for each input row the index
        into ``rows`` of the row that covers it (``(batch,)``): the longest of those that do
    """
    batch, length = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    last = last_token_index(attention_mask)
    positions = th.arange(length, device=input_ids.device)
    best = th.empty(batch, dtype=th.long, device=input_ids.device)
    chunk = max(1, _COVER_CHUNK_ELEMENTS // max(1, batch * length))
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        mask_i = mask[start:stop, None, :]
        same = (mask_i == mask[None]) & (~mask_i | (input_ids[start:stop, None, :] == input_ids[None]))
        relevant = positions[None, None, :] <= last[start:stop, None, None]
        covers = (same | ~relevant).all(dim=-1)  # (chunk, batch): row j covers row i
        best[start:stop] = th.where(covers, lengths[None, :], -1).argmax(dim=1)
    rows, cover = th.unique(best, return_inverse=True)
    return rows, cover


def _extends(input_ids: th.Tensor, attention_mask: th.Tensor, shorter_ids: th.Tensor, shorter_mask: th.Tensor) -> th.Tensor:
    """Whether each row covers the same row of ``shorter_*`` and is one token longer: ``(batch,)`` bool."""
    positions = th.arange(attention_mask.shape[1], device=attention_mask.device)
    relevant = positions[None, :] <= last_token_index(shorter_mask)[:, None]
    same = (attention_mask == shorter_mask) & ((shorter_mask == 0) | (input_ids == shorter_ids))
    return (same | ~relevant).all(dim=1) & (attention_mask.sum(dim=1) == shorter_mask.sum(dim=1) + 1)


def steps_out_of_order(
    input_ids: th.Tensor,
    attention_mask: th.Tensor,
    cover: th.Tensor,
    continued: tuple[th.Tensor, th.Tensor] | None = None,
) -> bool:
    """
    Whether a batch of observations holds the steps of its episodes out of order, as a shuffled minibatch does, rather
    than each episode's steps one after the other.

    An episode's observations are prefixes of one another, each step one token longer. A row is *out of order* when its
    previous step (the row one token shorter that it covers) is in the batch but not right before it. In a batch of
    whole episodes in step order only a row that continues an episode begun before the batch's data can be out of
    order (another episode on the same prompt may hold its previous step): pass those rows as ``continued``. The batch
    is out of order when at least two rows are, and more rows are out of order than right after their previous step.

    :param input_ids: ``(batch, length)`` int64 token ids
    :param attention_mask: ``(batch, length)`` int64 mask
    :param cover: for each row the group of rows that one forward pass serves, ``(batch,)``: :func:`covering_rows`'s
        ``cover``
    :param continued: ``(input_ids, attention_mask)`` of the rows whose previous step may be anywhere, ``(n, length)``
    """
    lengths = attention_mask.sum(dim=1)
    # within one group of covering_rows, each row covers the shorter ones: its previous step is the one a token shorter
    keys = cover * (attention_mask.shape[1] + 2) + lengths
    known = th.unique(keys)  # sorted
    has_previous = known[th.searchsorted(known, keys - 1).clamp(max=len(known) - 1)] == keys - 1
    in_order = th.zeros_like(has_previous)
    in_order[1:] = _extends(input_ids[1:], attention_mask[1:], input_ids[:-1], attention_mask[:-1])
    rows = (has_previous & ~in_order).nonzero().flatten()
    if continued is not None and len(rows) and continued[0].shape[1] == input_ids.shape[1]:
        ids, mask = input_ids[rows, None], attention_mask[rows, None]
        other_ids, other_mask = (tensor.to(input_ids.device)[None] for tensor in continued)
        equal = ((mask == other_mask) & ((mask == 0) | (ids == other_ids))).all(dim=-1).any(dim=-1)
        rows = rows[~equal]
    return len(rows) >= 2 and len(rows) > int(in_order.sum())
