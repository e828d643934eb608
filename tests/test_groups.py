"""Groups of episodes per prompt: advantages and loss weights, the grouped VecEnv, the group buffers."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th

from sb3_textrl.common.group_advantages import frac_zero_std, group_advantages, leave_one_out_advantages, token_loss_weights
from sb3_textrl.common.group_buffers import GroupRolloutBuffer
from sb3_textrl.common.group_vec_env import GroupedVecEnv, GroupMemberWrapper, check_group_size, make_group_vec_env
from sb3_textrl.common.kl import k3_kl
from sb3_textrl.common.vec_env import make_text_vec_env

# 2 prompts x 4 completions; the group ids need not be contiguous or sorted
SCORES = np.array([1.0, 2.0, 0.0, 4.0, 0.0, 6.0, 1.0, 8.0])
GROUPS = np.array([7, 3, 7, 3, 7, 3, 7, 3])  # group 7: scores 1, 0, 0, 1; group 3: scores 2, 4, 6, 8
EPS = 1e-4


class PromptEnv(gym.Env):
    """
    A toy "text" env: ``prompts`` to start from, observation ``[prompt_index, t]``, action 0 ends the episode (an EOS),
    the episode also ends after ``max_len`` steps; reward 1 for action 1. It refuses to be stepped after its end.
    """

    def __init__(self, n_prompts=5, max_len=4):
        self.prompts = [f"prompt {i}" for i in range(n_prompts)]
        self.max_len = max_len
        self.observation_space = gym.spaces.Box(0.0, 100.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(3)
        self.n_steps_taken = 0
        self.done = True

    def _obs(self):
        return np.array([self.prompt_index, self.t], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        options = options or {}
        self.prompt_index = int(options.get("prompt_index", self.np_random.integers(len(self.prompts))))
        self.t, self.done = 0, False
        return self._obs(), {}

    def step(self, action):
        assert not self.done, "stepped after the episode's end"
        self.n_steps_taken += 1
        self.t += 1
        self.done = int(action) == 0 or self.t >= self.max_len
        info = {"prompt": self.prompts[self.prompt_index]} if self.done else {}
        return self._obs(), float(int(action) == 1), self.done, False, info


# --- advantages and weights, by hand ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_by_hand(scale_rewards):
    # group 7: mean 0.5, centred [0.5, -0.5, -0.5, 0.5], sample std sqrt((4 * 0.25) / 3) = sqrt(1/3)
    # group 3: mean 5, centred [-3, -1, 1, 3], sample std sqrt((9 + 1 + 1 + 9) / 3) = sqrt(20/3)
    # batch: mean 22/8 = 2.75, squared deviations sum to 61.5, sample std sqrt(61.5 / 7)
    centred = np.array([0.5, -3.0, -0.5, -1.0, -0.5, 1.0, 0.5, 3.0])
    std = {
        "group": np.array([np.sqrt(1 / 3), np.sqrt(20 / 3)] * 4),
        "batch": np.full(8, np.sqrt(61.5 / 7)),
    }
    expected = centred if scale_rewards == "none" else centred / (std[scale_rewards] + EPS)
    np.testing.assert_allclose(group_advantages(SCORES, GROUPS, scale_rewards, eps=EPS), expected, rtol=1e-12)
    if scale_rewards == "group":  # the numbers, written out: 0.5 / (0.57735 + 1e-4) and 3 / (2.58199 + 1e-4)
        np.testing.assert_allclose(group_advantages(SCORES, GROUPS)[[0, 7]], [0.865875, 1.161850], rtol=1e-5)


def test_group_with_equal_scores_gets_zero_advantage():
    np.testing.assert_array_equal(group_advantages([3.0, 3.0, 1.0, 2.0], [0, 0, 1, 1])[:2], [0.0, 0.0])


def test_leave_one_out_by_hand():
    # group 7, scores 1, 0, 0, 1: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - (1 + 0 + 1) / 3 = -2/3, ...
    # group 3, scores 2, 4, 6, 8: 2 - (4 + 6 + 8) / 3 = -4, 4 - 16/3 = -4/3, 6 - 14/3 = 4/3, 8 - 12/3 = 4
    expected = [2 / 3, -4.0, -2 / 3, -4 / 3, -2 / 3, 4 / 3, 2 / 3, 4.0]
    np.testing.assert_allclose(leave_one_out_advantages(SCORES, GROUPS), expected, rtol=1e-12)
    # groups of 2: each score minus the other one
    np.testing.assert_allclose(leave_one_out_advantages([5.0, 2.0], [0, 0]), [3.0, -3.0])


def test_frac_zero_std_by_hand():
    assert frac_zero_std(SCORES, GROUPS) == 0.0
    # groups 0 and 2 all equal, group 1 not: 2 of 3
    assert frac_zero_std([1.0, 1.0, 0.0, 1.0, 2.5, 2.5], [0, 0, 1, 1, 2, 2]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "loss_type, weights, loss",
    [
        # two completions of 2 and 4 tokens, per-token losses [1, 2 | 3, 4, 5, 6]
        ("grpo", [1 / 4] * 2 + [1 / 8] * 4, (1.5 + 4.5) / 2),  # mean per completion (1.5 and 4.5), then over them
        ("dr_grpo", [1 / 10] * 6, (3 + 18) / (2 * 5)),  # sums per completion over max length 5, mean over completions
        ("dapo", [1 / 6] * 6, 21 / 6),  # mean over the 6 tokens
    ],
)
def test_token_loss_weights_by_hand(loss_type, weights, loss):
    w = token_loss_weights(np.array([2, 4]), loss_type, max_completion_length=5)
    np.testing.assert_allclose(w, weights, rtol=1e-12)
    assert float(w @ np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])) == pytest.approx(loss)


def test_k3_by_hand():
    # log pi = log 0.5, log pi_ref = log 0.25: ratio pi_ref / pi = 0.5, k3 = 0.5 - log 0.5 - 1
    kl = k3_kl(th.log(th.tensor([0.5, 0.3])), th.log(th.tensor([0.25, 0.3])))
    th.testing.assert_close(kl, th.tensor([0.5 - np.log(0.5) - 1.0, 0.0], dtype=th.float32))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: group_advantages(SCORES, GROUPS, scale_rewards="std"), "`scale_rewards`"),
        (lambda: group_advantages(SCORES, GROUPS[:4]), "`group_ids`"),
        (lambda: group_advantages([1.0, 2.0, 3.0], [0, 0, 1]), "at least 2"),
        (lambda: leave_one_out_advantages([1.0, 2.0, 3.0], [0, 0, 1]), "at least 2"),
        (lambda: token_loss_weights([2, 3], "bnpo"), "`loss_type`"),
        (lambda: token_loss_weights([2, 3], "dr_grpo"), "`max_completion_length`"),
        (lambda: token_loss_weights([2, 6], "dr_grpo", max_completion_length=5), "`max_completion_length`"),
        (lambda: token_loss_weights([2, 0], "grpo"), "`episode_lengths`"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "group_size, n_envs, match",
    [(1, 4, "`group_size` must be an integer >= 2"), (0, 4, ">= 2"), (True, 4, ">= 2"), (3, 4, "must divide `n_envs`")],
)
def test_check_group_size(group_size, n_envs, match):
    with pytest.raises(ValueError, match=match):
        check_group_size(group_size, n_envs)


# --- the grouped VecEnv -----------------------------------------------------------------------------------------------


def play_round(venv, rng):
    """One round with random actions; returns the ended episodes as (env, length, info) and the total steps."""
    venv.reset()
    lengths, ended, n_steps = np.zeros(venv.num_envs, int), [], 0
    while venv.running.any():
        running = np.flatnonzero(venv.running)
        _, rewards, dones, infos = venv.step_running(rng.integers(0, 3, len(running)))
        n_steps += len(running)
        lengths[running] += 1
        assert np.all(rewards[~np.isin(np.arange(venv.num_envs), running)] == 0)
        ended += [(e, lengths[e], infos[e]) for e in np.flatnonzero(dones)]
    return ended, n_steps


def test_rounds_keep_groups_whole():
    venv = make_group_vec_env(PromptEnv, n_envs=6, group_size=3, seed=0, env_kwargs=dict(n_prompts=4, max_len=5))
    assert isinstance(venv, GroupedVecEnv) and venv.n_groups == 2
    rng = np.random.default_rng(0)
    total, seen_groups, lengths_seen = 0, set(), set()
    for _ in range(4):
        ended, n_steps = play_round(venv, rng)
        total += n_steps
        assert sorted(e for e, _, _ in ended) == list(range(6))  # every env plays exactly one episode per round
        by_group = {}
        for e, _, info in ended:
            by_group.setdefault(info["group"], []).append((e, info["prompt_index"], info["prompt"]))
        assert len(by_group) == 2 and not seen_groups & set(by_group)  # fresh group ids each round
        seen_groups |= set(by_group)
        for members in by_group.values():
            envs = sorted(e for e, _, _ in members)
            assert len(members) == 3 and envs[0] % 3 == 0 and envs == list(range(envs[0], envs[0] + 3))  # consecutive
            assert len({p for _, p, _ in members}) == 1 and len({text for _, _, text in members}) == 1  # one prompt
            assert members[0][2] == f"prompt {members[0][1]}"
        lengths_seen.update(length for _, length, _ in ended)
    assert len(lengths_seen) > 1  # episodes of different lengths: some envs waited for others
    # the waiting envs were never stepped: the inner envs took exactly the steps played (PromptEnv also asserts it)
    assert sum(venv.get_attr("n_steps_taken")) == total
    # an epoch over the 4 prompts every 2 rounds: each prompt exactly once in rounds 1-2 and once in rounds 3-4
    venv2 = make_group_vec_env(PromptEnv, n_envs=6, group_size=3, seed=0, env_kwargs=dict(n_prompts=4, max_len=5))
    starts = []
    for _ in range(4):
        venv2.reset()
        starts.append(venv2.env_prompts[::3].tolist())
    assert sorted(starts[0] + starts[1]) == [0, 1, 2, 3] and sorted(starts[2] + starts[3]) == [0, 1, 2, 3]
    # reproducible: the same seed draws the same prompts
    venv3 = make_group_vec_env(PromptEnv, n_envs=6, group_size=3, seed=0, env_kwargs=dict(n_prompts=4, max_len=5))
    state = venv3.state_dict()
    venv3.reset()
    assert venv3.env_prompts[::3].tolist() == starts[0]
    venv3.reset()
    group_ids = venv3.env_groups.copy()
    venv3.load_state_dict(state)  # back to after the seeding: the same draws again, and the same group ids
    venv3.reset()
    assert venv3.env_prompts[::3].tolist() == starts[0]
    venv3.reset()
    assert venv3.env_prompts[::3].tolist() == starts[1] and venv3.env_groups.tolist() == group_ids.tolist()


def test_plain_step_refuses_waiting_envs():
    venv = make_group_vec_env(PromptEnv, n_envs=4, group_size=2, seed=0, env_kwargs=dict(max_len=3))
    venv.reset()
    _, _, dones, _ = venv.step(np.array([0, 1, 1, 1]))  # env 0 ends (action 0 is its EOS)
    assert dones.tolist() == [True, False, False, False] and venv.running.tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match=r"Env\(s\) \[0\] have ended .*GRPO or RLOO"):
        venv.step(np.array([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="one action for each of the 3 running envs"):
        venv.step_running(np.array([1, 1]))
    venv.step_running(np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="call reset"):
        venv.step_running(np.array([]))


def test_seed_starts_for_envs_without_prompts():
    # TokenMatch "copy" draws its target from the reset seed: a group shares one target
    venv = make_group_vec_env(
        "sb3_textrl/TokenMatch-v0", n_envs=6, group_size=3, seed=1, env_kwargs=dict(length=4, vocab_size=50, mode="copy")
    )
    obs = venv.reset()
    assert venv.n_prompts is None and venv.env_prompts.tolist() == [-1] * 6
    for g in range(2):
        assert all(np.array_equal(obs[3 * g], obs[3 * g + i]) for i in (1, 2))
    assert not np.array_equal(obs[0], obs[3])


def test_grouped_vec_env_needs_member_wrappers():
    from stable_baselines3.common.vec_env import DummyVecEnv

    with pytest.raises(ValueError, match="GroupMemberWrapper"):
        GroupedVecEnv(DummyVecEnv([PromptEnv] * 4), group_size=2)
    venv = DummyVecEnv([lambda: GroupMemberWrapper(PromptEnv())] * 4)
    with pytest.raises(ValueError, match="`group_size`"):
        GroupedVecEnv(venv, group_size=3)


def test_make_text_vec_env_groups(tiny_llama_path):
    prompts = ["Write one sentence about rain.", "Hi", "The sun"]
    env_kwargs = dict(
        model_name_or_path=tiny_llama_path,
        prompts=prompts,
        reward_fn=lambda p, c: [float(len(x)) for x in c],
        max_new_tokens=3,
    )
    venv = make_text_vec_env(4, seed=0, env_kwargs=env_kwargs, group_size=2)
    assert isinstance(venv, GroupedVecEnv) and venv.n_prompts == 3
    ended, _ = play_round(venv, np.random.default_rng(0))
    by_group = {}
    for e, _, info in ended:
        assert "score" in info and info["prompt"] == prompts[info["prompt_index"]]
        by_group.setdefault(info["group"], set()).add((e // 2, info["prompt"]))
    assert len(by_group) == 2 and all(len(members) == 1 for members in by_group.values())


@pytest.mark.parametrize("n_envs, group_size, match", [(4, 1, "`group_size` must be"), (6, 4, "must divide `n_envs`")])
def test_make_text_vec_env_bad_group_size(tiny_llama_path, n_envs, group_size, match):
    env_kwargs = dict(model_name_or_path=tiny_llama_path, prompts=["Hi"], reward_fn=lambda p, c: [0.0] * len(c))
    with pytest.raises(ValueError, match=match):
        make_text_vec_env(n_envs, env_kwargs=env_kwargs, group_size=group_size)


# --- the buffer -------------------------------------------------------------------------------------------------------


def test_buffer_keeps_only_real_steps():
    obs_space, action_space = gym.spaces.Box(0.0, 100.0, (1,), np.float32), gym.spaces.Discrete(5)
    buffer = GroupRolloutBuffer(4, obs_space, action_space, device="cpu", n_envs=4)
    lengths = np.array([2, 3, 1, 2])
    for step in range(3):
        envs = np.flatnonzero(lengths > step)
        # observation 10 * env + step, action env, reward 1 on the last step of the episode
        rewards = (lengths[envs] == step + 1).astype(np.float32) * np.array([1.0, 2.0, 3.0, 5.0])[envs]
        buffer.add_steps(step, envs, (10 * envs + step)[:, None], envs[:, None], rewards, th.full((len(envs),), -0.5))
    buffer.finish_round(lengths, group_ids=np.array([4, 4, 9, 9]))
    assert buffer.buffer_size == 8 and buffer.n_envs == 1 and buffer.observations.shape == (8, 1, 1)
    np.testing.assert_array_equal(buffer.observations[:, 0, 0], [0, 1, 10, 11, 12, 20, 30, 31])  # episode after episode
    np.testing.assert_array_equal(buffer.actions[:, 0, 0], [0, 0, 1, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(buffer.episode_starts[:, 0], [1, 0, 1, 0, 0, 1, 1, 0])
    buffer.compute_returns_and_advantage(th.zeros(1), np.ones(1))
    np.testing.assert_array_equal(buffer.scores, [1.0, 2.0, 3.0, 5.0])
    # groups {1, 2} and {3, 5}: centred -0.5, 0.5, -1, 1; sample std sqrt(0.5) and sqrt(2)
    a = [-0.5 / (np.sqrt(0.5) + EPS), 0.5 / (np.sqrt(0.5) + EPS), -1 / (np.sqrt(2) + EPS), 1 / (np.sqrt(2) + EPS)]
    np.testing.assert_allclose(buffer.advantages[:, 0], np.repeat(a, lengths), rtol=1e-6)
    np.testing.assert_array_equal(buffer.returns[:, 0], [1, 1, 2, 2, 2, 3, 5, 5])
    # minibatches of whole episodes, at most 3 tokens unless one episode is longer; every token once
    seen = []
    for data in buffer.get(batch_size=3):
        assert len(data.old_log_prob) == data.episode_lengths.sum() and (data.episode_lengths.sum() <= 3)
        obs = data.observations[:, 0].long().tolist()
        first = 0
        for length in data.episode_lengths:
            episode = obs[first : first + length]
            assert episode == [episode[0] + t for t in range(length)] and episode[0] % 10 == 0  # whole, in order
            first += length
        seen += obs
    assert sorted(seen) == [0, 1, 10, 11, 12, 20, 30, 31]
    buffer.reset()  # back to the round's capacity
    assert buffer.buffer_size == 4 and buffer.n_envs == 4 and buffer.observations.shape == (4, 4, 1)


def test_progress_bar_counts_real_steps():
    """GRPO's progress bar advances by the steps the algorithm counts (waiting envs not included), SB3's by num_envs."""
    from stable_baselines3.common.callbacks import CallbackList, ProgressBarCallback

    from sb3_textrl import RLOO
    from sb3_textrl.common.callbacks import TimestepsProgressBarCallback

    venv = make_group_vec_env(PromptEnv, n_envs=6, group_size=3, seed=0, env_kwargs=dict(n_prompts=4, max_len=5))
    model = RLOO("MlpPolicy", venv, n_steps=5, seed=0)
    used = model._init_callback(None, progress_bar=True)
    assert isinstance(used, CallbackList) and isinstance(used.callbacks[-1], TimestepsProgressBarCallback)
    stock, real = ProgressBarCallback(), TimestepsProgressBarCallback()
    model.learn(60, callback=[stock, real])
    assert real.pbar.n == model.num_timesteps >= 60
    assert stock.pbar.n > model.num_timesteps  # SB3's counts the waiting envs too (episodes of unequal lengths)
