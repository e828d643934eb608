"""The packed rollout KV cache's pieces: its attention mask and its grouped-query attention."""

import weakref

import pytest
import torch as th
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sb3_textrl.lm.attention import packed_attention_mask, packed_sdpa_attention


def test_packed_mask_by_hand():
    # columns: a shared prefix (segment 0, positions 0-1), row A (segment 1), row B (segment 2)
    segment = th.tensor([0, 0, 1, 1, 2])
    position = th.tensor([0, 1, 2, 3, 2])
    # queries: row A's next token (position 4), row B's token at position 3; A sees the prefix, B does not
    sees = th.tensor([[1, 0], [2, 2]])
    mask = packed_attention_mask(segment, position, sees, th.tensor([4, 3]))
    assert mask.shape == (1, 1, 2, 5) and mask.dtype == th.bool
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [False, False, False, False, True]]
    # causal within a segment: a query at position 2 of row A does not see A's column at position 3
    assert packed_attention_mask(segment, position, sees[:1], th.tensor([2]))[0, 0, 0].tolist() == [1, 1, 1, 0, 0]
    additive = packed_attention_mask(segment, position, sees, th.tensor([4, 3]), attention="eager", dtype=th.float32)
    assert additive.dtype == th.float32
    assert ((additive == 0) == mask).all() and (additive[~mask] == th.finfo(th.float32).min).all()


class _Attention(th.nn.Module):
    def __init__(self, heads, kv_heads):
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True


@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4)])
def test_packed_sdpa_equals_transformers_sdpa(heads, kv_heads):
    gen = th.Generator().manual_seed(0)
    query = th.randn(1, heads, 5, 8, generator=gen)
    key, value = th.randn(2, 1, kv_heads, 11, 8, generator=gen)
    mask = th.rand(1, 1, 5, 11, generator=gen) < 0.6
    mask[..., 0] = True  # every query sees at least one column
    expected, _ = sdpa_attention_forward(_Attention(heads, kv_heads), query, key, value, mask, scaling=0.3)
    out, weights = packed_sdpa_attention(_Attention(heads, kv_heads), query, key, value, mask, scaling=0.3)
    assert weights is None and out.shape == (1, 5, heads, 8)
    th.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_layers_keep_one_attention_mask_for_backward():
    # every layer gets the same boolean mask; SDPA keeps the (additive, tiled) mask it is given for backward, so the
    # layers must all be given one tensor, not a copy each
    attention = _Attention(6, 2)
    gen = th.Generator().manual_seed(0)
    mask = th.rand(1, 1, 5, 11, generator=gen) < 0.6
    mask[..., 0] = True
    kept, outs = [], []
    with th.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        for _ in range(3):
            query = th.randn(1, 6, 5, 8, generator=gen, requires_grad=True)
            key, value = th.randn(2, 1, 2, 11, 8, generator=gen, requires_grad=True).unbind(0)
            outs.append(packed_sdpa_attention(attention, query, key, value, mask, scaling=0.3)[0])
            expected, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=0.3)
            th.testing.assert_close(outs[-1], expected, atol=1e-6, rtol=1e-5)
    masks = {t.data_ptr() for t in kept if t.shape == (1, 1, 3 * 5, 11)}
    assert len(masks) == 1
    sum(out.sum() for out in outs).backward()  # the shared mask serves every layer's backward
    assert query.grad is not None and th.isfinite(query.grad).all()
    # masks are remembered weakly: once a forward's mask is gone, nothing of it stays
    for heads in (6, 2):  # 6: tiled and converted; 2 (no grouping) with an additive mask: used as it is
        additive = th.zeros(1, 1, 5, 11)
        packed_sdpa_attention(_Attention(heads, 2), th.randn(1, heads, 5, 8), key.detach(), value.detach(), additive)
        alive = weakref.ref(additive)
        del additive
        assert alive() is None


def test_row_without_tokens_is_refused(tiny_llama_path):
    from sb3_textrl.lm.kv_cache import RolloutKVCache
    from sb3_textrl.lm.loading import load_causal_lm

    cache = RolloutKVCache(load_causal_lm(tiny_llama_path))
    ids = th.tensor([[0, 5, 6], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"rows \[1\] attend to no token"):
        cache.last_hidden(ids, (ids != 0).long())
