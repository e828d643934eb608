"""GRPO (sb3_textrl.grpo): the gradient by hand, rounds of whole groups, the loss variants, KL, learn and save/load."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env

from sb3_textrl.common.callbacks import KLPenaltyCallback
from sb3_textrl.common.group_buffers import DictGroupRolloutBuffer, GroupRolloutBuffer
from sb3_textrl.common.group_vec_env import make_group_vec_env
from sb3_textrl.common.kl import estimate_kl
from sb3_textrl.common.vec_env import make_text_vec_env
from sb3_textrl.grpo import GRPO, clipped_surrogate_loss
from sb3_textrl.policies import LMPolicy

TEXT_ID = "sb3_textrl/TextGeneration-v0"
PROMPTS = ["Write one sentence about rain.", "Hi", "The sun"]


def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def text_env_kwargs(path, max_new_tokens=3):
    return dict(model_name_or_path=path, prompts=PROMPTS, reward_fn=length_reward, max_new_tokens=max_new_tokens)


class PromptEnv(gym.Env):
    """Toy prompts: observation ``[prompt_index, t]``, action 0 ends the episode, reward 1 for action 1; refuses steps
    after its end (see tests/test_groups.py)."""

    def __init__(self, n_prompts=5, max_len=4):
        self.prompts = [f"prompt {i}" for i in range(n_prompts)]
        self.max_len = max_len
        self.observation_space = gym.spaces.Box(0.0, 100.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(3)
        self.done = True

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.prompt_index = int((options or {}).get("prompt_index", self.np_random.integers(len(self.prompts))))
        self.t, self.done = 0, False
        return np.array([self.prompt_index, 0], np.float32), {}

    def step(self, action):
        assert not self.done, "stepped after the episode's end"
        self.t += 1
        self.done = int(action) == 0 or self.t >= self.max_len
        return np.array([self.prompt_index, self.t], np.float32), float(int(action) == 1), self.done, False, {}


class Recorder(BaseCallback):
    """Keeps, per rollout, the running envs of each step, the ended episodes' (env, info) and the logged values."""

    def __init__(self):
        super().__init__()
        self.rollouts = []

    def _on_rollout_start(self):
        self.rollouts.append(dict(running=[], ended=[], logged=None, group_ids=None))

    def _on_step(self):
        self.rollouts[-1]["running"].append(self.locals["running"].copy())
        self.rollouts[-1]["ended"] += [(e, dict(self.locals["infos"][e])) for e in np.flatnonzero(self.locals["dones"])]
        return True

    def _on_rollout_end(self):
        self.rollouts[-1]["logged"] = dict(self.model.logger.name_to_value)
        self.rollouts[-1]["group_ids"] = self.model.rollout_buffer.group_ids.copy()


def capture_gradients(model):
    """Replace the optimizer's step by a copy of the gradients (the parameters stay)."""
    grads = {}

    def step(*args, **kwargs):
        grads.update({name: p.grad.clone() for name, p in model.policy.named_parameters() if p.grad is not None})

    model.policy.optimizer.step = step
    return grads


def hand_group_advantages(scores, group_ids):
    """(s - group mean) / (group sample std + 1e-4), with loops."""
    advantages = np.zeros(len(scores))
    for g in set(group_ids.tolist()):
        members = [i for i in range(len(scores)) if group_ids[i] == g]
        values = [scores[i] for i in members]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        for i in members:
            advantages[i] = (scores[i] - mean) / (std + 1e-4)
    return advantages


def perturb(lm, scale=0.05):
    """Move the LM away from its reference copy."""
    generator = th.Generator().manual_seed(1)
    with th.no_grad():
        for p in lm.parameters():
            p.add_(scale * th.randn(p.shape, generator=generator))


# --- the gradient, by hand --------------------------------------------------------------------------------------------


