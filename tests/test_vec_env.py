"""Batched scoring with BatchedRewardVecEnv / make_text_vec_env: one reward call per step, same rewards, Monitor, errors."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import ENV_ID, PROMPTS
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import SubprocVecEnv, VecMonitor, unwrap_vec_wrapper
from transformers import AutoTokenizer

import sb3_textrl  # noqa: F401  (registers the env)
from sb3_textrl.common.vec_env import BatchedRewardVecEnv, make_text_vec_env
from sb3_textrl.rewards import CombinedReward, RewardError, per_token_reward

P = 100  # a token id that is neither EOS nor pad for the tiny tokenizers
E = -1  # stands for the EOS id in the schedules below


class CountingReward:
    """Records every call; the score depends on prompt and completion."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions):
        self.calls.append((list(prompts), list(completions)))
        return [len(c) / 10 + len(p) / 100 for p, c in zip(prompts, completions)]


def length_reward(prompts, completions):
    return [len(c) / 10 for c in completions]


# 3 envs, max_new_tokens=3: all end at step 3; two at step 4 (EOS); at step 6, env 1 (EOS) and env 2 (3 tokens)
SCHEDULE = [[P, P, P], [P, P + 1, P], [P, P, E], [E, E, P], [P, P, P], [P, E, P]]


def env_kwargs(path, reward_fn, **kwargs):
    return {"model_name_or_path": path, "prompts": PROMPTS, "reward_fn": reward_fn, "max_new_tokens": 3, **kwargs}


def run_schedule(venv, path):
    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    steps = [venv.reset()]
    for actions in SCHEDULE:
        steps.append(venv.step(np.array([eos if a == E else a for a in actions])))
    return steps


def test_one_reward_call_per_step(tiny_llama_path):
    reward = CountingReward()
    venv = make_text_vec_env(n_envs=3, seed=0, env_kwargs=env_kwargs(tiny_llama_path, reward))
    steps = run_schedule(venv, tiny_llama_path)
    finished = [(dones, infos) for _, _, dones, infos in steps[1:] if dones.any()]
    assert [int(dones.sum()) for dones, _ in finished] == [3, 2, 2]
    assert len(reward.calls) == len(finished) == 3
    for (prompts, completions), (dones, infos) in zip(reward.calls, finished):
        ended = np.flatnonzero(dones)
        assert prompts == [infos[i]["prompt"] for i in ended]
        assert completions == [infos[i]["completion"] for i in ended]
    batched = unwrap_vec_wrapper(venv, BatchedRewardVecEnv)
    assert batched.n_calls == 3 and batched.n_scored == 7 and batched.reward_fn is reward
    assert isinstance(venv, VecMonitor)
    venv.close()


def test_same_rewards_as_per_env_scoring(tiny_lm_path):
    reward = CombinedReward({"vader": 1.0, length_reward: 0.5})
    per_env = make_vec_env(ENV_ID, n_envs=3, seed=0, env_kwargs=env_kwargs(tiny_lm_path, reward))
    batched = make_text_vec_env(n_envs=3, seed=0, env_kwargs=env_kwargs(tiny_lm_path, reward))
    expected_steps, steps = run_schedule(per_env, tiny_lm_path), run_schedule(batched, tiny_lm_path)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(expected_steps[0][key], steps[0][key])
    n_scores = 0
    for (obs_a, rew_a, done_a, infos_a), (obs_b, rew_b, done_b, infos_b) in zip(expected_steps[1:], steps[1:]):
        np.testing.assert_array_equal(obs_a["input_ids"], obs_b["input_ids"])
        np.testing.assert_array_equal(done_a, done_b)
        np.testing.assert_allclose(rew_a, rew_b, atol=1e-6)
        for a, b, done in zip(infos_a, infos_b, done_a):
            if done:
                n_scores += 1
                assert "score_deferred" not in b
                assert (a["prompt"], a["completion"]) == (b["prompt"], b["completion"])
                assert a["score"] == pytest.approx(b["score"], abs=1e-6)
                assert a["score_terms"] == pytest.approx(b["score_terms"], abs=1e-6)
                assert set(b["score_terms"]) == {"vader", "length_reward"}
                assert a["episode"]["r"] == pytest.approx(b["episode"]["r"], abs=1e-5)
                assert a["episode"]["l"] == b["episode"]["l"]
                np.testing.assert_array_equal(a["terminal_observation"]["input_ids"], b["terminal_observation"]["input_ids"])
    assert n_scores == 7
    per_env.close()
    batched.close()


