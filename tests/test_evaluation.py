"""Held-out evaluation (sb3_textrl.common.evaluation): padding, generation, sequence log-probs, distinct-n,
evaluate_prompts against the environment's own rollouts, and its protocol: n samples per prompt, common random numbers
that leave the global random streams alone, and the spread of the sampled reward by hand."""

import json
import math
import random

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import ENV_ID, PROMPTS
from stable_baselines3 import PPO
from transformers import AutoModelForCausalLM

import sb3_textrl
from sb3_textrl.common.evaluation import (
    EvaluationResult,
    distinct_n,
    evaluate_prompts,
    generate_tokens,
    left_pad,
    mean_sem_ci95,
    paired_difference,
    sequence_log_prob,
    t_quantile_975,
)
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


# --- the protocol: samples, common random numbers, spread -------------------------------------------------------------


def tiny_policy(path):
    return PPO("LMPolicy", make_env(path), n_steps=8, batch_size=8, seed=0).policy


def rng_states():
    """The global random streams: torch's CPU generator, numpy's and random's."""
    return th.get_rng_state().clone(), np.random.get_state(), random.getstate()


def assert_same_rng_states(a, b):
    assert th.equal(a[0], b[0])
    np.testing.assert_equal(a[1], b[1])
    assert a[2] == b[2]


def test_common_random_numbers(tiny_llama_path):
    policy = tiny_policy(tiny_llama_path)
    kwargs = dict(reward_fn=n_chars, max_new_tokens=6, n_samples=3, batch_size=2)
    first = evaluate_prompts(policy, PROMPTS, seed=0, **kwargs)
    th.rand(5), np.random.rand(), random.random()  # the global streams move on: the draws do not depend on them
    second = evaluate_prompts(policy, PROMPTS, seed=0, **kwargs)
    assert len(first.sampled_scores) == len(PROMPTS) and all(len(row) == 3 for row in first.sampled_scores)
    assert first.sampled_scores == second.sampled_scores
    assert first.samples == second.samples and first.kl == second.kl
    other = evaluate_prompts(policy, PROMPTS, seed=1, **kwargs)
    assert other.sampled_scores != first.sampled_scores
    assert [s["sampled"] for s in other.samples] != [s["sampled"] for s in first.samples]
    assert other.reward_greedy == first.reward_greedy  # greedy draws nothing
    # seed=None: fresh draws from the global generator, which they advance
    seeded = th.manual_seed(0).get_state()
    fresh = evaluate_prompts(policy, PROMPTS, seed=None, **kwargs)
    assert fresh.seed is None and fresh.protocol["seed"] is None
    assert not th.equal(th.get_rng_state(), seeded)
    assert evaluate_prompts(policy, PROMPTS, seed=None, **kwargs).sampled_scores != fresh.sampled_scores


def test_evaluation_leaves_global_rng(tiny_gpt2_path):
    """With a seed, the torch, numpy and random streams come out as they went in, even with a reward that draws from
    numpy and random (its draws are common random numbers too)."""

    def noisy(prompts, completions):
        return [len(c) + np.random.rand() + random.random() for c in completions]

    policy = tiny_policy(tiny_gpt2_path)
    policy.set_training_mode(True)  # dropout draws too
    th.manual_seed(7), np.random.seed(7), random.seed(7)
    before = rng_states()
    first = evaluate_prompts(policy, PROMPTS[:2], reward_fn=noisy, max_new_tokens=3, n_samples=2, seed=5)
    assert_same_rng_states(rng_states(), before)
    second = evaluate_prompts(policy, PROMPTS[:2], reward_fn=noisy, max_new_tokens=3, n_samples=2, seed=5)
    assert_same_rng_states(rng_states(), before)
    assert first.sampled_scores == second.sampled_scores and first.reward_greedy == second.reward_greedy


def test_default_protocol(tiny_llama_path):
    policy = tiny_policy(tiny_llama_path)
    result = evaluate_prompts(policy, ["rain"], reward_fn=n_chars, max_new_tokens=2)
    assert result.n_samples == 8 and result.seed == 0 and len(result.sampled_scores[0]) == 8
    assert result.protocol == dict(n_prompts=1, n_samples=8, seed=0, max_new_tokens=2, batch_size=16, greedy=True,
                                   temperature=1.0)  # fmt: skip
    assert math.isnan(result.reward_sampled_sem) and math.isnan(result.reward_sampled_ci95)  # one prompt
    # results.json and the CLI's checkpoints: JSON in, the same result out; an older result (no spread) still loads
    np.testing.assert_equal(EvaluationResult(**json.loads(json.dumps(result.__dict__))).__dict__, result.__dict__)
    old = EvaluationResult(reward_greedy=0.1, reward_sampled=0.2, kl=0.0, samples=[])
    assert old.protocol == {} and old.n_samples is None and math.isnan(old.reward_sampled_sem)


