"""EpisodeRolloutBuffer (sb3_textrl.common.buffers): minibatches of whole episodes, in a random episode order."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import make_vec
from stable_baselines3 import PPO

from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.spaces import TokenObservationSpace


def make_buffer(n_steps, n_envs, starts, waiting=None, rewards=None, **kwargs):
    """
    A full EpisodeRolloutBuffer where transition (step s, env e) is tagged with the id ``s * n_envs + e``; ``waiting``
    ``(n_steps, n_envs)`` bool marks empty observations (envs waiting for their round), ``rewards`` the rewards.
    """
    space = TokenObservationSpace(max_length=4, vocab_size=300)
    buffer = EpisodeRolloutBuffer(
        n_steps, space, gym.spaces.Discrete(300), n_envs=n_envs, gamma=1.0, gae_lambda=1.0, **kwargs
    )
    waiting = np.zeros((n_steps, n_envs), dtype=bool) if waiting is None else waiting
    rewards = np.zeros((n_steps, n_envs)) if rewards is None else rewards
    for s in range(n_steps):
        ids = s * n_envs + np.arange(n_envs)
        mask = np.repeat(~waiting[s, :, None], 4, axis=1).astype(np.int64)
        obs = {"input_ids": np.repeat(ids[:, None], 4, axis=1), "attention_mask": mask}
        buffer.add(
            obs,
            ids[:, None],
            reward=rewards[s],
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


def test_whiten_advantages_over_the_rollout():
    n_steps, n_envs = 6, 3
    rng = np.random.default_rng(1)
    starts = np.zeros((n_steps, n_envs), dtype=np.float32)
    starts[0] = 1
    starts[3, 0] = 1
    waiting = np.zeros((n_steps, n_envs), dtype=bool)
    waiting[4:, 1] = True  # env 1's episode ended after 4 steps: it waits for the round's end
    rewards = rng.normal(size=(n_steps, n_envs))
    plain = make_buffer(n_steps, n_envs, starts, waiting, rewards)
    whitened = make_buffer(n_steps, n_envs, starts, waiting, rewards, whiten_advantages=True)
    real = plain.advantages[~waiting]
    expected = (real - real.mean()) / real.std()
    np.testing.assert_allclose(whitened.advantages[~waiting], expected, rtol=1e-5)
    np.testing.assert_allclose(whitened.advantages[waiting], plain.advantages[waiting])  # waiting steps untouched
    np.testing.assert_allclose(whitened.returns, plain.returns)  # the value targets stay as computed
    assert abs(real.mean()) > 0.1  # the check above is not trivially true


class RecordingEpisodeBuffer(EpisodeRolloutBuffer):
    """Keeps the flat indices of every minibatch it yields (through SB3's ``_get_samples`` hook: no public one)."""

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
