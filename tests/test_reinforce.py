import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_textrl
from sb3_textrl import REINFORCE, LMPolicy
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.reinforce import incomplete_episode_mask

REWARDS = np.array([1.0, -0.5, 2.0])
OBS = 0.5


class OneStepEnv(gym.Env):
    """A three-armed bandit: one step, observation [0.5], reward ``REWARDS[action]``."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([OBS], np.float32), {}

    def step(self, action):
        return np.array([OBS], np.float32), float(REWARDS[int(action)]), True, False, {}


def linear_policy_kwargs(**kwargs):
    """No hidden layers: logits = W * obs + b, V = w * obs + c."""
    return dict(net_arch=dict(pi=[], vf=[]), **kwargs)


def test_alias_and_export():
    assert sb3_textrl.REINFORCE is REINFORCE
    assert REINFORCE.policy_aliases["LMPolicy"] is LMPolicy
    assert REINFORCE.policy_aliases["MlpPolicy"] is ActorCriticPolicy
    assert "LMPolicy" not in OnPolicyAlgorithm.policy_aliases  # no leak into the shared dict


def test_cartpole_run_and_logger_keys():
    model = REINFORCE("MlpPolicy", "CartPole-v1", n_steps=64, seed=0, policy_kwargs=dict(net_arch=[16]))
    model.learn(total_timesteps=64)  # one rollout, then train(): its keys are still in the logger
    logged = model.logger.name_to_value
    for key in ["policy_gradient_loss", "value_loss", "entropy_loss", "explained_variance", "n_updates"]:
        assert f"train/{key}" in logged
    assert logged["train/n_updates"] == 1


@pytest.mark.parametrize("use_baseline", [True, False])
@pytest.mark.parametrize("normalize_returns", [False, True])
def test_gradient_equals_hand_computation(use_baseline, normalize_returns):
    n = 16
    model = REINFORCE(
        "MlpPolicy",
        DummyVecEnv([OneStepEnv]),
        learning_rate=1.0,
        n_steps=n,
        gamma=0.9,
        use_baseline=use_baseline,
        normalize_returns=normalize_returns,
        vf_coef=0.7,
        max_grad_norm=None,
        seed=0,
        policy_kwargs=linear_policy_kwargs(),
    )
    policy = model.policy
    with th.no_grad():  # a policy far from uniform and, with a baseline, a value that is not zero
        policy.action_net.weight.copy_(th.tensor([[0.3], [-0.2], [0.1]]))
        policy.action_net.bias.copy_(th.tensor([0.2, 0.5, -0.4]))
        if use_baseline:
            policy.value_net.weight.fill_(0.6)
            policy.value_net.bias.fill_(0.2)
    policy.optimizer.step = lambda *args, **kwargs: None  # keep the gradient, leave the parameters
    model.learn(total_timesteps=n)

    actions = model.rollout_buffer.actions.flatten().astype(int)
    assert len(set(actions)) > 1
    logits = np.array([0.3, -0.2, 0.1]) * OBS + np.array([0.2, 0.5, -0.4])
    pi = np.exp(logits) / np.exp(logits).sum()
    value = 0.6 * OBS + 0.2 if use_baseline else 0.0
    returns = REWARDS[actions]  # one step: G = r
    weights = returns - value
    if normalize_returns:
        weights = (weights - weights.mean()) / (weights.std() + 1e-8)
    # d/dlogits of -mean(w * log pi(a)) = -mean(w * (onehot(a) - pi)); logits = W * obs + b
    grad_logits = -(weights[:, None] * (np.eye(3)[actions] - pi)).mean(axis=0)
    np.testing.assert_allclose(policy.action_net.bias.grad.numpy(), grad_logits, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(policy.action_net.weight.grad.numpy()[:, 0], grad_logits * OBS, rtol=1e-4, atol=1e-6)
    if use_baseline:
        # d/dV of vf_coef * mean((G - V)^2) = -2 * vf_coef * mean(G - V); V = w * obs + c
        grad_value = -2 * 0.7 * (returns - value).mean()
        np.testing.assert_allclose(policy.value_net.bias.grad.numpy(), [grad_value], rtol=1e-4)
        np.testing.assert_allclose(policy.value_net.weight.grad.numpy(), [[grad_value * OBS]], rtol=1e-4)
    else:
        assert policy.value_net.bias.grad is None and float(policy.value_net.bias) == 0.0


def test_gradient_accumulation_matches_one_batch():
    grads = []
    for batch_size in (None, 5, 16):
        model = REINFORCE(
            "MlpPolicy",
            "sb3_textrl/TwoStateMDP-v0",
            n_steps=32,
            batch_size=batch_size,
            max_grad_norm=None,
            seed=0,
            policy_kwargs=dict(net_arch=[8]),
        )
        model.policy.optimizer.step = lambda *args, **kwargs: None
        model.learn(total_timesteps=32)
        grads.append(th.cat([p.grad.flatten() for p in model.policy.parameters() if p.grad is not None]))
    for grad in grads[1:]:
        th.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-6)


def test_incomplete_episode_mask():
    episode_starts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32)
    last_dones = np.array([False, True, False])
    expected = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 1], [1, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(incomplete_episode_mask(episode_starts, last_dones), expected)


def discounted_returns(rewards, gamma):
    out, total = np.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        total = rewards[t] + gamma * total
        out[t] = total
    return out


def test_monte_carlo_returns_without_baseline():
    # TwoStateMDP episodes are 10 steps (truncated): 25 steps are two whole episodes and 5 steps of a third
    model = REINFORCE("MlpPolicy", "sb3_textrl/TwoStateMDP-v0", n_steps=25, gamma=0.9, use_baseline=False, seed=0)
    _, callback = model._setup_learn(total_timesteps=25, callback=None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=25)
    buffer = model.rollout_buffer
    assert np.all(buffer.values == 0.0)  # the value output layer is zero: no value enters the returns
    weights, n_kept = model.policy_gradient_weights()
    rewards = buffer.rewards[:, 0]
    expected = np.concatenate([discounted_returns(rewards[:10], 0.9), discounted_returns(rewards[10:20], 0.9)])
    np.testing.assert_allclose(weights[:20, 0], expected, rtol=1e-5, atol=1e-6)
    assert n_kept == 20 and np.all(weights[20:] == 0.0)  # the running episode is left out

    with_baseline = REINFORCE("MlpPolicy", "sb3_textrl/TwoStateMDP-v0", n_steps=25, gamma=0.9, seed=0)
    _, callback = with_baseline._setup_learn(total_timesteps=25, callback=None)
    with_baseline.collect_rollouts(with_baseline.env, callback, with_baseline.rollout_buffer, n_rollout_steps=25)
    weights, n_kept = with_baseline.policy_gradient_weights()
    assert n_kept == 25  # bootstrapped with the value
    np.testing.assert_array_equal(weights, with_baseline.rollout_buffer.advantages)


def test_warns_when_no_episode_ends():
    model = REINFORCE("MlpPolicy", "sb3_textrl/TwoStateMDP-v0", n_steps=4, use_baseline=False, seed=0)
    with pytest.warns(UserWarning, match="No episode ended"):
        model.learn(total_timesteps=4)
    assert model._n_updates == 0


def test_solves_two_state_mdp():
    model = REINFORCE(
        "MlpPolicy", "sb3_textrl/TwoStateMDP-v0", n_steps=100, learning_rate=3e-2, seed=0, policy_kwargs=dict(net_arch=[16])
    )
    model.learn(total_timesteps=2000)
    mean_return, _ = evaluate_policy(model, gym.make("sb3_textrl/TwoStateMDP-v0"), n_eval_episodes=10)
    assert mean_return == 5.0  # the optimum (a uniformly random policy: 2.75)


def test_solves_token_match_fixed():
    env_kwargs = dict(length=4, vocab_size=8, mode="fixed")
    env = make_vec_env("sb3_textrl/TokenMatch-v0", n_envs=4, seed=0, env_kwargs=env_kwargs)
    model = REINFORCE(
        "MlpPolicy", env, n_steps=8, learning_rate=1e-2, ent_coef=0.02, seed=0, policy_kwargs=dict(net_arch=[64])
    )
    model.learn(total_timesteps=8000)
    eval_env = gym.make("sb3_textrl/TokenMatch-v0", **env_kwargs)
    greedy, _ = evaluate_policy(model, eval_env, n_eval_episodes=5)
    sampled, _ = evaluate_policy(model, eval_env, n_eval_episodes=50, deterministic=False)
    assert greedy == 4.0  # the optimum (chance: 4 / 8 = 0.5)
    assert sampled >= 3.5


def test_save_load(tmp_path):
    model = REINFORCE(
        "MlpPolicy", "sb3_textrl/TwoStateMDP-v0", n_steps=20, batch_size=10, use_baseline=False, normalize_returns=True, seed=0
    )
    model.learn(total_timesteps=40)
    model.save(tmp_path / "reinforce.zip")
    loaded = REINFORCE.load(tmp_path / "reinforce.zip")
    assert (loaded.batch_size, loaded.use_baseline, loaded.normalize_returns, loaded.gae_lambda) == (10, False, True, 1.0)
    obs = np.array([0, 1])
    for a, b in zip(model.policy.parameters(), loaded.policy.parameters()):
        th.testing.assert_close(a, b)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    assert float(loaded.policy.value_net.weight.abs().sum()) == 0.0
    loaded.set_env(model.get_env())
    loaded.learn(total_timesteps=20)


def test_lm_policy(tiny_llama_path, tmp_path):
    env_kwargs = dict(length=3, vocab_size=300, mode="copy")
    env = make_vec_env("sb3_textrl/TokenMatch-v0", n_envs=2, seed=0, env_kwargs=env_kwargs)
    model = REINFORCE(
        "LMPolicy",
        env,
        n_steps=6,
        batch_size=4,
        ent_coef=0.01,  # a gradient even when no token matches (chance 1 / 300)
        seed=0,
        policy_kwargs=dict(model_name_or_path=tiny_llama_path, use_reference_model=False),
    )
    assert isinstance(model.policy, LMPolicy)
    before = [p.detach().clone() for p in model.policy.lm.parameters()]
    model.learn(total_timesteps=24)  # two rollouts of 2 x 6 steps
    assert model._n_updates == 2
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.lm.parameters()))  # the LM is trained
    model.save(tmp_path / "lm.zip")
    loaded = REINFORCE.load(tmp_path / "lm.zip")
    obs = env.reset()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


def test_lm_policy_episode_buffer(tiny_gpt2_path):
    # the text environment with minibatches of whole episodes
    env = gym.make(
        "sb3_textrl/TextGeneration-v0",
        model_name_or_path=tiny_gpt2_path,
        prompts=["Write one sentence about rain.", "Hi"],
        reward_fn=lambda prompts, completions: [float(len(c)) for c in completions],
        max_new_tokens=3,
    )
    model = REINFORCE("LMPolicy", env, n_steps=8, batch_size=4, rollout_buffer_class=EpisodeRolloutBuffer, seed=0)
    model.learn(total_timesteps=8)
    assert model._n_updates == 1 and np.isfinite(model.logger.name_to_value["train/policy_gradient_loss"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_steps=0), "`n_steps`"),
        (dict(batch_size=0), "`batch_size`"),
        (dict(n_steps=1, normalize_returns=True), "`normalize_returns=True`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        REINFORCE("MlpPolicy", "sb3_textrl/TwoStateMDP-v0", **kwargs)


class CriticPolicy(ActorCriticPolicy):
    """A policy whose value layer has another name."""

    def _build(self, lr_schedule):
        super()._build(lr_schedule)
        self.critic = self.value_net
        del self.value_net


def test_no_baseline_needs_a_known_value_layer():
    with pytest.raises(ValueError, match=r"`use_baseline=False`.*CriticPolicy"):
        REINFORCE(CriticPolicy, "sb3_textrl/TwoStateMDP-v0", use_baseline=False)