def test_spread_by_hand(tiny_llama_path):
    """Scores set by hand: 3 prompts x 2 samples, one generate call per completion set (greedy, sample 0, sample 1)."""
    calls = iter([[0.0, 0.0, 0.0], [1.0, 2.0, 6.0], [3.0, 2.0, 4.0]])

    def scripted(prompts, completions):
        return next(calls)

    result = evaluate_prompts(tiny_policy(tiny_llama_path), PROMPTS, reward_fn=scripted, max_new_tokens=2, n_samples=2)
    assert result.sampled_scores == [[1.0, 3.0], [2.0, 2.0], [6.0, 4.0]]
    assert result.reward_sampled_per_prompt == [2.0, 2.0, 5.0]
    assert result.reward_sampled == 3.0 and result.reward_greedy == 0.0
    # all six scores: squared deviations from 3 sum to 16, over 5
    assert result.reward_sampled_std == pytest.approx(math.sqrt(16 / 5))
    # over prompts: means 2, 2, 5, squared deviations from 3 sum to 6, variance 6 / 2 = 3, sem sqrt(3 / 3) = 1
    assert result.reward_sampled_sem == pytest.approx(1.0)
    assert result.reward_sampled_ci95 == pytest.approx(4.302653)  # t(0.975, 2 dof) * 1
    assert [s["sampled_score"] for s in result.samples] == [1.0, 2.0, 6.0]  # the first sample of each prompt


def test_mean_sem_ci95_and_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(9) == pytest.approx(2.2622, abs=1e-4)
    assert t_quantile_975(10) == pytest.approx(2.228139, abs=1e-5)  # scipy.stats.t.ppf(0.975, 10)
    assert t_quantile_975(30) == pytest.approx(2.042272, abs=1e-5)
    assert t_quantile_975(10**6) == pytest.approx(1.959966, abs=1e-5)
    mean, sem, ci95 = mean_sem_ci95([1.0, 2.0, 3.0, 6.0])  # deviations -2, -1, 0, 3: variance 14 / 3
    assert mean == 3.0
    assert sem == pytest.approx(math.sqrt(14 / 3) / 2)
    assert ci95 == pytest.approx(3.182446 * math.sqrt(14 / 3) / 2)
    mean, sem, ci95 = mean_sem_ci95([4.0])
    assert mean == 4.0 and math.isnan(sem) and math.isnan(ci95)


def test_paired_difference_by_hand():
    protocol = dict(n_prompts=3, n_samples=2, seed=0, max_new_tokens=4, batch_size=16, greedy=True, temperature=1.0)
    before = EvaluationResult(0.0, 2.0, 0.0, reward_sampled_per_prompt=[1.0, 2.0, 3.0], protocol=protocol)
    after = EvaluationResult(0.0, 3.0, 0.0, reward_sampled_per_prompt=[2.0, 2.5, 4.5], protocol=protocol)
    mean, ci95 = paired_difference(before, after)  # differences 1, 0.5, 1.5: mean 1, variance 0.25
    assert mean == pytest.approx(1.0)
    assert ci95 == pytest.approx(4.302653 * 0.5 / math.sqrt(3))
    with pytest.raises(ValueError, match="protocol"):
        paired_difference(before, EvaluationResult(0.0, 3.0, 0.0, reward_sampled_per_prompt=[2.0, 2.5, 4.5]))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n_samples=0), "n_samples"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(batch_size=0), "batch_size"),
     (dict(prompts=[]), "prompts")],
)  # fmt: skip
def test_evaluate_prompts_bad_arguments(tiny_gpt2_path, kwargs, match):
    policy = tiny_policy(tiny_gpt2_path)
    with pytest.raises(ValueError, match=match):
        evaluate_prompts(policy, **{"prompts": ["rain"], "reward_fn": n_chars, **kwargs})
