"""Rollouts of whole episodes under stock SB3: WholeEpisodeVecEnv, the policy's empty observations, the buffer."""

import numpy as np
import pytest
import torch as th
from conftest import PROMPTS, letter_fraction
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.env_util import make_vec_env

from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback
from sb3_textrl.common.group_vec_env import GroupMemberWrapper
from sb3_textrl.common.training_checkpoints import AtomicCheckpointCallback, load_checkpoint
from sb3_textrl.common.vec_env import make_text_vec_env
from sb3_textrl.common.whole_episodes import WholeEpisodeVecEnv, empty_observations
from sb3_textrl.lm.loading import load_tokenizer

MAX_NEW_TOKENS = 4


def whole_episode_env(path, n_envs=3, seed=0):
    env_kwargs = dict(model_name_or_path=path, prompts=PROMPTS, reward_fn=letter_fraction, max_new_tokens=MAX_NEW_TOKENS)
    return make_text_vec_env(n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, whole_episodes=True)


def test_an_env_that_ends_early_waits_with_an_empty_observation_until_the_round_ends(tiny_llama_path):
    env = whole_episode_env(tiny_llama_path)
    eos = load_tokenizer(tiny_llama_path).eos_token_id
    word = 70  # any token that is not EOS
    obs = env.reset()
    first_lengths = obs["attention_mask"].sum(axis=1)
    assert (first_lengths > 0).all()
    # step 1: env 0 ends its episode (EOS); envs 1 and 2 go on
    obs, rewards, dones, infos = env.step(np.array([eos, word, word]))
    assert dones.tolist() == [True, False, False]
    assert "terminal_observation" in infos[0]
    assert obs["attention_mask"][0].sum() == 0 and (obs["input_ids"][0] == 0).all()  # waiting: empty
    np.testing.assert_array_equal(obs["attention_mask"][1:].sum(axis=1), first_lengths[1:] + 1)
    # steps 2 and 3: env 0 waits (not stepped, reward 0, not done)
    for _ in range(2):
        obs, rewards, dones, infos = env.step(np.array([word, word, word]))
        assert infos[0].get("waiting") and rewards[0] == 0.0 and not dones[0]
        assert obs["attention_mask"][0].sum() == 0
    # step 4 = max_new_tokens: envs 1 and 2 end, and the round's end starts the next one in every env
    obs, rewards, dones, infos = env.step(np.array([word, word, word]))
    assert dones.tolist() == [False, True, True]
    assert env.n_rounds == 2 and env.running.all()
    assert (obs["attention_mask"].sum(axis=1) > 0).all()  # each env on a fresh prompt: no generated token yet
    assert all(infos[e]["terminal_observation"]["attention_mask"].sum() == first_lengths[e] + 4 for e in (1, 2))


