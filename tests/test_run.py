"""PPO, A2C and TRPO fine-tune an LMPolicy end to end: the weights move, the reference model does not, the reward rises."""

import numpy as np
import pytest
import torch as th
from conftest import make_vec
from sb3_contrib import TRPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import CallbackList
from transformers import AutoModelForCausalLM

import sb3_textrl
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback, RolloutHistoryCallback


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


def test_sb3_textrl_exports():
    assert sb3_textrl.KLPenaltyCallback is KLPenaltyCallback
    assert isinstance(sb3_textrl.__version__, str)


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
