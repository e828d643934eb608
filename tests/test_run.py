import copy
import string

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import TRPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import KVWriter, Logger
from transformers import AutoModelForCausalLM

import sb3_textrl
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback, RolloutHistoryCallback
from sb3_textrl.common.spaces import TokenObservationSpace

ENV_ID = "sb3_textrl/TextGeneration-v0"
PROMPTS = ["Hi", "Write one sentence about rain.", "Write a short review of a cafe."]


def letter_fraction(prompts, completions):
    """A trivially learnable reward: the fraction of ASCII letters in the completion (0 for an empty one)."""
    return [sum(ch in string.ascii_letters for ch in c) / len(c) if c else 0.0 for c in completions]


def make_vec(path, n_envs=2, max_new_tokens=4, reward_fn=letter_fraction, seed=0):
    env_kwargs = dict(model_name_or_path=path, prompts=PROMPTS, reward_fn=reward_fn, max_new_tokens=max_new_tokens)
    return make_vec_env(ENV_ID, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)


def hand_log_prob(lm, input_ids, attention_mask, action):
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
        self._raw = []

    def _on_rollout_start(self):
        self._raw = []

    def _on_step(self):
        self._raw.append(np.array(self.locals["rewards"], dtype=np.float32))
        return True

    def _on_rollout_end(self):
        buffer = self.model.rollout_buffer
        self.snapshots.append(
            dict(
                raw_rewards=np.stack(self._raw),
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


def test_weights_change_reference_does_not(tiny_llama_path):
    env = make_vec(tiny_llama_path)
    model = PPO("LMPolicy", env, n_steps=16, batch_size=16, n_epochs=2, learning_rate=1e-3, seed=0)
    lm_before = {k: v.clone() for k, v in model.policy.lm.state_dict().items()}
    head_before = model.policy.value_head.weight.clone()
    model.learn(64, callback=KLPenaltyCallback(kl_coef=0.05))
    changed = [k for k, v in model.policy.lm.state_dict().items() if not th.equal(v, lm_before[k])]
    assert len(changed) == len(lm_before)  # every LM tensor was trained
    assert not th.equal(model.policy.value_head.weight, head_before)
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    for (name, p), q in zip(model.policy.reference_model.named_parameters(), initial.parameters()):
        assert th.equal(p, q), name
    for k, v in model.policy.reference_model.state_dict().items():
        assert th.equal(v, lm_before[k])


def test_reward_rises(tiny_llama_path):
    env = make_vec(tiny_llama_path, n_envs=4, max_new_tokens=4)
    model = PPO(
        "LMPolicy",
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=4,
        learning_rate=3e-3,
        gamma=1.0,
        seed=1,
        rollout_buffer_class=EpisodeRolloutBuffer,
    )
    kl_callback = KLPenaltyCallback(kl_coef=0.05)
    history = RolloutHistoryCallback(kl_callback)
    model.learn(2048, callback=CallbackList([kl_callback, history]))
    assert len(history.history) == 16
    assert [h["timesteps"] for h in history.history] == [128.0 * (i + 1) for i in range(16)]
    assert all(h["episodes"] >= 32 for h in history.history)  # 4 envs * 32 steps, episodes of at most 4 tokens
    scores = [h["score"] for h in history.history]
    kls = [h["kl"] for h in history.history]
    first, last = np.mean(scores[:2]), np.mean(scores[-2:])
    assert last > first + 0.2, scores
    assert last > 0.6, scores
    assert abs(kls[0]) < 1e-4  # the policy starts as the reference model
    assert kls[-1] > 0.5  # ... and drifts away from it
    # Monitor saw the same episodes: its returns are the raw scores (the KL penalty only changes the buffer)
    n_last = int(history.history[-1]["episodes"])
    last_returns = [info["r"] for info in list(model.ep_info_buffer)[-n_last:]]
    assert np.mean(last_returns) == pytest.approx(scores[-1], abs=1e-5)


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


@pytest.mark.parametrize("kl_coef", [-0.1, float("nan"), float("inf")])
def test_kl_coef_must_be_valid(kl_coef):
    with pytest.raises(ValueError, match="kl_coef"):
        KLPenaltyCallback(kl_coef=kl_coef)


@pytest.mark.parametrize("algo", ["a2c", "trpo"])
def test_other_algorithms(tiny_llama_path, algo):
    env = make_vec(tiny_llama_path, n_envs=2, max_new_tokens=4)
    if algo == "a2c":
        model = A2C("LMPolicy", env, n_steps=8, learning_rate=1e-3, seed=0)
    else:
        model = TRPO(
            "LMPolicy",
            env,
            policy_kwargs=dict(model_kwargs=dict(attn_implementation="eager")),
            n_steps=32,
            batch_size=32,
            n_critic_updates=2,
            cg_max_steps=5,
            seed=0,
        )
    lm_before = [p.clone() for p in model.policy.lm.parameters()]
    kl_callback = KLPenaltyCallback(kl_coef=0.05)
    history = RolloutHistoryCallback(kl_callback)
    model.learn(256, callback=CallbackList([kl_callback, history]))
    assert model.num_timesteps == 256
    assert all(np.isfinite(h["score"]) and np.isfinite(h["kl"]) for h in history.history)
    assert any(not th.equal(p, q) for p, q in zip(model.policy.lm.parameters(), lm_before))
    for p, q in zip(model.policy.reference_model.parameters(), lm_before):
        assert th.equal(p, q)
    assert history.history[-1]["kl"] != 0.0


def make_buffer(n_steps, n_envs, starts):
    """A full EpisodeRolloutBuffer where transition (step s, env e) is tagged with the id ``s * n_envs + e``."""
    space = TokenObservationSpace(max_length=4, vocab_size=300)
    buffer = EpisodeRolloutBuffer(n_steps, space, gym.spaces.Discrete(300), n_envs=n_envs, gamma=1.0, gae_lambda=1.0)
    for s in range(n_steps):
        ids = s * n_envs + np.arange(n_envs)
        obs = {"input_ids": np.repeat(ids[:, None], 4, axis=1), "attention_mask": np.ones((n_envs, 4), dtype=np.int64)}
        buffer.add(
            obs,
            ids[:, None],
            reward=np.zeros(n_envs),
            episode_start=starts[s],
            value=th.as_tensor(ids, dtype=th.float32),
            log_prob=th.as_tensor(-ids, dtype=th.float32),
        )
    buffer.compute_returns_and_advantage(last_values=th.zeros(n_envs), dones=np.zeros(n_envs))
    return buffer


def episodes_by_hand(n_steps, n_envs, starts):
    episodes = []
    for e in range(n_envs):
        current = []
        for s in range(n_steps):
            if starts[s, e] and current:
                episodes.append(frozenset(current))
                current = []
            current.append(s * n_envs + e)
        episodes.append(frozenset(current))
    return episodes


@pytest.mark.parametrize("batch_size", [1, 5, 8, 64, None])
def test_episode_buffer_minibatches(batch_size):
    n_steps, n_envs = 12, 3
    rng = np.random.default_rng(0)
    starts = (rng.random((n_steps, n_envs)) < 0.3).astype(np.float32)
    starts[0] = [1, 0, 1]  # env 1's first episode was cut by the previous rollout
    starts[1:, 2] = 0  # env 2: one long episode of 12 steps
    buffer = make_buffer(n_steps, n_envs, starts)
    episodes = episodes_by_hand(n_steps, n_envs, starts)
    # the buffer's flat index i is env-major: i = e * n_steps + s
    from_buffer = [frozenset(int((i % n_steps) * n_envs + i // n_steps) for i in ep) for ep in buffer.episode_indices()]
    assert sorted(map(sorted, from_buffer)) == sorted(map(sorted, episodes))
    np.random.seed(0)
    orders = []
    for _epoch in range(3):
        seen = []
        for batch in buffer.get(batch_size):
            ids = batch.actions.flatten().long().tolist()
            # every field of a transition stays together
            assert batch.observations["input_ids"][:, 0].tolist() == ids
            assert batch.old_values.tolist() == ids
            assert batch.old_log_prob.tolist() == [-i for i in ids]
            batch_set = set(ids)
            assert len(batch_set) == len(ids)
            in_batch = [ep for ep in episodes if ep & batch_set]
            assert all(ep <= batch_set for ep in in_batch)  # whole episodes only
            assert set().union(*in_batch) == batch_set
            if batch_size is not None and len(in_batch) > 1:
                assert len(ids) <= batch_size
            seen += ids
        assert sorted(seen) == list(range(n_steps * n_envs))  # each transition exactly once per epoch
        orders.append(seen)
    assert orders[0] != orders[1] or orders[1] != orders[2]  # episodes are shuffled


class RecordingEpisodeBuffer(EpisodeRolloutBuffer):
    def reset(self):
        super().reset()
        self.batches = []

    def _get_samples(self, batch_inds, env=None):
        self.batches.append(np.array(batch_inds))
        return super()._get_samples(batch_inds, env)


def test_episode_buffer_in_ppo(tiny_llama_path):
    n_envs, n_steps, max_new_tokens = 2, 16, 3
    env = make_vec(tiny_llama_path, n_envs=n_envs, max_new_tokens=max_new_tokens)
    model = PPO(
        "LMPolicy", env, n_steps=n_steps, batch_size=8, n_epochs=2, seed=0, rollout_buffer_class=RecordingEpisodeBuffer
    )
    model.learn(n_steps * n_envs)
    buffer = model.rollout_buffer
    episodes = buffer.episode_indices()
    mask = buffer.observations["attention_mask"]  # flattened: (n_envs * n_steps, length)
    for episode in episodes:
        # the steps of an episode: one more attended token each, the earlier ones being prefixes
        lengths = mask[episode].sum(axis=1)
        np.testing.assert_array_equal(np.diff(lengths), 1)
        assert len(episode) <= max_new_tokens
    assert len(episodes) >= n_steps * n_envs // max_new_tokens
    owner = np.empty(n_steps * n_envs, dtype=int)
    for k, episode in enumerate(episodes):
        owner[episode] = k
    assert len(buffer.batches) >= 2 * (n_steps * n_envs // 8)
    epoch, seen = [], 0
    for batch in buffer.batches:
        assert len(batch) <= 8
        for k in np.unique(owner[batch]):
            assert set(episodes[k]) <= set(batch.tolist())
        epoch += batch.tolist()
        if len(epoch) == n_steps * n_envs:
            assert sorted(epoch) == list(range(n_steps * n_envs))
            epoch, seen = [], seen + 1
    assert seen == 2 and epoch == []


def test_sb3_textrl_exports():
    assert sb3_textrl.KLPenaltyCallback is KLPenaltyCallback
    assert isinstance(sb3_textrl.__version__, str)


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
    assert np.isnan(second["kl"])  # no KL callback given


class CheckedLMPolicy(sb3_textrl.LMPolicy):
    """Compares every distribution computed without gradients (KV cache path) with a full forward pass."""

    def get_distribution(self, obs):
        distribution = super().get_distribution(obs)
        if not th.is_grad_enabled():
            # SB3 reuses one distribution object: keep the torch distribution of the cached call aside
            cached = distribution.distribution
            self.use_kv_cache = False
            try:
                fresh = super().get_distribution(obs).distribution
            finally:
                self.use_kv_cache = True
            distribution.distribution = cached  # TRPO goes on with what the policy computed
            self.__dict__.setdefault("errors", []).append((cached.logits - fresh.logits).abs().max().item())
        return distribution


def test_trpo_line_search_sees_new_weights(tiny_llama_path):
    env = make_vec(tiny_llama_path, n_envs=2, max_new_tokens=4)
    model = TRPO(
        CheckedLMPolicy,
        env,
        policy_kwargs=dict(model_kwargs=dict(attn_implementation="eager")),
        n_steps=16,
        batch_size=32,
        n_critic_updates=1,
        cg_max_steps=5,
        seed=0,
    )
    model.learn(32)
    errors = model.policy.errors
    assert len(errors) >= 2  # the old distribution, then at least one line-search step
    assert max(errors) < 1e-4, errors
