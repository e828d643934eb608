"""GAE is SB3's: ``RolloutBuffer.compute_returns_and_advantage`` (the code PPO and A2C use) checked against hand
computations of Schulman et al. (2016), https://arxiv.org/abs/1506.02438, eq. 16:
``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` and ``A_t = sum_l (gamma * lambda)^l * delta_{t+l}``."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env

import sb3_textrl  # noqa: F401  (registers the envs and "LMPolicy")
from sb3_textrl.envs.two_state_mdp import A1, A2, S1, S2


def make_buffer(n_steps, n_envs=1, gamma=0.9, gae_lambda=0.5, observation_space=None):
    observation_space = observation_space or gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    buffer = RolloutBuffer(n_steps, observation_space, gym.spaces.Discrete(2), "cpu", gae_lambda, gamma, n_envs)
    buffer.reset()
    return buffer


def fill(buffer, rewards, values, episode_starts, observations=None):
    """Add ``(n_steps, n_envs)`` rewards, values and episode starts to ``buffer``."""
    n_steps, n_envs = rewards.shape
    for t in range(n_steps):
        obs = np.zeros((n_envs, *buffer.obs_shape), np.float32) if observations is None else observations[t]
        buffer.add(
            obs,
            np.zeros((n_envs, 1)),
            rewards[t].astype(np.float32),
            episode_starts[t].astype(np.float32),
            th.as_tensor(values[t], dtype=th.float32),
            th.zeros(n_envs),
        )


def reference_gae(rewards, values, episode_starts, last_values, last_dones, gamma, gae_lambda):
    """
    GAE written from its definition, independently of SB3's backward recursion: for each step, the forward sum of the
    discounted TD errors up to (and including) the step that ends its episode, or up to the end of the rollout.
    """
    n_steps, n_envs = rewards.shape
    dones = np.concatenate([episode_starts[1:], last_dones[None]]).astype(bool)  # dones[t]: episode ends at step t
    next_values = np.concatenate([values[1:], last_values[None]])
    deltas = rewards + gamma * next_values * ~dones - values
    advantages = np.zeros((n_steps, n_envs))
    for env in range(n_envs):
        for t in range(n_steps):
            total = 0.0
            for k in range(t, n_steps):
                total += (gamma * gae_lambda) ** (k - t) * deltas[k, env]
                if dones[k, env]:
                    break
            advantages[t, env] = total
    return advantages


def test_worked_example():
    # s1 --a1--> s2 (r=1), s2 --a2--> s1 (r=0), gamma=0.9, lambda=0.5, V=0: A(s1, a1) = 1
    env = gym.make("sb3_textrl/TwoStateMDP-v0")
    obs, _ = env.reset(seed=0)
    assert obs == S1
    rewards, observations = [], [obs]
    for action in (A1, A2):
        obs, reward, *_ = env.step(action)
        rewards.append(reward)
        observations.append(obs)
    assert rewards == [1.0, 0.0] and observations == [S1, S2, S1]

    buffer = make_buffer(2, observation_space=env.observation_space)
    fill(buffer, np.array([rewards]).T, np.zeros((2, 1)), np.array([[1.0], [0.0]]), np.array(observations[:2])[:, None, None])
    buffer.compute_returns_and_advantage(last_values=th.zeros(1), dones=np.array([False]))
    # delta_0 = 1 + 0.9 * 0 - 0 = 1, delta_1 = 0: A(s1, a1) = 1 + 0.45 * 0 = 1, A(s2, a2) = 0
    np.testing.assert_allclose(buffer.advantages[:, 0], [1.0, 0.0])
    np.testing.assert_allclose(buffer.returns[:, 0], [1.0, 0.0])


@pytest.mark.parametrize("last_done", [False, True])
def test_worked_example_with_values(last_done):
    # V(s1) = 0.5, V(s2) = 2.0, gamma = 0.9, lambda = 0.5, trajectory s1, a1, r=1, s2, a2, r=0, then s1 again
    v1, v2 = 0.5, 2.0
    buffer = make_buffer(2)
    fill(buffer, np.array([[1.0], [0.0]]), np.array([[v1], [v2]]), np.array([[1.0], [0.0]]))
    buffer.compute_returns_and_advantage(last_values=th.tensor([v1]), dones=np.array([last_done]))
    delta_0 = 1.0 + 0.9 * v2 - v1  # 2.3
    delta_1 = 0.0 + 0.9 * v1 * (not last_done) - v2  # -1.55, or -2.0 when the episode ends at s1
    a_1 = delta_1
    a_0 = delta_0 + 0.9 * 0.5 * delta_1  # 1.6025 (or 1.4)
    np.testing.assert_allclose(buffer.advantages[:, 0], [a_0, a_1], rtol=1e-6)
    np.testing.assert_allclose(buffer.returns[:, 0], [a_0 + v1, a_1 + v2], rtol=1e-6)
    assert a_0 == pytest.approx(1.4 if last_done else 1.6025)


@pytest.mark.parametrize("gae_lambda", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rollouts_match_reference(gae_lambda, seed):
    rng = np.random.default_rng(seed)
    n_steps, n_envs, gamma = 17, 3, 0.97
    rewards = rng.normal(size=(n_steps, n_envs))
    values = rng.normal(size=(n_steps, n_envs))
    episode_starts = rng.random((n_steps, n_envs)) < 0.25
    episode_starts[0] = rng.random(n_envs) < 0.5
    episode_starts[1:4, 0] = [True, True, True]  # one-step episodes back to back
    last_values = rng.normal(size=n_envs)
    last_dones = np.array([True, False, rng.random() < 0.5])
    assert episode_starts[1:].sum() >= 3  # episode boundaries inside the rollout

    buffer = make_buffer(n_steps, n_envs, gamma, gae_lambda)
    fill(buffer, rewards, values, episode_starts)
    buffer.compute_returns_and_advantage(last_values=th.as_tensor(last_values, dtype=th.float32), dones=last_dones)

    # the buffer stores float32: the reference gets the same rounded inputs
    f32 = [x.astype(np.float32).astype(np.float64) for x in (rewards, values, last_values)]
    expected = reference_gae(f32[0], f32[1], episode_starts, f32[2], last_dones, gamma, gae_lambda)
    np.testing.assert_allclose(buffer.advantages, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(buffer.returns, expected + f32[1], rtol=1e-5, atol=1e-5)


def test_lambda_one_is_discounted_return():
    # TD(1): the returns are the discounted sums of rewards to the episode end, whatever the values
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=(6, 1))
    values = rng.normal(size=(6, 1))
    episode_starts = np.array([[1.0], [0.0], [0.0], [1.0], [0.0], [0.0]])
    buffer = make_buffer(6, gamma=0.9, gae_lambda=1.0)
    fill(buffer, rewards, values, episode_starts)
    buffer.compute_returns_and_advantage(last_values=th.tensor([5.0]), dones=np.array([True]))
    r = rewards[:, 0].astype(np.float32)
    expected = [
        r[0] + 0.9 * r[1] + 0.81 * r[2],
        r[1] + 0.9 * r[2],
        r[2],
        r[3] + 0.9 * r[4] + 0.81 * r[5],
        r[4] + 0.9 * r[5],
        r[5],
    ]
    np.testing.assert_allclose(buffer.returns[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_lm_policy_values_reach_the_buffer_unchanged(tiny_llama_path):
    env = make_vec_env("sb3_textrl/TokenMatch-v0", n_envs=2, seed=0, env_kwargs=dict(length=3, vocab_size=300, mode="copy"))
    model = PPO(
        "LMPolicy",
        env,
        n_steps=5,
        batch_size=10,
        gamma=0.9,
        gae_lambda=0.8,
        seed=0,
        policy_kwargs=dict(model_name_or_path=tiny_llama_path, use_reference_model=False),
    )
    policy = model.policy
    with th.no_grad():  # a value head that is not zero, so the values tell steps apart
        th.nn.init.normal_(policy.value_head.weight, std=1.0)
        policy.value_head.bias.fill_(0.3)

    forward_values, last_values = [], []
    forward, predict_values = policy.forward, policy.predict_values

    def recording_forward(obs, deterministic=False):
        actions, values, log_probs = forward(obs, deterministic)
        forward_values.append(values.clone())
        return actions, values, log_probs

    def recording_predict_values(obs):
        values = predict_values(obs)
        last_values.append(values.clone())
        return values

    policy.forward, policy.predict_values = recording_forward, recording_predict_values
    _, callback = model._setup_learn(total_timesteps=10, callback=None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=5)
    buffer = model.rollout_buffer

    # what forward returned is what the buffer holds, bit for bit
    np.testing.assert_array_equal(buffer.values, th.cat(forward_values, dim=1).T.numpy())
    assert np.abs(buffer.values).max() > 0.1 and np.unique(buffer.values).size > 2
    # and it is the value of the stored observation, recomputed without the rollout's KV cache
    flat_obs = th.as_tensor(buffer.observations.reshape(-1, buffer.observations.shape[-1]))
    with th.enable_grad():
        recomputed = predict_values(flat_obs).detach().numpy().reshape(buffer.values.shape)
    np.testing.assert_allclose(buffer.values, recomputed, rtol=1e-5, atol=1e-5)
    # the advantages are GAE of those values (episodes of 3 steps end inside the 5-step rollout)
    assert buffer.episode_starts[1:].sum() > 0
    expected = reference_gae(
        buffer.rewards.astype(np.float64),
        buffer.values.astype(np.float64),
        buffer.episode_starts,
        last_values[-1].flatten().numpy().astype(np.float64),
        model._last_episode_starts,
        0.9,
        0.8,
    )
    np.testing.assert_allclose(buffer.advantages, expected, rtol=1e-5, atol=1e-5)
