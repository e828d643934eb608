import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env

import sb3_textrl  # noqa: F401  (registers the envs)
from sb3_textrl.envs import LinearToyEnv, TokenMatchEnv, TwoStateMDPEnv

ENV_CASES = [
    ("sb3_textrl/LinearToy-v0", {}),
    ("sb3_textrl/TwoStateMDP-v0", {}),
    ("sb3_textrl/TokenMatch-v0", {}),
    ("sb3_textrl/TokenMatch-v0", {"mode": "copy", "length": 5, "vocab_size": 300}),
    ("sb3_textrl/TokenMatch-v0", {"mode": "random"}),
    ("sb3_textrl/TokenMatch-v0", {"target_seed": None}),
]


def run_episode(env, policy, seed=0):
    """Return and length of one episode of ``policy(obs) -> action``."""
    obs, _ = env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += reward
        steps += 1
        done = terminated or truncated
    return total, steps


@pytest.mark.parametrize("env_id, kwargs", ENV_CASES)
def test_check_env(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        gym_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env)


@pytest.mark.parametrize("env_id, kwargs", ENV_CASES)
def test_render_ansi(env_id, kwargs):
    env = gym.make(env_id, render_mode="ansi", **kwargs)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    assert isinstance(env.render(), str) and env.render()


def test_registration():
    assert gym.spec("sb3_textrl/LinearToy-v0").max_episode_steps == 100
    assert gym.spec("sb3_textrl/TwoStateMDP-v0").max_episode_steps == 10
    assert gym.spec("sb3_textrl/TokenMatch-v0").max_episode_steps is None  # the env terminates itself
    assert isinstance(gym.make("sb3_textrl/LinearToy-v0").unwrapped, LinearToyEnv)
    assert isinstance(gym.make("sb3_textrl/TwoStateMDP-v0").unwrapped, TwoStateMDPEnv)
    assert isinstance(gym.make("sb3_textrl/TokenMatch-v0").unwrapped, TokenMatchEnv)


# --- LinearToy ----------------------------------------------------------------------------------------------------------


def test_linear_toy_spaces_and_start():
    env = gym.make("sb3_textrl/LinearToy-v0")
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert env.observation_space.shape == (1,) and env.observation_space.dtype == np.float32
    starts = np.array([env.reset(seed=seed)[0][0] for seed in range(2000)])
    assert abs(starts.mean()) < 0.1 and abs(starts.std() - 1.0) < 0.1  # N(0, 1)
    assert env.reset(seed=7)[0] == env.reset(seed=7)[0]
    expected = np.random.default_rng(7).normal(0.0, 1.0)  # drawn from self.np_random
    np.testing.assert_allclose(env.reset(seed=7)[0], [expected], rtol=1e-6)


def test_linear_toy_dynamics():
    env = gym.make("sb3_textrl/LinearToy-v0")
    s = float(env.reset(seed=0)[0][0])
    for action, move in [(0.5, 0.05), (-1.0, -0.1), (5.0, 0.1), (-3.0, -0.1)]:  # actions are clipped to [-1, 1]
        obs, reward, terminated, truncated, info = env.step(np.array([action], np.float32))
        s += move
        np.testing.assert_allclose(obs, [s], rtol=1e-5)
        assert reward == pytest.approx(-abs(s - 1.0), abs=1e-5) and isinstance(reward, float)
        assert terminated is False and truncated is False and info == {}
    with pytest.raises(ValueError, match="`action`"):
        env.step(np.array([np.nan]))


def test_linear_toy_episode_end():
    env = gym.make("sb3_textrl/LinearToy-v0")
    # the optimal policy reaches the goal: terminated with |s - 1| < 0.1
    obs, _ = env.reset(seed=1)
    terminated = truncated = False
    while not (terminated or truncated):
        obs, _, terminated, truncated, _ = env.step(np.sign(1.0 - obs))
    assert terminated and not truncated and abs(obs[0] - 1.0) < 0.1
    # standing still is truncated after 100 steps
    total, steps = run_episode(env, lambda obs: np.zeros(1, np.float32), seed=1)
    assert steps == 100 and total < 0


# --- TwoStateMDP --------------------------------------------------------------------------------------------------------


def test_two_state_mdp_transitions():
    env = TwoStateMDPEnv()
    expected = {(0, 0): (1, 1.0), (1, 1): (0, 0.0), (0, 1): (0, 0.0), (1, 0): (1, 0.0)}
    for (state, action), (next_state, reward) in expected.items():
        env.reset(seed=0)
        if state == 1:
            env.step(0)
        obs, r, terminated, truncated, _ = env.step(action)
        assert (obs, r, terminated, truncated) == (next_state, reward, False, False)
    with pytest.raises(ValueError, match="`action`"):
        env.step(2)


