"""Prefix sharing: rows that open with the same tokens give the same results as full forwards."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_textrl.lm import kv_cache
from sb3_textrl.lm.prefix_sharing import shared_prefix_length, split_prefix
from sb3_textrl.policies import LMPolicy

SYSTEM_PROMPT = "You are a helpful assistant who writes short sentences."
# prompts with a long common opening, so that the LMs without a chat template (GPT-2) share a prefix too
PROMPTS = [
    "Please answer in one short sentence: write one sentence about rain.",
    "Please answer in one short sentence: hi",
    "Please answer in one short sentence: the sun",
]


def test_shared_prefix_by_hand():
    pad = 0
    ids = th.tensor(
        [
            [pad, pad, 5, 6, 7, 8, 9, 1, 2],  # left padding, as the env's prompts
            [5, 6, 7, 8, 9, 3, pad, pad, pad],  # right padding, as a finished observation
            [pad, 5, 6, 7, 8, 9, 4, 4, pad],
        ]
    )
    mask = (ids != pad).long()
    assert shared_prefix_length(ids, mask, min_length=5) == 5
    assert shared_prefix_length(ids, mask, min_length=6) == 0  # too short to count
    assert shared_prefix_length(ids[:1], mask[:1], min_length=1) == 0  # one row shares with nobody
    # a row must keep at least one token of its own
    assert shared_prefix_length(ids[[0, 0]], mask[[0, 0]], min_length=1) == 6
    holes = mask.clone()
    holes[0, 4] = 0
    assert shared_prefix_length(ids, holes, min_length=1) == 0
    prefix, suffix_ids, suffix_mask, offset = split_prefix(ids, mask, 5)
    assert prefix.tolist() == [5, 6, 7, 8, 9]
    assert suffix_ids.tolist() == [[1, 2], [3, 0], [4, 4]]
    assert suffix_mask.tolist() == [[1, 1], [1, 0], [1, 1]]
    assert offset.tolist() == [7, 5, 6]  # column c of row i is suffix column c - offset[i]


def _env(path, system_prompt):
    kwargs = dict(model_name_or_path=path, prompts=PROMPTS, reward_fn=lambda p, c: [0.0] * len(c), max_new_tokens=4)
    if system_prompt:
        kwargs["system_prompt"] = system_prompt
    return gym.make("sb3_textrl/TextGeneration-v0", **kwargs)


def _policies(env):
    shared, plain = (
        LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, prefix_sharing=flag, use_kv_cache=flag)
        for flag in (True, False)
    )
    with th.no_grad():
        for policy in (shared, plain):
            th.nn.init.normal_(policy.value_head.weight, std=1.0, generator=th.Generator().manual_seed(0))
    return shared, plain


def _steps(env, n_episodes, n_prompts=None):
    n_prompts = n_prompts or len(PROMPTS)
    rng = np.random.default_rng(0)
    steps = []
    for e in range(n_episodes):
        obs, _ = env.reset(seed=e, options={"prompt_index": e % n_prompts})
        done = False
        while not done:
            action = int(rng.integers(3, env.action_space.n))
            steps.append((obs, action))
            obs, _, done, _, _ = env.step(action)
    obs = {key: th.as_tensor(np.stack([o[key] for o, _ in steps])) for key in ("input_ids", "attention_mask")}
    return obs, th.as_tensor([a for _, a in steps])


def _training_results(policy, obs, actions):
    """Values, log-probs, entropies, the LM's gradients of their sum, and reference log-probs."""
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    (log_prob.sum() + values.sum() + entropy.sum()).backward()
    grads = [p.grad.clone() for p in policy.lm.parameters() if p.grad is not None]
    return values.detach(), log_prob.detach(), entropy.detach(), grads, policy.reference_log_prob(obs, actions)


def _assert_same_results(first, second):
    (v1, lp1, e1, g1, r1), (v2, lp2, e2, g2, r2) = first, second
    th.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    th.testing.assert_close(lp1, lp2, atol=1e-5, rtol=1e-5)
    th.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-5)
    th.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        th.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT, None], ids=["system_prompt", "plain"])
def test_training_path_equals_full_forwards(tiny_lm_path, system_prompt):
    """evaluate_actions, reference log-probs and the gradients are those of full forwards."""
    env = _env(tiny_lm_path, system_prompt)
    shared, plain = _policies(env)
    obs, actions = _steps(env, 5)
    input_ids, attention_mask = obs["input_ids"], obs["attention_mask"]
    assert shared_prefix_length(input_ids, attention_mask) >= 8  # the path under test is taken
    results = []
    for policy in (shared, plain):
        results.append(_training_results(policy, obs, actions))
    _assert_same_results(*results)


@pytest.mark.parametrize("packed", [True, False])
def test_episodes_on_one_prompt(tiny_lm_path, packed):
    """Episodes on the same prompt share it whole: their first observations (the prompt) are read right too."""
    env = _env(tiny_lm_path, SYSTEM_PROMPT)
    shared, plain = _policies(env)
    shared.packing = plain.packing = packed
    obs, actions = _steps(env, 3, n_prompts=1)
    input_ids, attention_mask = obs["input_ids"], obs["attention_mask"]
    first = attention_mask.sum(dim=1) == attention_mask.sum(dim=1).min()  # the episodes' first observations
    # the later observations share the whole prompt: a prefix that long would hold the first ones' last token
    later = shared_prefix_length(input_ids[~first], attention_mask[~first])
    assert int(first.sum()) == 3 and later >= int(attention_mask[first][0].sum())
    assert shared_prefix_length(input_ids, attention_mask) >= 8  # a shared prefix is used: the path under test
    _assert_same_results(*(_training_results(policy, obs, actions) for policy in (shared, plain)))


@pytest.mark.parametrize("max_packed_prefill", [256, 0])  # 0: new rows run as a padded batch after the prefix
def test_rollout_path_equals_full_forwards(tiny_lm_path, max_packed_prefill, monkeypatch):
    """Rows that reset mid-rollout run only what follows the shared prefix; results equal full forwards."""
    monkeypatch.setattr(kv_cache, "_MAX_PACKED_PREFILL", max_packed_prefill)
    env = make_vec_env(lambda: _env(tiny_lm_path, SYSTEM_PROMPT), n_envs=3, seed=0)
    shared, plain = _policies(env)
    shared.set_training_mode(False)
    eos = shared.tokenizer.eos_token_id
    rng = np.random.default_rng(0)
    obs = env.reset()
    n_resets = 0
    for _ in range(20):
        obs_t, _ = shared.obs_to_tensor(obs)
        with th.no_grad():
            distribution, values = shared.distribution_and_values(obs_t)  # rollout path: KV cache
            cached_logits = distribution.distribution.logits.clone()
            expected, expected_values = plain.distribution_and_values(obs_t)
        th.testing.assert_close(cached_logits, expected.distribution.logits, atol=1e-4, rtol=0)
        th.testing.assert_close(values, expected_values, atol=1e-4, rtol=0)
        actions = np.where(rng.random(3) < 0.25, eos, rng.integers(3, 300, 3))
        obs, _, dones, _ = env.step(actions)
        n_resets += dones.sum()
    assert n_resets >= 4
    assert [len(prefix) >= 8 for prefix in shared.kv_cache.prefix_layers] == [True]  # the path under test was taken
    # restarts on a prompt already seen reuse its keys and values: at most one entry per prompt and first observation
    assert n_resets + 3 > len(shared.kv_cache.rows_seen)