def test_one_epoch_gradient_is_reinforce_with_the_group_baseline(tiny_llama_path):
    env = make_group_vec_env(TEXT_ID, n_envs=4, group_size=2, seed=0, env_kwargs=text_env_kwargs(tiny_llama_path))
    model = GRPO(
        LMPolicy, env, n_steps=3, learning_rate=1e-3, max_grad_norm=None, seed=0, policy_kwargs=dict(use_reference_model=False)
    )
    grads = capture_gradients(model)
    recorder = Recorder()
    model.learn(total_timesteps=1, callback=recorder)  # one round, one update
    assert model._n_updates == 1 and grads

    buffer = model.rollout_buffer
    ended = dict(recorder.rollouts[0]["ended"])
    scores = np.array([ended[e]["score"] for e in range(4)])  # the envs' own scores, episode e is env e's
    np.testing.assert_allclose(buffer.scores, scores)
    group_ids = np.array([ended[e]["group"] for e in range(4)])
    assert group_ids[0] == group_ids[1] != group_ids[2] == group_ids[3]
    advantages = hand_group_advantages(scores, group_ids)

    # REINFORCE with the group baseline: -sum_i 1/(n |o_i|) sum_t A_i log pi(a_it | s_it)
    lengths = buffer.episode_lengths
    rows = np.arange(buffer.buffer_size)
    weights = np.repeat(1.0 / (4 * lengths), lengths) * np.repeat(advantages, lengths)
    model.policy.zero_grad()
    _, log_prob, _ = model.policy.evaluate_actions(buffer.observations_at(rows), th.as_tensor(buffer.actions[:, 0, 0]))
    th.testing.assert_close(log_prob.detach(), th.as_tensor(buffer.log_probs[:, 0]), atol=1e-5, rtol=0)  # ratio 1
    (-(th.as_tensor(weights, dtype=th.float32) * log_prob).sum()).backward()
    for name, p in model.policy.named_parameters():
        if p.grad is not None:
            th.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4)
    assert set(grads) == {name for name, p in model.policy.named_parameters() if p.grad is not None}
    assert not any(name.startswith("value_head") for name in grads)  # no value loss


def test_clipped_surrogate_by_hand():
    ratio, advantages = th.tensor([0.5, 1.5, 1.25, 0.7]), th.tensor([1.0, 1.0, -1.0, -2.0])
    # clip to [0.8, 1.3]: min(0.5, 0.8) = 0.5; min(1.5, 1.3) = 1.3; min(-1.25, -1.25); min(-1.4, -1.6) = -1.6
    th.testing.assert_close(clipped_surrogate_loss(ratio, advantages, 0.2, 0.3), th.tensor([-0.5, -1.3, 1.25, 1.6]))
    # symmetric [0.8, 1.2]: min(1.5, 1.2) = 1.2; min(-1.25, -1.2) = -1.25
    th.testing.assert_close(clipped_surrogate_loss(ratio, advantages, 0.2), th.tensor([-0.5, -1.2, 1.25, 1.6]))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_logged_loss_is_the_weighted_surrogate(loss_type, scale_rewards):
    env = make_group_vec_env(PromptEnv, n_envs=6, group_size=3, seed=3, env_kwargs=dict(max_len=4))
    model = GRPO(
        "MlpPolicy", env, n_steps=4, loss_type=loss_type, scale_rewards=scale_rewards, seed=0, policy_kwargs=dict(net_arch=[8])
    )
    model.policy.optimizer.step = lambda *args, **kwargs: None
    model.learn(total_timesteps=1)
    buffer = model.rollout_buffer
    lengths, n = buffer.episode_lengths, len(buffer.episode_lengths)
    groups = buffer.group_ids
    if scale_rewards == "group":
        advantages = hand_group_advantages(buffer.scores, groups)
    else:
        advantages = np.array([buffer.scores[i] - buffer.scores[groups == groups[i]].mean() for i in range(n)])
    # at ratio 1 the surrogate of a token is -A_i: the loss is -sum_i A_i sum_t w_it
    per_episode_weight = {"grpo": np.full(n, 1 / n), "dr_grpo": lengths / (n * 4), "dapo": lengths / lengths.sum()}[loss_type]
    expected = -(per_episode_weight * advantages).sum()
    assert model.logger.name_to_value["train/policy_gradient_loss"] == pytest.approx(expected, abs=1e-5)
    assert model.logger.name_to_value["train/clip_fraction"] == 0.0


# --- rounds -----------------------------------------------------------------------------------------------------------


