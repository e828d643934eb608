import os
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import ENV_ID, PROMPTS
from stable_baselines3 import PPO
from transformers import AutoModelForCausalLM, AutoTokenizer

import sb3_textrl
from sb3_textrl.policies import LMPolicy


def completion_length(prompts, completions):
    return [len(c) / 8 for c in completions]


def make_env(path, max_new_tokens=6):
    return gym.make(
        ENV_ID, model_name_or_path=path, prompts=PROMPTS, reward_fn=completion_length, max_new_tokens=max_new_tokens
    )


def trained_model(path, use_reference_model=True, timesteps=64):
    model = PPO(
        "LMPolicy",
        make_env(path),
        n_steps=16,
        batch_size=16,
        learning_rate=3e-3,
        seed=0,
        policy_kwargs=dict(use_reference_model=use_reference_model),
    )
    callback = sb3_textrl.KLPenaltyCallback(0.05) if use_reference_model else None
    model.learn(timesteps, callback=callback)
    return model


def greedy_completions(model, env):
    """Roll out each prompt greedily through the env with ``model.predict``: the generated token ids."""
    completions = []
    for i in range(len(PROMPTS)):
        obs, _ = env.reset(options={"prompt_index": i})
        tokens, done = [], False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            tokens.append(int(action))
            obs, _, done, _, _ = env.step(action)
        completions.append(tokens)
    return completions


def rollout_batch(env, n_episodes=3, seed=0):
    rng = np.random.default_rng(seed)
    obs_list, actions = [], []
    for e in range(n_episodes):
        obs, _ = env.reset(options={"prompt_index": e})
        done = False
        while not done:
            action = int(rng.integers(3, 300))
            obs_list.append(obs)
            actions.append(action)
            obs, _, done, _, _ = env.step(action)
    obs_t = {key: th.as_tensor(np.stack([o[key] for o in obs_list])) for key in ("input_ids", "attention_mask")}
    return obs_t, th.as_tensor(actions)


def test_save_load_round_trip(tiny_lm_path, tmp_path):
    model = trained_model(tiny_lm_path)
    env = make_env(tiny_lm_path)
    initial = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    trained_lm = model.policy.lm
    assert any(not th.equal(p, q) for p, q in zip(trained_lm.parameters(), initial.parameters()))

    model.save(tmp_path / "m.zip")
    loaded = PPO.load(tmp_path / "m.zip", device="cpu")
    assert isinstance(loaded.policy, LMPolicy)
    assert loaded.policy.model_name_or_path == tiny_lm_path
    # the fine-tuned LM and value head are restored
    for (name, p), q in zip(loaded.policy.named_parameters(), model.policy.parameters()):
        assert th.equal(p, q), name
    # ... and the reference model is the initial LM, not the trained one
    for p, q in zip(loaded.policy.reference_model.parameters(), initial.parameters()):
        assert th.equal(p, q)
    assert loaded.policy.reference_model is not loaded.policy.lm
    assert not loaded.policy.reference_model.training
    assert all(not p.requires_grad for p in loaded.policy.reference_model.parameters())

    assert greedy_completions(loaded, env) == greedy_completions(model, env)
    obs, actions = rollout_batch(env)
    with th.no_grad():
        for a, b in zip(model.policy.evaluate_actions(obs, actions), loaded.policy.evaluate_actions(obs, actions)):
            th.testing.assert_close(a, b, atol=1e-6, rtol=0)
        th.testing.assert_close(
            loaded.policy.reference_log_prob(obs, actions), model.policy.reference_log_prob(obs, actions), atol=1e-6, rtol=0
        )
        assert not th.allclose(loaded.policy.reference_log_prob(obs, actions), loaded.policy.evaluate_actions(obs, actions)[1])
    # the optimizer state is restored too
    assert loaded.policy.optimizer.state_dict()["state"].keys() == model.policy.optimizer.state_dict()["state"].keys()
    # and training goes on, with the KL penalty
    loaded.set_env(env)
    loaded.learn(16, callback=sb3_textrl.KLPenaltyCallback(0.05), reset_num_timesteps=False)
    assert loaded.num_timesteps == model.num_timesteps + 16


