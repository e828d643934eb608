"""The callbacks of sb3_textrl.common.callbacks: KLPenaltyCallback (the KL-penalised rewards by hand, the logged keys,
the controller applied once per rollout), RolloutHistoryCallback and LMEvalCallback."""

import copy
import csv

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import ENV_ID, SHORT_PROMPTS, make_vec
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import KVWriter, Logger, configure
from transformers import AutoModelForCausalLM

from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import EpisodeScores, KLPenaltyCallback, LMEvalCallback, RolloutHistoryCallback
from sb3_textrl.common.evaluation import evaluate_prompts
from sb3_textrl.common.kl import AdaptiveKLController
from sb3_textrl.common.plotting import samples_markdown


def hand_log_prob(lm, input_ids, attention_mask, action):
    """``log pi(action | the attended tokens)`` under ``lm``, from a plain forward pass."""
    ids = th.as_tensor(input_ids[attention_mask == 1])[None]
    with th.no_grad():
        return th.log_softmax(lm(input_ids=ids).logits[0, -1].float(), dim=-1)[int(action)].item()


class RecordingWriter(KVWriter):
    """Keeps every dict the logger dumps."""

    def __init__(self):
        self.dumps = []

    def write(self, key_values, key_excluded, step=0):
        self.dumps.append(dict(key_values))

    def close(self):
        pass


class RolloutSnapshot(BaseCallback):
    """At each rollout's end (after the KL callback), copy the buffer and the LM that collected it."""

    def __init__(self):
        super().__init__()
        self.snapshots = []
        self.step_rewards = []

    def _on_rollout_start(self):
        self.step_rewards = []

    def _on_step(self):
        self.step_rewards.append(np.array(self.locals["rewards"], dtype=np.float32))
        return True

    def _on_rollout_end(self):
        buffer = self.model.rollout_buffer
        self.snapshots.append(
            dict(
                raw_rewards=np.stack(self.step_rewards),
                rewards=buffer.rewards.copy(),
                returns=buffer.returns.copy(),
                values=buffer.values.copy(),
                advantages=buffer.advantages.copy(),
                log_probs=buffer.log_probs.copy(),
                actions=buffer.actions.copy(),
                episode_starts=buffer.episode_starts.copy(),
                obs={key: value.copy() for key, value in buffer.observations.items()},
                last_dones=np.array(self.locals["dones"]),
                lm=copy.deepcopy(self.model.policy.lm),
            )
        )


def kl_model(path: str) -> PPO:
    """PPO with an episode buffer on 4 envs of :data:`SHORT_PROMPTS`, rewarded for writing "good"."""
    env = make_vec(path, n_envs=4, reward_fn=lambda p, c: [float("good" in x) for x in c], prompts=SHORT_PROMPTS,
                   render_mode=None)  # fmt: skip
    return PPO("LMPolicy", env, n_steps=8, batch_size=32, n_epochs=4, learning_rate=3e-3, seed=0,
               rollout_buffer_class=EpisodeRolloutBuffer)  # fmt: skip


# --- KLPenaltyCallback ------------------------------------------------------------------------------------------------


def test_callback_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        KLPenaltyCallback(0.1, estimator="k9")


@pytest.mark.parametrize("kl_coef", [-0.1, float("nan"), float("inf")])
def test_kl_coef_must_be_valid(kl_coef):
    with pytest.raises(ValueError, match="kl_coef"):
        KLPenaltyCallback(kl_coef=kl_coef)


def test_kl_is_zero_at_start(tiny_lm_path):
    env = make_vec(tiny_lm_path, n_envs=2)
    model = PPO("LMPolicy", env, n_steps=16, batch_size=16, seed=0)
    obs_list, actions_list = [], []
    obs = env.reset()
    for _ in range(8):
        actions, _ = model.predict(obs)
        obs_list.append(obs)
        actions_list.append(actions)
        obs, *_ = env.step(actions)
    obs_t = {key: th.as_tensor(np.concatenate([o[key] for o in obs_list])) for key in obs}
    actions_t = th.as_tensor(np.concatenate(actions_list))
    with th.no_grad():
        _, log_prob, _ = model.policy.evaluate_actions(obs_t, actions_t)
    th.testing.assert_close(model.policy.reference_log_prob(obs_t, actions_t), log_prob, atol=1e-6, rtol=0)

    writer = RecordingWriter()
    model.set_logger(Logger(folder=None, output_formats=[writer]))
    kl_callback = KLPenaltyCallback(kl_coef=0.1)
    snapshot = RolloutSnapshot()
    model.learn(32, callback=[kl_callback, snapshot])
    assert len(writer.dumps) == 1
    logged = writer.dumps[0]
    assert logged["rollout/ref_kl"] == kl_callback.last_kl
    assert abs(logged["rollout/ref_kl"]) < 1e-4
    assert abs(logged["rollout/ref_kl_per_token"]) < 1e-5
    assert logged["train/kl_coef"] == 0.1
    # a zero KL: the penalised rewards are the raw scores
    np.testing.assert_allclose(snapshot.snapshots[0]["rewards"], snapshot.snapshots[0]["raw_rewards"], atol=1e-5)