def test_monitor_inside_is_fixed(tiny_llama_path):
    # make_vec_env puts a Monitor around each env, inside the VecEnv: the wrapper adds the score to its episode return
    reward = CountingReward()
    venv = make_vec_env(ENV_ID, n_envs=2, seed=0, env_kwargs=env_kwargs(tiny_llama_path, reward, defer_scoring=True))
    wrapped = BatchedRewardVecEnv(venv)  # the reward comes from the envs' own `reward_fn` argument
    assert wrapped.reward_fn is reward
    wrapped.reset()
    for _ in range(3):
        _, rewards, dones, infos = wrapped.step(np.array([P, P]))
    assert dones.all() and len(reward.calls) == 1
    for i, info in enumerate(infos):
        assert rewards[i] == pytest.approx(info["score"]) and info["score"] > 0
        assert info["episode"]["r"] == pytest.approx(info["score"], abs=1e-6)
    wrapped.close()


def test_deferred_env_passes_checks(tiny_lm_path):
    env = gym.make(ENV_ID, **env_kwargs(tiny_lm_path, "vader", defer_scoring=True))
    gym_check_env(env.unwrapped)
    sb3_check_env(env)
    assert env.unwrapped.reward_fn is None
    env.reset(seed=0)
    for _ in range(3):
        _, reward, terminated, _, info = env.step(P)
    assert terminated and reward == 0.0
    assert info["score_deferred"] is True and "score" not in info and info["completion"]
    # reward_fn=None is allowed only when deferring
    gym.make(ENV_ID, **env_kwargs(tiny_lm_path, None, defer_scoring=True))
    with pytest.raises(ValueError, match="reward_fn"):
        gym.make(ENV_ID, **env_kwargs(tiny_lm_path, None))
    with pytest.raises(ValueError, match="reward_fn"):
        gym.make(ENV_ID, **env_kwargs(tiny_lm_path, "sentiment", defer_scoring=True))


@per_token_reward
def plain_tokens(prompts, completion_tokens):
    return [[0.1] * len(tokens) for tokens in completion_tokens]


def test_bad_setups(tiny_llama_path):
    with pytest.raises(ValueError, match="defer_scoring"):
        BatchedRewardVecEnv(make_vec_env(ENV_ID, n_envs=2, env_kwargs=env_kwargs(tiny_llama_path, "vader")))
    deferred = make_vec_env(ENV_ID, n_envs=2, env_kwargs=env_kwargs(tiny_llama_path, None, defer_scoring=True))
    with pytest.raises(ValueError, match="No reward"):
        BatchedRewardVecEnv(deferred)
    with pytest.raises(ValueError, match="per-token"):
        BatchedRewardVecEnv(deferred, plain_tokens)
    with pytest.raises(ValueError, match="per-token"):
        gym.make(ENV_ID, **env_kwargs(tiny_llama_path, plain_tokens, defer_scoring=True))
    with pytest.raises(ValueError, match="defer_scoring"):
        make_text_vec_env(2, env_kwargs=env_kwargs(tiny_llama_path, "vader", defer_scoring=True))
    for n_envs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`n_envs`"):
            make_text_vec_env(n_envs, env_kwargs=env_kwargs(tiny_llama_path, "vader"))
    with pytest.raises(ValueError, match="reward_fn"):
        make_text_vec_env(2, env_kwargs=env_kwargs(tiny_llama_path, "sentiment"))


def test_per_token_reward_is_not_deferred(tiny_llama_path):
    venv = make_text_vec_env(n_envs=2, seed=0, env_kwargs=env_kwargs(tiny_llama_path, plain_tokens))
    assert unwrap_vec_wrapper(venv, BatchedRewardVecEnv) is None
    venv.reset()
    _, rewards, _, _ = venv.step(np.array([P, P]))
    np.testing.assert_allclose(rewards, 0.1)


class Flaky:
    """Fails on its ``fail_on``-th call only."""

    name = "flaky"

    def __init__(self, fail_on):
        self.fail_on, self.n = fail_on, 0

    def __call__(self, prompts, completions):
        self.n += 1
        if self.n == self.fail_on:
            raise RuntimeError("rater unavailable")
        return [len(c) / 10 for c in completions]