def test_zip_holds_the_lm_once(tiny_llama_path, tmp_path):
    with_reference = trained_model(tiny_llama_path, use_reference_model=True, timesteps=32)
    without_reference = trained_model(tiny_llama_path, use_reference_model=False, timesteps=32)
    with_reference.save(tmp_path / "with.zip")
    without_reference.save(tmp_path / "without.zip")
    size_with, size_without = os.path.getsize(tmp_path / "with.zip"), os.path.getsize(tmp_path / "without.zip")
    lm_bytes = sum(p.numel() * p.element_size() for p in with_reference.policy.parameters())
    assert abs(size_with - size_without) < 0.05 * size_without
    # the LM weights plus Adam's two moments: about 3 LMs, far from the 4 a saved reference copy would add
    assert 2.5 * lm_bytes < size_with < 3.5 * lm_bytes
    with zipfile.ZipFile(tmp_path / "with.zip") as archive, archive.open("policy.pth") as f:
        state_dict = th.load(f, weights_only=True)
    expected = {f"lm.{k}" for k in with_reference.policy.lm.state_dict()} | {"value_head.weight", "value_head.bias"}
    assert set(state_dict) == expected


def test_policy_save_load(tiny_gpt2_path, tmp_path):
    model = trained_model(tiny_gpt2_path, timesteps=32)
    model.policy.save(tmp_path / "policy.pth")
    policy = LMPolicy.load(tmp_path / "policy.pth")
    env = make_env(tiny_gpt2_path)
    obs, actions = rollout_batch(env)
    with th.no_grad():
        th.testing.assert_close(policy.evaluate_actions(obs, actions)[1], model.policy.evaluate_actions(obs, actions)[1])
    initial = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    for p, q in zip(policy.reference_model.parameters(), initial.parameters()):
        assert th.equal(p, q)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_pretrained(tiny_llama_path, tiny_gpt2_path, tmp_path, kind):
    path = {"llama": tiny_llama_path, "gpt2": tiny_gpt2_path}[kind]
    model = trained_model(path, timesteps=32)
    export = tmp_path / "pretrained"
    model.policy.save_pretrained(str(export))
    lm = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    original_tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.get_vocab() == original_tokenizer.get_vocab()
    assert tokenizer.chat_template == original_tokenizer.chat_template
    assert tokenizer.eos_token_id == original_tokenizer.eos_token_id
    assert tokenizer.pad_token_id is not None
    ids = th.as_tensor([tokenizer("The sun is good and the sky is blue.")["input_ids"]])
    with th.no_grad():
        th.testing.assert_close(lm(input_ids=ids).logits, model.policy.lm(input_ids=ids).logits, atol=1e-6, rtol=0)
        assert not th.allclose(lm(input_ids=ids).logits, AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits)
    value_head = th.load(export / "value_head.pt", weights_only=True)
    th.testing.assert_close(value_head["weight"], model.policy.value_head.weight.detach())
    # the export is itself a model_name_or_path: same observations, and the fine-tuned LM as the starting point
    env, exported_env = make_env(path), make_env(str(export))
    for i in range(len(PROMPTS)):
        a, _ = env.reset(options={"prompt_index": i})
        b, _ = exported_env.reset(options={"prompt_index": i})
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    resumed = PPO("LMPolicy", exported_env, n_steps=8, batch_size=8)
    assert greedy_completions(resumed, exported_env) == greedy_completions(model, env)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_policy_kwargs_round_trip(tiny_llama_path, tmp_path, use_kv_cache):
    model = PPO(
        "LMPolicy",
        make_env(tiny_llama_path),
        n_steps=8,
        batch_size=8,
        policy_kwargs=dict(use_kv_cache=use_kv_cache, model_kwargs=dict(attn_implementation="eager")),
    )
    model.save(tmp_path / "m.zip")
    loaded = PPO.load(tmp_path / "m.zip")
    assert loaded.policy.use_kv_cache is use_kv_cache
    assert loaded.policy.model_kwargs == {"attn_implementation": "eager"}
    assert loaded.policy.lm.config._attn_implementation == "eager"