def test_kl_penalty_by_hand(tiny_llama_path):
    kl_coef = 0.2
    n_envs, n_steps = 2, 16
    env = make_vec(tiny_llama_path, n_envs=n_envs, max_new_tokens=4)
    model = PPO(
        "LMPolicy", env, n_steps=n_steps, batch_size=16, n_epochs=4, learning_rate=3e-3, gamma=1.0, gae_lambda=1.0, seed=0
    )
    writer = RecordingWriter()
    model.set_logger(Logger(folder=None, output_formats=[writer]))
    kl_callback = KLPenaltyCallback(kl_coef=kl_coef)
    snapshot = RolloutSnapshot()
    model.learn(3 * n_steps * n_envs, callback=CallbackList([kl_callback, snapshot]))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()

    last = snapshot.snapshots[-1]
    log_probs, ref_log_probs = np.zeros((n_steps, n_envs)), np.zeros((n_steps, n_envs))
    for s in range(n_steps):
        for e in range(n_envs):
            ids, mask, action = last["obs"]["input_ids"][s, e], last["obs"]["attention_mask"][s, e], last["actions"][s, e, 0]
            log_probs[s, e] = hand_log_prob(last["lm"], ids, mask, action)
            ref_log_probs[s, e] = hand_log_prob(reference, ids, mask, action)
    # the buffer's log-probs are those of the policy that collected the rollout
    np.testing.assert_allclose(last["log_probs"], log_probs, atol=1e-5)
    kl = log_probs - ref_log_probs
    assert np.abs(kl).max() > 0.05  # after two updates the policy differs from the reference
    np.testing.assert_allclose(last["rewards"], last["raw_rewards"] - kl_coef * kl, atol=1e-5)
    # the logged KL: total over the finished episodes
    dones = np.concatenate([last["episode_starts"][1:], last["last_dones"][None]])
    assert kl_callback.last_kl == pytest.approx(kl.sum() / dones.sum(), abs=1e-5)
    assert writer.dumps[-1]["rollout/ref_kl"] == pytest.approx(kl.sum() / dones.sum(), abs=1e-5)
    assert writer.dumps[-1]["rollout/ref_kl_per_token"] == pytest.approx(kl.mean(), abs=1e-6)
    # returns and advantages were recomputed from the penalised rewards (gamma = lambda = 1: returns are sums)
    checked = 0
    for e in range(n_envs):
        ends = np.flatnonzero(dones[:, e])
        for s in range(n_steps):
            later_ends = ends[ends >= s]
            if len(later_ends) == 0:
                continue  # the episode is cut by the rollout's end: bootstrapped
            expected = last["rewards"][s : later_ends[0] + 1, e].sum()
            assert last["returns"][s, e] == pytest.approx(expected, abs=1e-5)
            checked += 1
    assert checked > n_steps
    np.testing.assert_allclose(last["advantages"], last["returns"] - last["values"], atol=1e-5)


def test_kl_coef_zero_leaves_rewards(tiny_llama_path):
    env = make_vec(tiny_llama_path)
    model = PPO("LMPolicy", env, n_steps=16, batch_size=16, learning_rate=3e-3, seed=0)
    kl_callback = KLPenaltyCallback(kl_coef=0.0)
    snapshot = RolloutSnapshot()
    model.learn(64, callback=CallbackList([kl_callback, snapshot]))
    assert kl_callback.last_kl != 0.0  # still measured
    np.testing.assert_array_equal(snapshot.snapshots[-1]["rewards"], snapshot.snapshots[-1]["raw_rewards"])