def test_rollouts_hold_whole_groups_and_the_policy_sees_only_running_envs():
    env = make_group_vec_env(PromptEnv, n_envs=6, group_size=3, seed=0, env_kwargs=dict(n_prompts=4, max_len=5))
    model = GRPO(
        "MlpPolicy", env, n_steps=5, batch_size=6, n_epochs=2, learning_rate=1e-3, seed=0, policy_kwargs=dict(net_arch=[8])
    )
    calls = []
    get_distribution = model.policy.get_distribution

    def counting(obs):
        if not th.is_grad_enabled():  # rollouts run without gradients, updates with
            calls.append(obs.clone())
        return get_distribution(obs)

    model.policy.get_distribution = counting
    recorder = Recorder()
    model.learn(total_timesteps=60, callback=recorder)
    assert len(recorder.rollouts) >= 3 and model._n_updates == 2 * len(recorder.rollouts)

    call = 0
    lengths_seen = set()
    for rollout in recorder.rollouts:
        for step, running in enumerate(rollout["running"]):
            obs = calls[call]
            call += 1
            assert len(obs) == len(running)  # one row per running env, none for the waiting ones
            assert th.all(obs[:, 1] == step)  # each row is a running episode's step `step` (a waiting env's t is less)
        by_group = {}
        for e, info in rollout["ended"]:
            by_group.setdefault(info["group"], []).append((e, info["prompt_index"]))
        assert sorted(e for e, _ in rollout["ended"]) == list(range(6))  # one whole episode per env per rollout
        assert len(by_group) == 2
        for members in by_group.values():
            assert len(members) == 3 and len({p for _, p in members}) == 1  # whole groups, one prompt each
            assert sorted(e for e, _ in members) in ([0, 1, 2], [3, 4, 5])
        assert sorted(rollout["group_ids"].tolist()) == sorted(info["group"] for _, info in rollout["ended"])
        assert "rollout/frac_reward_zero_std" in rollout["logged"]
        lengths_seen.update(sum(e in r for r in rollout["running"]) for e in range(6))
    assert call == len(calls)
    # the rounds draw the prompts of a fresh env seeded alike: learn()'s reset started the first round, none was lost
    fresh = make_group_vec_env(PromptEnv, n_envs=6, group_size=3, seed=0, env_kwargs=dict(n_prompts=4, max_len=5))
    for rollout in recorder.rollouts:
        fresh.reset()
        prompt_of_env = {e: info["prompt_index"] for e, info in rollout["ended"]}
        assert [prompt_of_env[0], prompt_of_env[3]] == fresh.env_prompts[::3].tolist()
    assert sum(len(c) for c in calls) == model.num_timesteps  # num_timesteps counts real steps only
    assert len(lengths_seen) > 1  # some envs waited while others played on


