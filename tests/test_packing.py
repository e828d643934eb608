"""Packed training and reference passes (sb3_textrl.lm.packing): bin packing, episodes on one prompt grouped under
their opening, and results equal to padded passes."""

import random

import pytest
import torch as th
from test_prefix_sharing import SYSTEM_PROMPT, _assert_same_results, _env, _policies, _steps, _training_results

from sb3_textrl import policies
from sb3_textrl.lm import packing
from sb3_textrl.lm.prefix_sharing import prefix_cache
from sb3_textrl.policies import LMPolicy


def test_pack_by_hand():
    # 14 tokens need 3 bins of 6; first fit by decreasing length into 3 bins of 5 tokens: 5 | 4 | 3 + 2 (bins of 6
    # would be 5 | 4 + 2 | 3, each padded to 6)
    assert packing.pack([5, 3, 4, 2], max_tokens=6) == [[0], [2], [1, 3]]
    # 22 tokens: 2 bins of 11 cannot hold 6, 6, 6, 4 (6 | 6 | 6 + 4), 2 bins of 12 can
    assert packing.pack([6, 6, 6, 4], max_tokens=12) == [[0, 1], [2, 3]]
    assert packing.pack([9, 2, 5], max_tokens=6) == [[0], [2, 1]]  # a longer row widens every bin: 5 + 2 fit in 9
    assert packing.pack([1, 1, 1], max_tokens=2) == [[0, 1], [2]]
    assert packing.pack([], max_tokens=6) == []


def test_pack_no_more_rows_than_first_fit():
    """Every row placed once, no bin over its limit, and never more bins than first fit into full-size bins."""
    rng = random.Random(0)
    for _ in range(500):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 30))]
        max_tokens = rng.choice([64, 200, 256])
        bins = packing.pack(lengths, max_tokens)
        limit = max(max_tokens, *lengths)
        assert sorted(row for b in bins for row in b) == list(range(len(lengths)))
        assert max(sum(lengths[row] for row in b) for b in bins) <= limit
        assert len(bins) <= len(packing._first_fit(lengths, limit))


def test_group_openings_by_hand():
    ids = th.tensor(
        [
            [1, 2, 3, 4, 9, 0],
            [5, 6, 7, 8, 9, 9],
            [1, 2, 3, 4, 8, 0],
            [1, 2, 3, 7, 7, 7],
            [5, 6, 7, 8, 8, 0],
        ]
    )
    lengths, limits = th.tensor([5, 6, 5, 6, 5]), th.tensor([6, 6, 6, 6, 6])
    # sorted: rows 0 2 3 | 1 4; rows 0 and 2 share 4 tokens, row 3 only 3 of them
    assert packing.group_openings(ids, lengths, limits, min_length=4) == [([2, 0], 4), ([4, 1], 4)]
    assert packing.group_openings(ids, lengths, limits, min_length=3) == [([2, 0, 3], 3), ([4, 1], 4)]
    # a row read at its 3rd token (a shorter observation it covers) shares at most 2 tokens: rows 0 and 3 group instead
    assert packing.group_openings(ids, lengths, th.tensor([6, 6, 2, 6, 6]), min_length=3) == [([0, 3], 3), ([4, 1], 4)]
    assert packing.group_openings(ids[:1], lengths[:1], limits[:1], min_length=1) == []


@pytest.mark.parametrize("prefix", ["leads_rows", "apart"])
@pytest.mark.parametrize("max_tokens", [256, 8], ids=["one_packed_row", "many_packed_rows"])
@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT, None], ids=["system_prompt", "plain"])
def test_episodes_grouped_by_prompt(tiny_lm_path, system_prompt, max_tokens, prefix, monkeypatch):
    """Episodes on the same prompt run its tokens once per pass (a group's opening); results equal full forwards."""
    monkeypatch.setattr(packing, "MAX_PACKED_TOKENS", max_tokens)
    monkeypatch.setattr(packing, "prefix_leads", lambda p, _: p > 0 and prefix == "leads_rows")
    groups = []
    group_openings = packing.group_openings
    monkeypatch.setattr(packing, "group_openings", lambda *a: groups.append(group_openings(*a)) or groups[-1])
    env = _env(tiny_lm_path, system_prompt)
    shared, plain = _policies(env)
    obs, actions = _steps(env, 6, n_prompts=2)  # three episodes on each of two prompts
    _assert_same_results(*(_training_results(policy, obs, actions) for policy in (shared, plain)))
    # the training and reference passes of the policy with prefix sharing grouped the three episodes on the long prompt
    # (the other, "hi", opens with too few tokens of its own)
    assert [[len(rows) for rows, _ in found] for found in groups[:2]] == [[3], [3]]
    assert all(n >= packing.MIN_GROUP_OPENING for found in groups[:2] for _, n in found)


@pytest.mark.parametrize("prefix", ["leads_rows", "apart"])
@pytest.mark.parametrize("max_tokens", [256, 8], ids=["one_packed_row", "many_packed_rows"])
@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT, None], ids=["system_prompt", "plain"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_passes_equal_padded_ones(tiny_lm_path, system_prompt, max_tokens, attention, prefix, monkeypatch):
    """evaluate_actions, reference log-probs and the gradients are the same packed as padded, with the shared prefix
    at the head of every packed row or run apart."""
    monkeypatch.setattr(packing, "MAX_PACKED_TOKENS", max_tokens)
    monkeypatch.setattr(packing, "prefix_leads", lambda p, _: p > 0 and prefix == "leads_rows")
    calls, apart = [], []
    monkeypatch.setattr(policies, "forward_packed", lambda *a, **k: calls.append(a) or packing.forward_packed(*a, **k))
    monkeypatch.setattr(packing, "prefix_cache", lambda *a: apart.append(a) or prefix_cache(*a))
    env = _env(tiny_lm_path, system_prompt)
    results = []
    for packed in (True, False):
        policy = LMPolicy(
            env.observation_space,
            env.action_space,
            lambda _: 1e-3,
            packing=packed,
            model_kwargs=dict(attn_implementation=attention),
        )
        with th.no_grad():
            th.nn.init.normal_(policy.value_head.weight, std=1.0, generator=th.Generator().manual_seed(0))
        obs, actions = _steps(env, 6)
        results.append(_training_results(policy, obs, actions))
    assert len(calls) == 2  # the training pass and the reference pass ran packed
    _, _, mask, _, _, p = calls[0]
    lengths = (mask.sum(dim=1) - p).tolist()
    lead = p if prefix == "leads_rows" else 0
    assert (len(packing.pack(lengths, max_tokens - lead)) > 1) == (max_tokens == 8)
    assert len(apart) == (2 if p and prefix == "apart" else 0)  # the prefix ran apart in both passes, or in no pass
    _assert_same_results(*results)