def test_logged_keys(tiny_llama_path):
    model = kl_model(tiny_llama_path)
    seen = {}

    class Grab(BaseCallback):
        def _on_step(self):
            return True

        def _on_rollout_end(self):
            seen.update(self.logger.name_to_value)

    kl_callback = KLPenaltyCallback(0.2)
    model.learn(32, callback=CallbackList([kl_callback, Grab()]))
    for key in ("rollout/ref_kl", "rollout/ref_kl_per_token", "rollout/score", "rollout/penalized_return", "train/kl_coef"):
        assert key in seen
    assert seen["train/kl_coef"] == 0.2
    assert seen["rollout/penalized_return"] == pytest.approx(seen["rollout/score"] - 0.2 * seen["rollout/ref_kl"])


def test_adaptive_kl_follows_its_target(tiny_llama_path):
    """The coefficient rises while the KL is above target and falls while below, once per rollout."""
    model = kl_model(tiny_llama_path)
    controller = AdaptiveKLController(kl_coef=0.05, target=0.5, horizon=40)
    kl_callback = KLPenaltyCallback(controller, estimator="k3")
    history = RolloutHistoryCallback(kl_callback)
    model.learn(32 * 12, callback=CallbackList([kl_callback, history]))
    coefs = [0.05] + [h["kl_coef"] for h in history.history]
    for before, after, h in zip(coefs[:-1], coefs[1:], history.history):
        error = np.clip(h["kl"] / 0.5 - 1, -0.2, 0.2)
        assert after == pytest.approx(before * (1 + error * h["episodes"] / 40), rel=1e-6)
        assert (after > before) == (h["kl"] > 0.5) or error == 0
    assert all(h["kl"] >= 0 for h in history.history)  # k3 is never negative
    assert model.logger.name_to_value  # the logger got its keys on each rollout


# --- RolloutHistoryCallback -------------------------------------------------------------------------------------------


def test_rollout_history_without_finished_episode(tiny_llama_path):
    # 8-token completions, 4 steps per rollout, 1 env: the first rollout finishes no episode, the second finishes one
    def no_eos_reward(prompts, completions):
        return [1.0] * len(completions)

    env = make_vec(tiny_llama_path, n_envs=1, max_new_tokens=8, reward_fn=no_eos_reward)
    model = PPO("LMPolicy", env, n_steps=4, batch_size=4, n_epochs=1, learning_rate=1e-5, seed=0)
    history = RolloutHistoryCallback()
    model.learn(8, callback=history)
    assert len(history.history) == 2
    first, second = history.history
    assert np.isnan(first["score"]) and first["episodes"] == 0.0 and np.isnan(first["kl"])
    assert (second["timesteps"], second["score"], second["episodes"]) == (8.0, 1.0, 1.0)
    assert np.isnan(first["eos_fraction"]) and second["eos_fraction"] == 0.0  # cut at 8 tokens, no EOS
    assert np.isnan(second["kl"])  # no KL callback given


def test_episode_scores_keep_the_ends_of_finished_episodes():
    episodes = EpisodeScores()
    infos = [{"score": 1.0, "eos": True}, {"score": 0.5, "eos": False}, {}, {"score": -1.0, "eos": False}]
    episodes.collect(infos, np.array([True, True, False, True]))
    episodes.collect([{"score": 2.0}], np.array([True]))  # an episode that does not say how it ended
    assert episodes.scores == [1.0, 0.5, -1.0, 2.0] and episodes.mean() == pytest.approx(0.625)
    assert episodes.eos == [True, False, False] and episodes.eos_fraction() == pytest.approx(1 / 3)
    episodes.clear()
    assert np.isnan(episodes.mean()) and np.isnan(episodes.eos_fraction())


# --- LMEvalCallback ---------------------------------------------------------------------------------------------------


def n_chars(prompts, completions):
    return [float(len(x)) for x in completions]


def eval_model(path: str) -> PPO:
    """PPO on one env of :data:`SHORT_PROMPTS`, 8 steps (two 4-token completions) per rollout."""
    env = gym.make(ENV_ID, model_name_or_path=path, prompts=SHORT_PROMPTS, reward_fn=n_chars, max_new_tokens=4)
    return PPO("LMPolicy", env, n_steps=8, batch_size=8, learning_rate=1e-3, seed=0)