def test_episode_longer_than_n_steps():
    env = make_group_vec_env(PromptEnv, n_envs=4, group_size=2, seed=0, env_kwargs=dict(max_len=6))
    model = GRPO("MlpPolicy", env, n_steps=2, seed=0)
    with th.no_grad():  # never EOS: every episode lasts 6 steps
        model.policy.action_net.bias.copy_(th.tensor([-50.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"still running after `n_steps`=2 steps"):
        model.learn(total_timesteps=10)


# --- KL ---------------------------------------------------------------------------------------------------------------


def test_beta_puts_k3_in_the_loss(tiny_llama_path):
    env = make_group_vec_env(TEXT_ID, n_envs=4, group_size=2, seed=0, env_kwargs=text_env_kwargs(tiny_llama_path))
    model = GRPO(LMPolicy, env, n_steps=3, beta=0.1, seed=0)
    perturb(model.policy.lm)
    model.policy.optimizer.step = lambda *args, **kwargs: None
    model.learn(total_timesteps=1)
    buffer = model.rollout_buffer
    rows = np.arange(buffer.buffer_size)
    obs, actions = buffer.observations_at(rows), th.as_tensor(buffer.actions[:, 0, 0])
    ref = model.policy.reference_log_prob(obs, actions).numpy()
    np.testing.assert_allclose(buffer.ref_log_probs, ref, atol=1e-6)
    assert np.abs(buffer.log_probs[:, 0] - ref).max() > 1e-3  # the policy moved away from its reference
    # k3 = exp(ref - logp) - (ref - logp) - 1, weighted as the "grpo" loss: 1 / (n |o_i|)
    log_ratio = ref.astype(np.float64) - buffer.log_probs[:, 0]
    k3 = np.exp(log_ratio) - log_ratio - 1
    lengths = buffer.episode_lengths
    expected = (np.repeat(1.0 / (4 * lengths), lengths) * k3).sum()
    assert model.logger.name_to_value["train/ref_kl"] == pytest.approx(expected, rel=1e-4)


def test_kl_penalty_callback_works_on_the_group_buffer(tiny_llama_path):
    env = make_group_vec_env(TEXT_ID, n_envs=4, group_size=2, seed=0, env_kwargs=text_env_kwargs(tiny_llama_path))
    model = GRPO(LMPolicy, env, n_steps=3, seed=0)
    perturb(model.policy.lm)
    model.policy.optimizer.step = lambda *args, **kwargs: None
    recorder = Recorder()
    kl_callback = KLPenaltyCallback(kl_coef=0.5)
    model.learn(total_timesteps=1, callback=CallbackList([kl_callback, recorder]))
    buffer = model.rollout_buffer
    ended = dict(recorder.rollouts[0]["ended"])
    raw = np.array([ended[e]["score"] for e in range(4)])
    rows = np.arange(buffer.buffer_size)
    ref = model.policy.reference_log_prob(buffer.observations_at(rows), th.as_tensor(buffer.actions[:, 0, 0])).numpy()
    kl = estimate_kl(buffer.log_probs[:, 0], ref)  # k1 per token of the real steps only
    kl_per_episode = np.add.reduceat(kl, buffer.episode_offsets)
    np.testing.assert_allclose(buffer.scores, raw - 0.5 * kl_per_episode, atol=1e-4)  # the penalised scores
    advantages = hand_group_advantages(buffer.scores, buffer.group_ids)
    np.testing.assert_allclose(buffer.advantages[:, 0], np.repeat(advantages, buffer.episode_lengths), atol=1e-4)
    assert kl_callback.last_kl == pytest.approx(kl_per_episode.mean(), abs=1e-4)  # 4 episodes, none counted twice
    assert recorder.rollouts[0]["logged"]["rollout/ref_kl"] == pytest.approx(kl_per_episode.mean(), abs=1e-4)


# --- learn, save, load ------------------------------------------------------------------------------------------------


def test_learn_save_load(tiny_llama_path, tmp_path):
    assert GRPO.policy_aliases["LMPolicy"] is LMPolicy  # registered by `import sb3_textrl`
    env = make_text_vec_env(4, seed=0, env_kwargs=text_env_kwargs(tiny_llama_path), group_size=2)
    model = GRPO("LMPolicy", env, n_steps=3, batch_size=6, n_epochs=2, clip_range_high=0.28, learning_rate=1e-3, seed=0)
    assert isinstance(model.policy, LMPolicy) and isinstance(model.rollout_buffer, DictGroupRolloutBuffer)
    before = [p.detach().clone() for p in model.policy.lm.parameters()]
    recorder = Recorder()
    model.learn(total_timesteps=20, callback=recorder)  # two rounds of at most 12 tokens
    assert len(recorder.rollouts) == 2 and model._n_updates == 4
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.lm.parameters()))
    logged = model.logger.name_to_value
    for key in ["policy_gradient_loss", "clip_fraction", "approx_kl", "entropy_loss", "clip_range_high", "n_updates"]:
        assert f"train/{key}" in logged, key
    assert 0.0 <= recorder.rollouts[1]["logged"]["rollout/frac_reward_zero_std"] <= 1.0

    model.save(tmp_path / "grpo.zip")
    loaded = GRPO.load(tmp_path / "grpo.zip", env=env)
    assert loaded.scale_rewards == "group" and loaded.clip_range_high(1.0) == 0.28
    obs = env.reset()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()):
        th.testing.assert_close(a, b)
    loaded.learn(total_timesteps=1, reset_num_timesteps=False)  # goes on training
    assert loaded._n_updates == 6


def test_token_match_with_mlp_policy():
    env = make_group_vec_env(
        "sb3_textrl/TokenMatch-v0", n_envs=8, group_size=4, seed=0, env_kwargs=dict(length=3, vocab_size=4)
    )
    model = GRPO(
        "MlpPolicy", env, n_steps=3, batch_size=12, n_epochs=4, learning_rate=3e-3, seed=0, policy_kwargs=dict(net_arch=[16])
    )
    assert isinstance(model.rollout_buffer, GroupRolloutBuffer)
    model.learn(total_timesteps=2400)  # 100 rounds of 8 episodes
    returns = [info["r"] for info in model.ep_info_buffer]
    assert np.mean(returns) > 2.5  # optimum 3, chance 3 / 4


