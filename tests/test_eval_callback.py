"""LMEvalCallback: held-out evaluation every N rollouts, logged to the SB3 logger, with PNG curves and a samples table."""

import csv
import math

import gymnasium as gym
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure

from sb3_textrl.common.callbacks import LMEvalCallback, samples_markdown
from sb3_textrl.common.evaluation import distinct_n, evaluate_prompts


def test_distinct_n_by_hand():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["x y", "x z"], 1) == pytest.approx(3 / 4)
    assert math.isnan(distinct_n(["", "one"], 2))


def test_untrained_policy_has_no_kl_and_reference_perplexity(tiny_llama_path):
    env = gym.make("sb3_textrl/TextGeneration-v0", model_name_or_path=tiny_llama_path, prompts=["rain"], max_new_tokens=5)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8)
    result = evaluate_prompts(model.policy, ["rain", "the sun"], max_new_tokens=5, n_samples=2)
    assert result.kl == pytest.approx(0.0, abs=1e-4)
    # a random 300-token LM: its own samples have a perplexity of the order of the vocabulary size
    assert 30 < result.ref_perplexity < 3000
    assert 0 < result.distinct_1 <= 1


def test_callback_logs_every_n_rollouts(tiny_llama_path, tmp_path):
    env = gym.make(
        "sb3_textrl/TextGeneration-v0",
        model_name_or_path=tiny_llama_path,
        prompts=["the sun is good", "rain"],
        reward_fn=lambda p, c: [float(len(x)) for x in c],
        max_new_tokens=4,
    )
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, learning_rate=1e-3, seed=0)
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    callback = LMEvalCallback(["rain", "a cafe"], eval_freq=2, max_new_tokens=4, log_path=str(tmp_path / "eval"),
                              reward_fn=lambda p, c: [float(len(x)) for x in c])  # fmt: skip
    model.learn(8 * 5, callback=callback)
    assert [r["timesteps"] for r in callback.results] == [16.0, 32.0]
    assert len(callback.last_samples) == 2 and {"prompt", "greedy", "sampled"} <= set(callback.last_samples[0])
    assert (tmp_path / "eval" / "eval_curves.png").stat().st_size > 1000
    assert "| rain |" in (tmp_path / "eval" / "samples.md").read_text()
    with open(tmp_path / "log" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["eval/reward_greedy"]) for r in rows if r.get("eval/reward_greedy")]
    assert logged == pytest.approx([r["reward_greedy"] for r in callback.results])
    for key in ("eval/ref_kl", "eval/ref_perplexity", "eval/distinct_1", "eval/distinct_2", "eval/reward_sampled"):
        assert key in rows[0]
    state = callback.state_dict()
    other = LMEvalCallback(["rain"], eval_freq=2)
    other.load_state_dict(state)
    assert other.results == callback.results and other.n_rollouts == 5


def test_samples_markdown_escapes_pipes():
    table = samples_markdown([{"prompt": "a|b", "greedy": "x\ny", "greedy_score": 0.5, "sampled": "z", "sampled_score": -1}])
    assert "a\\|b" in table and "x y" in table and "+0.50" in table and "-1.00" in table


@pytest.mark.parametrize("kwargs, match", [(dict(prompts=[]), "prompts"), (dict(prompts=["a"], eval_freq=0), "eval_freq")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMEvalCallback(**kwargs)