def test_empty_observations_copies():
    obs = {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((2, 3), np.int64)}
    emptied = empty_observations(obs, np.array([False, True]))
    assert emptied["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert obs["attention_mask"].sum() == 6  # the original is untouched


def test_policy_runs_nothing_for_an_empty_observation(tiny_llama_path):
    env = whole_episode_env(tiny_llama_path)
    model = PPO("LMPolicy", env, n_steps=MAX_NEW_TOKENS, batch_size=12, seed=0, device="cpu")
    policy = model.policy
    policy.set_training_mode(False)
    obs = env.reset()
    emptied = empty_observations(obs, np.array([False, True, False]))
    tensors = {k: th.as_tensor(v) for k, v in emptied.items()}
    real = {k: th.as_tensor(v[[0, 2]]) for k, v in obs.items()}
    actions = th.tensor([5, 7, 9])
    with th.no_grad():
        values, log_prob, entropy = policy.evaluate_actions(tensors, actions)
        values_real, log_prob_real, entropy_real = policy.evaluate_actions(real, actions[[0, 2]])
        ref = policy.reference_log_prob(tensors, actions)
        sampled, sampled_values, sampled_log_prob = policy(tensors)
    for full, part in ((values, values_real), (log_prob, log_prob_real), (entropy, entropy_real)):
        th.testing.assert_close(full[[0, 2]], part)
        assert (full[1] == 0).all()
    assert ref[1] == 0 and sampled[1] == 0 and sampled_values[1] == 0 and sampled_log_prob[1] == 0
    assert (policy.predict_values(tensors)[1] == 0).all()
    all_empty = {k: th.zeros_like(v) for k, v in tensors.items()}
    with th.no_grad():
        assert [t.abs().sum().item() for t in policy(all_empty)] == [0, 0, 0]


def test_every_episode_in_a_rollout_is_whole_and_waiting_steps_are_left_out(tiny_llama_path):
    env = whole_episode_env(tiny_llama_path, n_envs=4)
    model = PPO(
        "LMPolicy", env, n_steps=2 * MAX_NEW_TOKENS, batch_size=16, n_epochs=1, seed=0, device="cpu",
        rollout_buffer_class=EpisodeRolloutBuffer,
    )  # fmt: skip
    head = model.policy.lm.get_output_embeddings()  # make EOS likely, so that envs end early and wait
    head.bias = th.nn.Parameter(th.zeros(head.out_features))
    head.bias.data[load_tokenizer(tiny_llama_path).eos_token_id] = 4.0
    kl = KLPenaltyCallback(kl_coef=0.1)
    model.learn(2 * MAX_NEW_TOKENS * 4, callback=kl)
    buffer = model.rollout_buffer
    masks = buffer.observations["attention_mask"]  # flattened, env-major
    lengths = masks.sum(axis=1)
    waiting = lengths == 0
    assert 0 < waiting.sum() < len(waiting) / 2
    episodes = buffer.episode_indices()
    assert sum(len(e) for e in episodes) == int((~waiting).sum())
    for steps in episodes:
        assert not waiting[steps].any()
        # whole: each step adds one token to the one before, from the round's first step (below) on
        np.testing.assert_array_equal(np.diff(lengths[steps]), 1)
        assert len(steps) <= MAX_NEW_TOKENS
    # the episodes of a round start on the round's first step: 2 rounds of 4 steps, so steps 0 and 4 of each env
    starts = sorted({int(steps[0]) % (2 * MAX_NEW_TOKENS) for steps in episodes})
    assert starts == [0, MAX_NEW_TOKENS]
    # the waiting steps: log-prob and value 0, and no KL penalty
    assert (buffer.log_probs[waiting] == 0).all() and (buffer.values[waiting] == 0).all()
    assert (buffer.rewards.T.reshape(-1)[waiting] == 0).all()


def test_whole_episodes_learn_save_and_load(tiny_llama_path, tmp_path):
    env = whole_episode_env(tiny_llama_path, n_envs=2)
    model = PPO("LMPolicy", env, n_steps=MAX_NEW_TOKENS, batch_size=8, seed=0, device="cpu",
                rollout_buffer_class=EpisodeRolloutBuffer)  # fmt: skip
    model.learn(3 * MAX_NEW_TOKENS * 2)
    assert model.num_timesteps == 3 * MAX_NEW_TOKENS * 2
    model.save(tmp_path / "model")
    loaded = PPO.load(tmp_path / "model", env=env, device="cpu")
    obs = env.reset()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


def test_bad_inputs(tiny_llama_path):
    env_kwargs = dict(model_name_or_path=tiny_llama_path, prompts=PROMPTS, reward_fn=letter_fraction, max_new_tokens=4)
    with pytest.raises(ValueError, match="`whole_episodes=True` and `group_size`"):
        make_text_vec_env(n_envs=4, env_kwargs=env_kwargs, group_size=2, whole_episodes=True)
    plain = make_text_vec_env(n_envs=2, env_kwargs=env_kwargs)
    with pytest.raises(ValueError, match="GroupMemberWrapper"):
        WholeEpisodeVecEnv(plain, round_steps=4)
    with pytest.raises(ValueError, match="`round_steps`"):
        WholeEpisodeVecEnv(whole_episode_env(tiny_llama_path).venv, round_steps=0)
    box_obs = make_vec_env("sb3_textrl/LinearToy-v0", n_envs=2, wrapper_class=GroupMemberWrapper)
    with pytest.raises(ValueError, match="empty `attention_mask`, which Box"):  # no token observations to empty
        WholeEpisodeVecEnv(box_obs, round_steps=4)
    short = WholeEpisodeVecEnv(whole_episode_env(tiny_llama_path).venv, round_steps=2)
    short.reset()
    short.step(np.array([70, 70, 70]))
    with pytest.raises(ValueError, match="still running after a round of `round_steps`=2"):
        short.step(np.array([70, 70, 70]))


def test_resume_of_a_whole_episode_run_is_exact(tiny_llama_path, tmp_path):
    """A checkpoint falls on a rollout's end, which is a round's end: resuming gives the uninterrupted run's weights."""

    def run(total, checkpoint_dir=None, resume_from=None):
        if resume_from is None:
            model = PPO("LMPolicy", whole_episode_env(tiny_llama_path, n_envs=2), n_steps=MAX_NEW_TOKENS, batch_size=8,
                        seed=0, device="cpu", rollout_buffer_class=EpisodeRolloutBuffer)  # fmt: skip
            kl = KLPenaltyCallback(kl_coef=0.1)
        else:
            kl = KLPenaltyCallback(kl_coef=0.1)
            model, _ = load_checkpoint(resume_from, env=whole_episode_env(tiny_llama_path, n_envs=2, seed=9), callbacks=[kl])
        callbacks = [kl] + ([AtomicCheckpointCallback(1, str(checkpoint_dir), callbacks=[kl])] if checkpoint_dir else [])
        model.learn(total - model.num_timesteps, callback=CallbackList(callbacks), reset_num_timesteps=resume_from is None)
        return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}

    rollout = MAX_NEW_TOKENS * 2
    uninterrupted = run(3 * rollout, checkpoint_dir=tmp_path)
    resumed = run(3 * rollout, resume_from=str(tmp_path / f"rl_model_{rollout}_steps.zip"))
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert th.equal(uninterrupted[key], resumed[key]), key