# --- bad inputs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale_rewards="std"), "`scale_rewards`"),
        (dict(loss_type="bnpo"), "`loss_type`"),
        (dict(n_epochs=0), "`n_epochs`"),
        (dict(clip_range=0.0), "`clip_range`"),
        (dict(clip_range_high=-0.1), "`clip_range_high`"),
        (dict(n_steps=0), "`n_steps`"),
        (dict(batch_size=0), "`batch_size`"),
        (dict(beta=-1.0), "`beta`"),
        (dict(beta=0.1), "`beta`"),  # MlpPolicy has no reference model
        (dict(rollout_buffer_class=RolloutBuffer), "`rollout_buffer_class`"),
    ],
)
def test_bad_arguments(kwargs, match):
    env = make_group_vec_env(PromptEnv, n_envs=4, group_size=2, seed=0)
    with pytest.raises(ValueError, match=match):
        GRPO("MlpPolicy", env, **kwargs)


def test_env_must_be_grouped():
    with pytest.raises(ValueError, match="GroupedVecEnv"):
        GRPO("MlpPolicy", make_vec_env("sb3_textrl/TokenMatch-v0", n_envs=4))
    with pytest.raises(ValueError, match="GroupedVecEnv"):
        GRPO("MlpPolicy", "sb3_textrl/TokenMatch-v0")


def test_n_steps_below_max_new_tokens(tiny_llama_path):
    env = make_group_vec_env(TEXT_ID, n_envs=2, group_size=2, seed=0, env_kwargs=text_env_kwargs(tiny_llama_path, 4))
    with pytest.raises(ValueError, match=r"`n_steps` \(3\) must be at least the env's `max_new_tokens` \(4\)"):
        GRPO(LMPolicy, env, n_steps=3)


def test_load_keeps_the_saved_n_steps(tiny_llama_path, tmp_path):
    # n_steps above GRPO's default (64), as max_new_tokens needs: load() must not check the env against the default
    env = make_group_vec_env(TEXT_ID, n_envs=2, group_size=2, seed=0, env_kwargs=text_env_kwargs(tiny_llama_path, 70))
    GRPO(LMPolicy, env, n_steps=70, policy_kwargs=dict(use_reference_model=False)).save(tmp_path / "grpo.zip")
    assert GRPO.load(tmp_path / "grpo.zip", env=env).n_steps == 70


def test_resume_of_a_grouped_run_is_exact(tiny_llama_path, tmp_path):
    """A checkpoint of GRPO falls on a round's end; resuming draws the same prompts as the uninterrupted run (the
    GroupedVecEnv's draws are checkpointed), so the weights come out the same."""
    from sb3_textrl.common.training_checkpoints import AtomicCheckpointCallback, load_checkpoint

    def env(seed):
        return make_text_vec_env(n_envs=4, seed=seed, env_kwargs=text_env_kwargs(tiny_llama_path), group_size=2)

    def run(total, checkpoint_dir=None, resume_from=None):
        kl = KLPenaltyCallback(kl_coef=0.1)
        if resume_from is None:
            model = GRPO("LMPolicy", env(0), n_steps=3, batch_size=6, n_epochs=2, learning_rate=1e-3, seed=0, device="cpu")
        else:  # another seed for the new env: what it would draw is replaced by the checkpoint's state
            model, _ = load_checkpoint(resume_from, env=env(9), callbacks=[kl])
        callbacks = [kl] + ([AtomicCheckpointCallback(1, str(checkpoint_dir), callbacks=[kl])] if checkpoint_dir else [])
        model.learn(total - model.num_timesteps, callback=CallbackList(callbacks), reset_num_timesteps=resume_from is None)
        return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}

    rollout = 4 * 3  # 4 envs x 3 tokens: the tiny LM never ends a completion early
    uninterrupted = run(4 * rollout, checkpoint_dir=tmp_path)
    resumed = run(4 * rollout, resume_from=str(tmp_path / f"rl_model_{2 * rollout}_steps.zip"))  # after 2 rounds
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert th.equal(uninterrupted[key], resumed[key]), key
