"""The rollout KV cache as the policy uses it: eval-mode calls without gradients equal full forwards, whatever the
sequence of observations, and the cache is dropped whenever the weights may have changed."""

import copy

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from test_policy import collect_episodes, make_env, make_policy, stack

from sb3_textrl.lm import kv_cache
from sb3_textrl.lm.kv_cache import RolloutKVCache


def fresh_distribution(policy, obs):
    """Logits and values from a full forward pass (gradients on: the rollout KV cache is not used)."""
    with th.enable_grad():
        distribution, values = policy.distribution_and_values(obs)
    return distribution.distribution.logits.detach(), values.detach()


@pytest.mark.parametrize(
    "n_envs, attn_implementation, max_packed_prefill",
    [(1, "sdpa", 256), (3, "sdpa", 256), (3, "eager", 256), (3, "sdpa", 0)],  # 0: new rows run as a padded batch
)
def test_kv_cache_matches_full_forward(tiny_lm_path, n_envs, attn_implementation, max_packed_prefill, monkeypatch):
    monkeypatch.setattr(kv_cache, "_MAX_PACKED_PREFILL", max_packed_prefill)
    env = make_vec_env(lambda: make_env(tiny_lm_path, max_new_tokens=4), n_envs=n_envs, seed=0)
    policy = make_policy(env, model_kwargs=dict(attn_implementation=attn_implementation))
    assert policy.lm.config._attn_implementation == attn_implementation
    policy.set_training_mode(False)  # as in a rollout: the cache serves eval-mode calls without gradients
    assert policy.use_kv_cache
    with th.no_grad():
        th.nn.init.normal_(policy.value_head.weight, std=1.0)
    eos = policy.tokenizer.eos_token_id
    rng = np.random.default_rng(0)
    obs = env.reset()
    n_resets = 0
    for _ in range(30):
        obs_t, _ = policy.obs_to_tensor(obs)
        with th.no_grad():  # the rollout path: incremental forwards on the KV cache
            distribution, values = policy.distribution_and_values(obs_t)
        cached_logits = distribution.distribution.logits  # SB3 reuses the distribution object: keep the tensor
        logits, expected_values = fresh_distribution(policy, obs_t)
        th.testing.assert_close(cached_logits, logits, atol=1e-4, rtol=0)
        th.testing.assert_close(values, expected_values, atol=1e-4, rtol=0)
        assert policy.kv_cache.length > 0  # the cached path was taken
        # random tokens, with early EOS: episodes of different lengths and resets at different steps
        actions = np.where(rng.random(n_envs) < 0.2, eos, rng.integers(3, 300, n_envs))
        obs, _, dones, _ = env.step(actions)
        n_resets += dones.sum()
    assert n_resets >= 5


