"""Held-out evaluation (sb3_textrl.common.evaluation): padding, generation, sequence log-probs, distinct-n, and
evaluate_prompts against the environment's own rollouts."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import ENV_ID, PROMPTS
from stable_baselines3 import PPO
from transformers import AutoModelForCausalLM

import sb3_textrl
from sb3_textrl.common.evaluation import distinct_n, evaluate_prompts, generate_tokens, left_pad, sequence_log_prob
from sb3_textrl.lm.tokens import encode_prompt


def n_chars(prompts, completions):
    return [float(len(c)) for c in completions]


def make_env(path, max_new_tokens=6):
    return gym.make(ENV_ID, model_name_or_path=path, prompts=PROMPTS, reward_fn=n_chars, max_new_tokens=max_new_tokens)


def test_left_pad():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8], []], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert input_ids.dtype == attention_mask.dtype == th.int64


def test_sequence_log_prob_by_hand(tiny_lm_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_path).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    completions = [[11, 12], [13, 14, 15]]
    result = sequence_log_prob(lm, prompts, completions, pad_token_id=0)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        expected = 0.0
        for t, token in enumerate(completion):
            ids = th.as_tensor([prompt + completion[:t]])
            with th.no_grad():
                expected += th.log_softmax(lm(input_ids=ids).logits[0, -1], dim=-1)[token].item()
        assert result[row] == pytest.approx(expected, abs=1e-4)
    assert sequence_log_prob(lm, [[5, 6]], [[]], pad_token_id=0).tolist() == [0.0]


def test_generate_tokens_stops_at_eos(tiny_llama_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    prompt = [1, 40, 73]
    with th.no_grad():
        first = int(lm(input_ids=th.as_tensor([prompt])).logits[0, -1].argmax())
    greedy = generate_tokens(lm, [prompt], 5, eos_token_ids=[2], pad_token_id=0, do_sample=False)[0]
    assert greedy[0] == first and len(greedy) == 5
    # declaring the first greedy token an EOS ends the completion right after it
    assert generate_tokens(lm, [prompt], 5, eos_token_ids=[first], pad_token_id=0, do_sample=False) == [[first]]


def test_distinct_n_by_hand():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["x y", "x z"], 1) == pytest.approx(3 / 4)
    assert math.isnan(distinct_n(["", "one"], 2))


def env_greedy_completions(model, env):
    completions = []
    for i in range(len(PROMPTS)):
        obs, _ = env.reset(options={"prompt_index": i})
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, done, _, info = env.step(action)
        completions.append(info["completion"])
    return completions


def test_evaluate_prompts_matches_env(tiny_lm_path):
    env = make_env(tiny_lm_path)
    model = PPO("LMPolicy", env, n_steps=16, batch_size=16, learning_rate=3e-3, seed=0)

    before = evaluate_prompts(model.policy, PROMPTS, reward_fn=n_chars, max_new_tokens=6, n_samples=2, batch_size=2)
    assert abs(before.kl) < 1e-4  # the policy is its reference model
    assert [s["prompt"] for s in before.samples] == PROMPTS
    greedy = env_greedy_completions(model, env)
    # KV-cached generate (evaluation) and one-token-per-step env rollouts (training) agree
    assert [s["greedy"] for s in before.samples] == greedy
    assert before.reward_greedy == pytest.approx(np.mean([len(c) for c in greedy]))
    assert [s["greedy_score"] for s in before.samples] == [float(len(c)) for c in greedy]

    model.learn(64, callback=sb3_textrl.KLPenaltyCallback(0.05))
    after = evaluate_prompts(model.policy, PROMPTS, reward_fn=n_chars, max_new_tokens=6, n_samples=1)
    assert [s["greedy"] for s in after.samples] == env_greedy_completions(model, env)
    assert after.kl != before.kl


def test_evaluate_prompts_same_formatting_as_env(tiny_llama_path):
    env = make_env(tiny_llama_path).unwrapped
    for prompt in PROMPTS:
        ids = encode_prompt(env.tokenizer, prompt, use_chat_template=True)
        obs, _ = env.reset(options={"prompt": prompt})
        np.testing.assert_array_equal(obs["input_ids"][obs["attention_mask"] == 1], ids)


def test_evaluate_without_reference(tiny_gpt2_path):
    env = make_env(tiny_gpt2_path)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, policy_kwargs=dict(use_reference_model=False))
    result = evaluate_prompts(model.policy, PROMPTS[:2], reward_fn="vader", max_new_tokens=3, n_samples=1)
    assert math.isnan(result.kl)
    assert -1.0 <= result.reward_sampled <= 1.0


def test_untrained_policy_has_no_kl_and_reference_perplexity(tiny_llama_path):
    env = gym.make(ENV_ID, model_name_or_path=tiny_llama_path, prompts=["rain"], max_new_tokens=5)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8)
    result = evaluate_prompts(model.policy, ["rain", "the sun"], max_new_tokens=5, n_samples=2)
    assert result.kl == pytest.approx(0.0, abs=1e-4)
    # a random 300-token LM: its own samples have a perplexity of the order of the vocabulary size
    assert 30 < result.ref_perplexity < 3000
    assert 0 < result.distinct_1 <= 1