class ScoreRecorder(BaseCallback):
    def __init__(self):
        super().__init__()
        self.pairs = []

    def _on_step(self):
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done:
                self.pairs.append((info["score"], info["episode"]["r"]))
        return True


@pytest.mark.parametrize("returned", ["raise", "nan", "count"])
def test_reward_errors_name_reward_and_prompt(tiny_llama_path, returned):
    def bad(prompts, completions):
        if returned == "raise":
            raise KeyError("missing")
        return [float("nan")] * len(completions) if returned == "nan" else [0.0]

    venv = make_text_vec_env(n_envs=2, seed=0, env_kwargs=env_kwargs(tiny_llama_path, bad))
    venv.reset()
    venv.step(np.array([P, P]))
    venv.step(np.array([P, P]))
    with pytest.raises(RewardError, match=r"`reward_fn` \(bad\)") as error:
        venv.step(np.array([P, P]))
    prompts = [prompt for _, prompt, _ in unwrap_vec_wrapper(venv, BatchedRewardVecEnv).failed_batch]
    assert len(prompts) == 2 and repr(prompts[0]) in str(error.value)


def test_training_state_survives_a_failing_reward(tiny_llama_path, tmp_path):
    # episodes end every 3 steps: the 4th call (step 12) is in the second rollout, after one update
    reward = Flaky(fail_on=4)
    venv = make_text_vec_env(n_envs=2, seed=0, env_kwargs=env_kwargs(tiny_llama_path, reward))
    model = PPO("LMPolicy", venv, n_steps=8, batch_size=8, n_epochs=1, seed=0)
    recorder = ScoreRecorder()
    with pytest.raises(RewardError, match=r"\(flaky\) raised RuntimeError: rater unavailable") as error:
        model.learn(64, callback=recorder)
    assert any(repr(p) in str(error.value) for p in PROMPTS)
    assert model.num_timesteps == 2 * 11 and model._n_updates == 1
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", env=venv)
    for key, value in loaded.policy.state_dict().items():
        assert th.equal(value, weights[key]), key
    # the reward is back: training goes on from where it stopped
    model.learn(16, callback=recorder, reset_num_timesteps=False)
    assert model.num_timesteps >= 2 * 11 + 16 and model._n_updates >= 2
    assert len(recorder.pairs) >= 6
    for score, episode_return in recorder.pairs:
        assert episode_return == pytest.approx(score, abs=1e-5)  # VecMonitor outside: the returns include the scores
    venv.close()


def test_subproc_vec_env(tiny_llama_path):
    reward = CountingReward()
    kwargs = env_kwargs(tiny_llama_path, reward)
    dummy = make_text_vec_env(n_envs=3, seed=0, env_kwargs=kwargs)
    subproc = make_text_vec_env(
        n_envs=3, seed=0, env_kwargs=kwargs, vec_env_cls=SubprocVecEnv, vec_env_kwargs=dict(start_method="fork")
    )
    try:
        expected, steps = run_schedule(dummy, tiny_llama_path), run_schedule(subproc, tiny_llama_path)
        for (_, rew_a, done_a, _), (_, rew_b, done_b, _) in zip(expected[1:], steps[1:]):
            np.testing.assert_array_equal(done_a, done_b)
            np.testing.assert_allclose(rew_a, rew_b)
        assert len(reward.calls) == 2 * 3  # the reward runs in this process, once per step with finished episodes
    finally:
        subproc.close()
        dummy.close()


def test_evaluate_policy_sees_the_scores(tiny_llama_path):
    venv = make_text_vec_env(n_envs=2, seed=0, env_kwargs=env_kwargs(tiny_llama_path, length_reward, max_new_tokens=2))
    model = PPO("LMPolicy", venv, n_steps=8, batch_size=8, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewards, lengths = evaluate_policy(model, venv, n_eval_episodes=4, return_episode_rewards=True)
    assert not [w for w in caught if "Monitor" in str(w.message)]  # VecMonitor is found
    assert len(rewards) == 4 and all(length <= 2 for length in lengths)
    assert all(r >= 0 for r in rewards) and any(r > 0 for r in rewards)