def test_kv_cache_one_forward_for_steps_and_restarts(tiny_llama_path):
    """A call where some envs take a step and others restart runs one forward, over the new tokens only (packed)."""
    env = make_env(tiny_llama_path, max_new_tokens=4)
    policy = make_policy(env, prefix_sharing=False)  # row 1 then runs all its tokens
    policy.set_training_mode(False)  # as in a rollout
    steps = [step for episode in collect_episodes(env, 3) for step in episode]
    first, second = stack([steps[0], steps[1]])[0], stack([steps[1], steps[len(steps) // 2]])[0]
    assert first["input_ids"].shape == second["input_ids"].shape
    calls = []
    hook = policy.lm.base_model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    with th.no_grad():
        policy.get_distribution(first)  # fills the cache
        calls.clear()
        logits = policy.get_distribution(second).distribution.logits  # row 0 takes a step, row 1 is a new episode
    hook.remove()
    n_new = 1 + int(second["attention_mask"][1].sum())  # row 0's new token, all of row 1's tokens
    assert calls == [(1, n_new)]
    th.testing.assert_close(logits, fresh_distribution(policy, second)[0], atol=1e-4, rtol=0)


def test_kv_cache_any_sequence_of_observations(tiny_llama_path):
    env = make_env(tiny_llama_path, max_new_tokens=4)
    policy = make_policy(env)
    policy.set_training_mode(False)
    steps = [step for episode in collect_episodes(env, 4) for step in episode]
    rng = np.random.default_rng(1)
    for _ in range(12):  # batches of unrelated observations, some repeated, some one token longer
        batch = [steps[i] for i in rng.choice(len(steps), size=3)]
        obs, _ = stack(batch)
        with th.no_grad():
            logits = policy.get_distribution(obs).distribution.logits
        th.testing.assert_close(logits, fresh_distribution(policy, obs)[0], atol=1e-4, rtol=0)
        assert policy.kv_cache.length > 0


def test_kv_cache_reset_on_weight_updates(tiny_llama_path):
    env = make_env(tiny_llama_path)
    policy = make_policy(env)
    obs, actions = stack([step for episode in collect_episodes(env, 1) for step in episode][:2])

    def check():
        with th.no_grad():
            cached = policy.get_distribution(obs).distribution.logits
        th.testing.assert_close(cached, fresh_distribution(policy, obs)[0], atol=1e-5, rtol=0)

    check()
    # an optimizer step
    policy.set_training_mode(False)
    loss = -policy.evaluate_actions(obs, actions)[1].mean()
    policy.optimizer.zero_grad()
    loss.backward()
    policy.optimizer.step()
    check()
    # loading weights
    state = {k: v + 0.01 for k, v in policy.state_dict().items()}
    policy.load_state_dict(state)
    check()
    # switching to training mode (weights may change in place after it)
    with th.no_grad():
        policy.lm.get_input_embeddings().weight.mul_(1.5)
    policy.set_training_mode(True)
    policy.set_training_mode(False)
    check()


def test_kv_cache_after_in_place_weight_change(tiny_llama_path):
    env = make_env(tiny_llama_path)
    policy = make_policy(env)
    policy.set_training_mode(False)
    obs, _ = stack([step for episode in collect_episodes(env, 1) for step in episode][:2])
    with th.no_grad():
        policy.get_distribution(obs)
        assert policy.kv_cache.length > 0
        for param in policy.lm.parameters():
            param.data = param.data + 0.05 * th.randn_like(param)
        cached = policy.get_distribution(obs).distribution.logits
    th.testing.assert_close(cached, fresh_distribution(policy, obs)[0], atol=1e-4, rtol=0)


def test_no_kv_cache(tiny_llama_path):
    env = make_env(tiny_llama_path)
    cached, uncached = make_policy(env), make_policy(env, use_kv_cache=False)
    assert uncached._get_constructor_parameters()["use_kv_cache"] is False
    cached.set_training_mode(False)  # as in a rollout, where the cache serves
    uncached.set_training_mode(False)
    steps = [step for episode in collect_episodes(env, 2) for step in episode]
    for obs_np, action in steps:
        obs = {key: th.as_tensor(value[None]) for key, value in obs_np.items()}
        with th.no_grad():
            a = cached.evaluate_actions(obs, th.tensor([action]))
            b = uncached.evaluate_actions(obs, th.tensor([action]))
        for x, y in zip(a, b):
            th.testing.assert_close(x, y, atol=1e-5, rtol=0)
        assert cached.kv_cache.length > 0 and uncached.kv_cache.length == 0


def repeat_then_extend(policy, env, n_repeats):
    obs, _ = env.reset(seed=0)
    for _ in range(n_repeats):
        policy.predict(obs, deterministic=True)
    obs, *_ = env.step(100)
    obs_t, _ = policy.obs_to_tensor(obs)
    with th.no_grad():
        cached = policy.get_distribution(obs_t).distribution.logits
    return cached, fresh_distribution(policy, obs_t)[0]


def test_kv_cache_repeated_observation_stays_correct(tiny_llama_path):
    env = make_env(tiny_llama_path)
    cached, fresh = repeat_then_extend(make_policy(env), env, n_repeats=40)
    th.testing.assert_close(cached, fresh, atol=1e-4, rtol=0)


def test_kv_cache_repeated_observation_bounded(tiny_llama_path):
    env = make_env(tiny_llama_path)
    policy = make_policy(env)
    repeat_then_extend(policy, env, n_repeats=40)
    # the cache never needs more columns than an observation has
    assert policy.kv_cache.length <= env.unwrapped.max_length


def test_kv_cache_of_deepcopied_policy(tiny_llama_path):
    env = make_env(tiny_llama_path)
    policy = make_policy(env)
    obs, actions = stack([step for episode in collect_episodes(env, 1) for step in episode][:2])
    policy.set_training_mode(False)
    clone = copy.deepcopy(policy)
    assert clone.optimizer is not policy.optimizer
    with th.no_grad():
        clone.get_distribution(obs)  # fills the copy's cache
    assert clone.kv_cache.length > 0 and policy.kv_cache.length == 0
    loss = -clone.evaluate_actions(obs, actions)[1].mean()
    clone.optimizer.zero_grad()
    loss.backward()
    clone.optimizer.step()
    assert all(p.grad is None for p in clone.parameters())  # the copy's optimizer kept the policy's post-step hook
    with th.no_grad():
        cached = clone.get_distribution(obs).distribution.logits
    th.testing.assert_close(cached, fresh_distribution(clone, obs)[0], atol=1e-4, rtol=0)


def test_kv_cache_public_api(tiny_llama_path):
    """``kv_cache`` is the policy's cache, read-only; ``reset_kv_cache()`` drops what it holds."""
    env = make_env(tiny_llama_path)
    policy = make_policy(env)
    policy.set_training_mode(False)
    assert isinstance(policy.kv_cache, RolloutKVCache) and policy.kv_cache is policy.kv_cache
    with pytest.raises(AttributeError):
        policy.kv_cache = RolloutKVCache(policy.lm)
    obs, _ = stack([step for episode in collect_episodes(env, 1) for step in episode][:2])
    with th.no_grad():
        policy.get_distribution(obs)
    assert policy.kv_cache.length > 0 and policy.kv_cache.rows_seen
    policy.reset_kv_cache()
    assert policy.kv_cache.length == 0 and not policy.kv_cache.rows_seen and not policy.kv_cache.linears.packed
    with th.no_grad():  # runs in full again, with the same results
        logits = policy.get_distribution(obs).distribution.logits
    th.testing.assert_close(logits, fresh_distribution(policy, obs)[0], atol=1e-5, rtol=0)