def test_two_state_mdp_returns():
    env = gym.make("sb3_textrl/TwoStateMDP-v0")
    assert env.reset(seed=0)[0] == 0
    optimal, steps = run_episode(env, lambda s: 0 if s == 0 else 1)
    assert (optimal, steps) == (5.0, 10)  # truncated after 10 steps
    rng = np.random.default_rng(0)
    random_returns = [run_episode(env, lambda s: int(rng.integers(2)))[0] for _ in range(2000)]
    assert np.mean(random_returns) == pytest.approx(2.75, abs=0.1)  # documented chance level


# --- TokenMatch ---------------------------------------------------------------------------------------------------------


def test_token_match_fixed_target_is_shared():
    envs = [gym.make("sb3_textrl/TokenMatch-v0", length=6, vocab_size=10) for _ in range(2)]
    targets = []
    for seed, env in enumerate(envs):
        obs, _ = env.reset(seed=seed)
        assert env.observation_space == gym.spaces.Box(0, 9, (1,), np.int64)
        assert obs.tolist() == [0]  # the position marker only
        targets.append(env.unwrapped.target.copy())
        env.reset(seed=seed + 10)
        np.testing.assert_array_equal(env.unwrapped.target, targets[-1])  # kept across resets
    np.testing.assert_array_equal(targets[0], targets[1])  # whatever the reset seeds
    np.testing.assert_array_equal(targets[0], np.random.default_rng(0).integers(10, size=6))
    other = gym.make("sb3_textrl/TokenMatch-v0", length=6, vocab_size=10, target_seed=1)
    other.reset(seed=0)
    assert not np.array_equal(other.unwrapped.target, targets[0])


def test_token_match_fixed_target_per_env_seed():
    env = gym.make("sb3_textrl/TokenMatch-v0", length=8, vocab_size=10, target_seed=None)
    env.reset(seed=3)
    first = env.unwrapped.target.copy()
    env.reset()
    np.testing.assert_array_equal(env.unwrapped.target, first)  # no seed: same target
    env.reset(seed=4)
    assert not np.array_equal(env.unwrapped.target, first)
    env.reset(seed=3)
    np.testing.assert_array_equal(env.unwrapped.target, first)


@pytest.mark.parametrize("mode", ["fixed", "copy", "random"])
def test_token_match_rewards_and_end(mode):
    env = gym.make("sb3_textrl/TokenMatch-v0", length=4, vocab_size=7, mode=mode)
    obs, _ = env.reset(seed=0)
    target = env.unwrapped.target.copy()
    if mode == "copy":
        assert env.observation_space == gym.spaces.Box(0, 6, (5,), np.int64)
        np.testing.assert_array_equal(obs[:4], target)
    rewards = []
    for t in range(4):
        assert obs[-1] == t and obs.dtype == np.int64 and obs in env.observation_space
        action = int(target[t]) if t % 2 == 0 else (int(target[t]) + 1) % 7
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        assert info == {"target_token": int(target[t]), "is_match": t % 2 == 0}
        assert terminated == (t == 3) and truncated is False
    assert rewards == [1.0, 0.0, 1.0, 0.0] and obs[-1] == 4
    env.reset(seed=1)
    assert np.array_equal(env.unwrapped.target, target) == (mode == "fixed")  # fresh targets in copy/random


def test_token_match_chance_and_optimum():
    env = gym.make("sb3_textrl/TokenMatch-v0", length=5, vocab_size=8, mode="copy")
    assert env.unwrapped.chance_return == 5 / 8 and env.unwrapped.optimal_return == 5.0
    assert gym.make("sb3_textrl/TokenMatch-v0", mode="random").unwrapped.optimal_return == 20 / 32
    copy_return, steps = run_episode(env, lambda obs: obs[obs[-1]])  # copy the token at the marked position
    assert (copy_return, steps) == (5.0, 5)
    rng = np.random.default_rng(0)
    chance = [run_episode(env, lambda obs: int(rng.integers(8)), seed=s)[0] for s in range(400)]
    assert np.mean(chance) == pytest.approx(5 / 8, abs=0.15)


def test_token_match_in_a_vec_env():
    env = make_vec_env("sb3_textrl/TokenMatch-v0", n_envs=3, seed=0, env_kwargs=dict(length=3, vocab_size=5))
    obs = env.reset()
    assert obs.shape == (3, 1) and obs.dtype == np.int64
    targets = env.get_attr("target")
    assert all(np.array_equal(t, targets[0]) for t in targets)  # one target to memorise across the copies


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(length=0), "`length`"),
        (dict(length=20, vocab_size=20), "`vocab_size`"),
        (dict(vocab_size=2.5), "`vocab_size`"),
        (dict(mode="hidden"), "`mode`"),
        (dict(target_seed="0"), "`target_seed`"),
    ],
)
def test_token_match_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenMatchEnv(**kwargs)


def test_token_match_bad_action():
    env = TokenMatchEnv(length=3, vocab_size=5)
    env.reset(seed=0)
    for action in (5, -1, 1.5):
        with pytest.raises(ValueError, match=r"`action` must be a token id, an integer in \[0, 5\)"):
            env.step(action)
