"""Numerical safety: NaN/inf logits never reach the sampler; bf16 autocast keeps logits and log-probs in float32."""

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3 import PPO

from sb3_textrl import LMPolicy


def _env(path):
    return gym.make("sb3_textrl/TextGeneration-v0", model_name_or_path=path, prompts=["the sun is good"], max_new_tokens=4)


@pytest.mark.parametrize("cached", [True, False])
def test_nan_logits_raise_before_sampling(tiny_llama_path, cached):
    env = _env(tiny_llama_path)
    policy = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, use_kv_cache=cached)
    policy.set_training_mode(False)
    obs, _ = policy.obs_to_tensor(env.reset(seed=0)[0])
    with th.no_grad():
        policy.lm.get_output_embeddings().weight[5, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"NaN or infinite logits.*rows \[0\]"):
            policy(obs)
        policy.lm.get_output_embeddings().weight[5, 0] = float("inf")
        with pytest.raises(FloatingPointError, match="learning rate"):
            policy.predict({k: v.numpy() for k, v in obs.items()})


def test_nan_in_training_raises(tiny_llama_path):
    model = PPO("LMPolicy", _env(tiny_llama_path), n_steps=8, batch_size=8, learning_rate=1e-3)
    model.learn(8)
    with th.no_grad():
        next(model.policy.lm.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        model.learn(8)


def test_autocast_bfloat16_keeps_float32_outputs(tiny_llama_path):
    env = _env(tiny_llama_path)
    policy = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, autocast_dtype="bfloat16")
    reference = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3)
    obs, _ = policy.obs_to_tensor(env.reset(seed=0)[0])
    actions = th.tensor([3])
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    assert values.dtype == log_prob.dtype == entropy.dtype == th.float32
    _, exact, _ = reference.evaluate_actions(obs, actions)
    assert th.allclose(log_prob, exact, atol=0.05)  # bf16 trunk: close, not equal
    assert not th.equal(log_prob, exact)  # the trunk really ran in bf16
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, policy_kwargs=dict(autocast_dtype="bfloat16"))
    model.learn(16)


def test_bad_autocast_dtype(tiny_llama_path):
    env = _env(tiny_llama_path)
    with pytest.raises(ValueError, match="autocast_dtype"):
        LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, autocast_dtype="int8")


@pytest.mark.parametrize("emulated", [True, False])
def test_autocast_warns_where_the_cpu_emulates_the_dtype(tiny_llama_path, monkeypatch, emulated):
    import warnings

    from sb3_textrl import policies

    monkeypatch.setattr(policies, "_emulated_on_cpu", lambda dtype: emulated)
    env = _env(tiny_llama_path)
    policy = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, autocast_dtype="bfloat16")
    obs, _ = policy.obs_to_tensor(env.reset(seed=0)[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.evaluate_actions(obs, th.tensor([3]))
    messages = [str(w.message) for w in caught if "emulated" in str(w.message)]
    assert len(messages) == (1 if emulated else 0)
    assert not emulated or "autocast_dtype=None" in messages[0]