def test_callback_logs_at_start_and_every_n_rollouts(tiny_llama_path, tmp_path):
    model = eval_model(tiny_llama_path)
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    callback = LMEvalCallback(["rain", "a cafe"], eval_freq=2, max_new_tokens=4, n_samples=2,
                              log_path=str(tmp_path / "eval"), reward_fn=n_chars)  # fmt: skip
    model.learn(8 * 4, callback=callback)
    # the before point (step 0), then every 2 rollouts of 8 steps
    assert [r["timesteps"] for r in callback.results] == [0.0, 16.0, 32.0]
    assert callback.protocol == dict(n_prompts=2, n_samples=2, seed=0, max_new_tokens=4, batch_size=16, greedy=True,
                                     temperature=1.0)  # fmt: skip
    assert len(callback.last_samples) == 2 and {"prompt", "greedy", "sampled"} <= set(callback.last_samples[0])
    assert (tmp_path / "eval" / "eval_curves.png").stat().st_size > 1000
    assert "| rain |" in (tmp_path / "eval" / "samples.md").read_text()
    with open(tmp_path / "log" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(float(r["time/total_timesteps"]), float(r["eval/reward_greedy"])) for r in rows if r["eval/reward_greedy"]]
    np.testing.assert_allclose(logged, [(r["timesteps"], r["reward_greedy"]) for r in callback.results])
    for key in ("eval/ref_kl", "eval/ref_perplexity", "eval/distinct_1", "eval/distinct_2", "eval/reward_sampled",
                "eval/reward_sampled_std", "eval/reward_sampled_sem", "eval/reward_sampled_ci95"):  # fmt: skip
        assert rows[0][key]
    assert all(r["reward_sampled_ci95"] > 0 for r in callback.results)
    state = callback.state_dict()
    other = LMEvalCallback(["rain"], eval_freq=2)
    other.load_state_dict(state)
    assert other.results == callback.results and other.n_rollouts == 4
    # a second learn() starts at a step already evaluated: no second point there
    model.learn(8 * 2, callback=callback, reset_num_timesteps=False)
    assert [r["timesteps"] for r in callback.results] == [0.0, 16.0, 32.0, 48.0]


def test_callback_defaults():
    callback = LMEvalCallback(["rain"])
    assert callback.evaluate_kwargs["n_samples"] == 8 and callback.evaluate_kwargs["seed"] == 0
    assert callback.eval_freq == 10


def test_callback_leaves_training_alone(tiny_llama_path):
    """Evaluating at every rollout (and at the start) changes neither the rollouts nor the weights."""
    states, histories = [], []
    for callbacks in ([], [LMEvalCallback(["rain", "a cafe"], eval_freq=1, max_new_tokens=3, n_samples=2)]):
        model = eval_model(tiny_llama_path)
        history = RolloutHistoryCallback()
        model.learn(8 * 3, callback=[history, *callbacks])
        states.append(model.policy.state_dict())
        histories.append(history.history)
    assert len(callbacks[0].results) == 4
    np.testing.assert_equal(histories[0], histories[1])  # NaN KLs compare equal
    for key in states[0]:
        assert th.equal(states[0][key], states[1][key]), key


def test_callback_takes_the_before_evaluation(tiny_llama_path):
    model = eval_model(tiny_llama_path)
    prompts = ["rain", "a cafe"]
    before = evaluate_prompts(model.policy, prompts, reward_fn=n_chars, max_new_tokens=3, n_samples=2)
    callback = LMEvalCallback(prompts, eval_freq=1, reward_fn=n_chars, max_new_tokens=3, n_samples=2, before=before)
    evaluated = []
    callback.evaluate = lambda: evaluated.append(callback.num_timesteps)  # counts evaluations, records none
    model.learn(8, callback=callback)
    assert evaluated == [8]  # none at step 0: ``before`` is that point
    assert callback.results[0]["timesteps"] == 0.0
    assert callback.results[0]["reward_sampled"] == before.reward_sampled
    assert callback.results[0]["reward_sampled_sem"] == before.reward_sampled_sem
    with pytest.raises(ValueError, match="protocol"):
        LMEvalCallback(prompts, max_new_tokens=3, n_samples=4, before=before)


def test_samples_markdown_escapes_pipes():
    table = samples_markdown([{"prompt": "a|b", "greedy": "x\ny", "greedy_score": 0.5, "sampled": "z", "sampled_score": -1}])
    assert "a\\|b" in table and "x y" in table and "+0.50" in table and "-1.00" in table


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(prompts=[]), "prompts"), (dict(prompts=["a"], eval_freq=0), "eval_freq"),
     (dict(prompts=["a"], n_samples=0), "n_samples"), (dict(prompts=["a"], seed=-1), "seed")],
)  # fmt: skip
def test_eval_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMEvalCallback(**kwargs)
