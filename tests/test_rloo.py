"""RLOO (sb3_textrl.rloo): the leave-one-out baseline and the gradient by hand, learn, save/load, bad inputs."""

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from test_grpo import capture_gradients

from sb3_textrl.common.group_vec_env import make_group_vec_env
from sb3_textrl.common.vec_env import make_text_vec_env
from sb3_textrl.policies import LMPolicy
from sb3_textrl.rloo import RLOO

TOKEN_MATCH = "sb3_textrl/TokenMatch-v0"


class EpisodeReturns(BaseCallback):
    """Each env's return in the last rollout, summed from the step rewards."""

    def _on_rollout_start(self):
        self.returns = np.zeros(self.training_env.num_envs)

    def _on_step(self):
        self.returns[self.locals["running"]] += self.locals["rewards"][self.locals["running"]]
        return True


@pytest.mark.parametrize("batch_size", [None, 3])
def test_gradient_by_hand(batch_size):
    # TokenMatch "copy": a target of 3 tokens drawn per group (the group's seed), 1 per matching token
    env = make_group_vec_env(TOKEN_MATCH, n_envs=6, group_size=3, seed=2, env_kwargs=dict(length=3, vocab_size=4, mode="copy"))
    model = RLOO(
        "MlpPolicy", env, n_steps=3, batch_size=batch_size, max_grad_norm=None, seed=0, policy_kwargs=dict(net_arch=[8])
    )
    grads = capture_gradients(model)
    returns = EpisodeReturns()
    model.learn(total_timesteps=1, callback=returns)
    buffer = model.rollout_buffer
    scores = returns.returns  # env e played episode e
    np.testing.assert_array_equal(buffer.scores, scores)
    assert buffer.group_ids.tolist() == [buffer.group_ids[0]] * 3 + [buffer.group_ids[3]] * 3
    # leave-one-out, with loops: s_i minus the mean of the 2 other scores of its group
    advantages = [scores[i] - sum(scores[j] for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i) / 2 for i in range(6)]
    np.testing.assert_allclose(buffer.advantages[:, 0], np.repeat(advantages, 3))
    assert np.any(np.asarray(advantages) != 0)

    # -1/N sum_i A_i sum_t log pi(a_it | s_it), N = 6 completions
    model.policy.zero_grad()
    obs = th.as_tensor(buffer.observations[:, 0])
    log_prob = model.policy.get_distribution(obs).log_prob(th.as_tensor(buffer.actions[:, 0, 0]))
    (-(th.as_tensor(np.repeat(advantages, 3), dtype=th.float32) * log_prob).sum() / 6).backward()
    for name, p in model.policy.named_parameters():
        if p.grad is not None:
            th.testing.assert_close(grads[name], p.grad, atol=1e-7, rtol=1e-5)
    assert not any("value_net" in name for name in grads)  # no value loss
    assert model.logger.name_to_value["train/approx_kl"] == pytest.approx(0.0, abs=1e-6)


def test_learns_token_match():
    env = make_group_vec_env(TOKEN_MATCH, n_envs=8, group_size=4, seed=0, env_kwargs=dict(length=3, vocab_size=4))
    model = RLOO("MlpPolicy", env, n_steps=3, learning_rate=1e-2, seed=0, policy_kwargs=dict(net_arch=[16]))
    model.learn(total_timesteps=2400)
    assert np.mean([info["r"] for info in model.ep_info_buffer]) > 2.5  # optimum 3, chance 3 / 4


def test_lm_policy_learn_save_load(tiny_gpt2_path, tmp_path):
    env_kwargs = dict(
        model_name_or_path=tiny_gpt2_path,
        prompts=["Write one sentence about rain.", "Hi"],
        reward_fn=lambda prompts, completions: [float(len(c)) for c in completions],
        max_new_tokens=3,
    )
    env = make_text_vec_env(4, seed=0, env_kwargs=env_kwargs, group_size=2)
    model = RLOO(LMPolicy, env, n_steps=3, batch_size=4, beta=0.05, learning_rate=1e-3, seed=0)
    before = [p.detach().clone() for p in model.policy.lm.parameters()]
    model.learn(total_timesteps=20)  # two rounds
    assert model._n_updates == 2
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.lm.parameters()))
    for key in ["policy_gradient_loss", "entropy_loss", "approx_kl", "ref_kl"]:
        assert np.isfinite(model.logger.name_to_value[f"train/{key}"]), key
    model.save(tmp_path / "rloo.zip")
    loaded = RLOO.load(tmp_path / "rloo.zip", env=env)
    assert loaded.beta == 0.05
    obs = env.reset()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_steps=0), "`n_steps`"),
        (dict(batch_size=0), "`batch_size`"),
        (dict(beta=-0.1), "`beta`"),
        (dict(beta=0.1), "`beta`"),  # MlpPolicy has no reference model
    ],
)
def test_bad_arguments(kwargs, match):
    env = make_group_vec_env(TOKEN_MATCH, n_envs=4, group_size=2, seed=0, env_kwargs=dict(length=3, vocab_size=4))
    with pytest.raises(ValueError, match=match):
        RLOO("MlpPolicy", env, **kwargs)


def test_episode_longer_than_n_steps():
    env = make_group_vec_env(TOKEN_MATCH, n_envs=4, group_size=2, seed=0, env_kwargs=dict(length=3, vocab_size=4))
    with pytest.raises(ValueError, match="`n_steps`=2"):
        RLOO("MlpPolicy", env, n_steps=2, seed=0).learn(total_timesteps=10)
