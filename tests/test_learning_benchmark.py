"""Smoke tests of ``benchmarks/learning.py`` and its plain PPO baseline ``benchmarks/plain_ppo.py`` on the tiny LM."""

from __future__ import annotations

import copy
import csv
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import letter_fraction

from sb3_textrl.lm.loading import eos_token_ids, load_causal_lm, load_tokenizer
from sb3_textrl.lm.tokens import encode_prompt

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def benchmarks_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks import each other as top-level modules (``from plain_ppo import ...``)."""
    monkeypatch.syspath_prepend(BENCHMARKS)


def test_plain_ppo_updates(tiny_llama_path, benchmarks_path):
    from plain_ppo import PlainPPO, PlainPPOArgs, args_with

    lm = load_causal_lm(tiny_llama_path)
    reference = copy.deepcopy(lm).requires_grad_(False)
    tokenizer = load_tokenizer(tiny_llama_path)
    prompts = ["Write one sentence about rain.", "Hi"]
    loop = PlainPPO(
        lm,
        reference,
        prompt_ids=[encode_prompt(tokenizer, p, True) for p in prompts],
        prompts=prompts,
        reward_fn=letter_fraction,
        eos_token_ids=eos_token_ids(tiny_llama_path),
        pad_token_id=tokenizer.pad_token_id,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        args=PlainPPOArgs(batch_episodes=4, max_new_tokens=6, batch_size=2, learning_rate=1e-2),
        seed=0,
    )
    first = loop.iteration()
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert 4 <= first["tokens"] <= 4 * 6
    second = loop.iteration()
    assert second["kl"] != pytest.approx(0.0, abs=1e-5)  # the update moved the policy away from the reference
    assert not torch.equal(lm.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="Unknown plain-loop setting"):
        args_with({"lr": 1e-3})


def test_learning_benchmark_smoke(tiny_llama_path, benchmarks_path, tmp_path, capsys):
    import learning

    out = tmp_path / "out"
    argv = ["--model", tiny_llama_path, "--seeds", "0", "--iterations", "1", "--eval-samples", "1", "--out", str(out)]
    argv += ["--configs", "library", "plain", "--config", "vf:vf_coef=0.5,n_epochs=1"]
    argv += ["--config", "grpo:algo=grpo,group_size=2,iterations=2"]  # its own budget: 2 rollouts
    argv += ["--config", "ab:algo=ppo,ab.normalize_scores=True,ab.value_warmup_rollouts=1,missing_eos_penalty=0.5"]
    assert learning.main(argv) == 0
    with open(out / "learning.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # start and end of each configuration
    expected = [(c, i) for c in ("library", "plain", "vf") for i in "01"] + [("grpo", "0"), ("grpo", "2")]
    assert [(r["config"], r["iteration"]) for r in rows] == [*expected, ("ab", "0"), ("ab", "1")]
    assert all(r["seed"] == "0" for r in rows) and float(rows[1]["train_seconds"]) > 0
    assert int(rows[-3]["tokens"]) == 2 * 16 * 24  # two rounds of 16 completions of 24 tokens (the tiny LM never ends)
    # the first update of "ab" trains the value head alone: the policy is still the reference
    assert float(rows[-1]["kl"]) == 0.0 and float(rows[1]["kl"]) > 0.0
    assert (out / "learning.png").stat().st_size > 0
    captured = capsys.readouterr()
    table = captured.out
    assert "| library | 1 |" in table and "| vf | 1 |" in table and "| plain | 1 |" in table and "| grpo | 1 | 2.0 |" in table
    assert "EOS 0.00" in captured.err  # the fraction of rollout completions that end with EOS

    # the report of runs made apart: no training, the same table; a configuration's seconds from the idle machine
    merged = tmp_path / "merged"
    argv = ["--from-csv", str(out / "learning.csv"), "--out", str(merged), "--seconds-per-iteration", "grpo=10"]
    assert learning.main(argv) == 0
    with open(merged / "learning.csv", encoding="utf-8") as f:
        grpo = [r for r in csv.DictReader(f) if r["config"] == "grpo"]
    assert [float(r["train_seconds"]) for r in grpo] == [0.0, 20.0]
    assert "| grpo | 1 | 2.0 | 20 |" in capsys.readouterr().out and (merged / "learning.png").stat().st_size > 0


def test_parse_configuration(benchmarks_path):
    import argparse

    from learning import Configuration, library_settings, parse_configuration

    spec = parse_configuration("fast:learning_rate=3e-5,policy.lean_activations=False,target_kl=0.1,kl_estimator=k3")
    assert spec == Configuration(
        "fast", "library", {"learning_rate": 3e-5, "policy.lean_activations": False, "target_kl": 0.1, "kl_estimator": "k3"}
    )
    config, policy_kwargs, algo_kwargs, ab = library_settings(spec, "some-model", seed=3)
    assert (config.learning_rate, config.kl_estimator, config.seed, config.model) == (3e-5, "k3", 3, "some-model")
    assert policy_kwargs == {"lean_activations": False} and algo_kwargs == {"target_kl": 0.1} and ab == {}
    spec = parse_configuration("w:buffer.whiten_advantages=True,normalize_advantage=False,ab.value_warmup_rollouts=2")
    _, _, algo_kwargs, ab = library_settings(spec, "some-model", seed=0)
    assert algo_kwargs == {"rollout_buffer_kwargs": {"whiten_advantages": True}, "normalize_advantage": False}
    assert ab == {"value_warmup_rollouts": 2}
    for bad in ("x:ab.normalise_scores=True", "x:ab.value_warmup_rollouts=two"):
        with pytest.raises(ValueError, match=r"ab\."):
            library_settings(parse_configuration(bad), "some-model", seed=0)
    assert parse_configuration("p:base=plain,learning_rate=2e-5") == Configuration("p", "plain", {"learning_rate": 2e-5})
    assert parse_configuration("g:algo=grpo,iterations=25") == Configuration("g", "library", {"algo": "grpo"}, 25)
    for bad in ("library:vf_coef=1", ":vf_coef=1", "x:vf_coef", "x:base=trl", "x:iterations=0", "x:iterations=2.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_configuration(bad)


class _ScoredStep(gym.Env):
    """One-step episodes paying ``reward`` with ``info["score"]`` (``ends=False``: never ends, reward 0.25, no score)."""

    observation_space = gym.spaces.Discrete(1)
    action_space = gym.spaces.Discrete(1)

    def __init__(self, reward: float, ends: bool = True):
        self.reward, self.ends = reward, ends

    def reset(self, *, seed=None, options=None):
        return 0, {}

    def step(self, action):
        if not self.ends:
            return 0, 0.25, False, False, {}
        return 0, self.reward, True, False, {"score": self.reward}


def test_score_normalization_by_hand(benchmarks_path):
    from ab_options import ScoreNormalization
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = ScoreNormalization(DummyVecEnv([lambda: _ScoredStep(1.0), lambda: _ScoredStep(3.0), lambda: _ScoredStep(9, False)]))
    env.reset()
    _, rewards, _, infos = env.step(np.zeros(3, dtype=np.int64))
    # the finished scores 1 and 3: mean 2, variance 1 (the running statistics start from a count of 1e-4)
    assert rewards.tolist() == pytest.approx([-1.0, 1.0, 0.25], abs=1e-3)
    assert [info.get("score") for info in infos] == [1.0, 3.0, None]  # the raw scores stay in the infos
    _, rewards, _, _ = env.step(np.zeros(3, dtype=np.int64))  # the same scores again: mean 2, variance 1
    assert rewards.tolist() == pytest.approx([-1.0, 1.0, 0.25], abs=1e-3)


def test_value_warmup_trains_the_value_head_alone_first(tiny_llama_path, benchmarks_path):
    from ab_options import ValueWarmup
    from conftest import make_vec
    from stable_baselines3 import PPO

    model = PPO("LMPolicy", make_vec(tiny_llama_path), n_steps=4, batch_size=4, n_epochs=1, learning_rate=1e-2, seed=0)
    embeddings = model.policy.lm.get_input_embeddings().weight
    lm_before, value_before = embeddings.detach().clone(), model.policy.value_head.weight.detach().clone()
    warmup = ValueWarmup(1)
    model.learn(8, callback=warmup)  # one rollout and its update: the value head only
    assert torch.equal(embeddings, lm_before) and not torch.equal(model.policy.value_head.weight, value_before)
    model.learn(8, callback=warmup, reset_num_timesteps=False)  # the next update trains the LM too
    assert not torch.equal(embeddings, lm_before) and embeddings.requires_grad
