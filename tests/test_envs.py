"""TextGeneration-v0 (sb3_textrl.envs.text_generation): registration, the env checkers, spaces, the observation layout,
episode ends, rewards, rendering and seeding; then property tests of its API (Hypothesis): any prompts, action
sequences and ``max_new_tokens``."""

import re

import gymnasium as gym
import numpy as np
import pytest
from conftest import ENV_ID
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env
from transformers import AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import sb3_textrl  # registers the env
from sb3_textrl.envs.text_generation import TextGenerationEnv
from sb3_textrl.lm.loading import eos_token_ids, load_tokenizer
from sb3_textrl.lm.tokens import encode_prompt

PROMPTS = ["Write one sentence about rain.", "Hi", "Write a short review of a cafe."]
# a token id that is neither EOS nor pad for both tiny tokenizers (llama: eos 2, pad 0; gpt2: eos == pad == 0)
PLAIN_TOKEN = 100


def make_env(path, **kwargs):
    kwargs = {"prompts": PROMPTS, "reward_fn": "vader", "max_new_tokens": 4, **kwargs}
    return gym.make(ENV_ID, model_name_or_path=path, **kwargs)


def expected_prompt_ids(path, prompt):
    """The prompt's token ids, computed with a freshly loaded tokenizer (independent of the env's code)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def test_registered():
    assert ENV_ID in gym.registry
    assert gym.spec(ENV_ID).max_episode_steps is None  # the env ends episodes itself


def test_check_env(tiny_lm_path):
    env = make_env(tiny_lm_path)
    gym_check_env(env.unwrapped)
    sb3_check_env(env)
    assert isinstance(env.unwrapped, sb3_textrl.envs.TextGenerationEnv)


def test_spaces(tiny_lm_path):
    env = make_env(tiny_lm_path, max_new_tokens=5).unwrapped
    longest = max(len(expected_prompt_ids(tiny_lm_path, p)) for p in PROMPTS)
    assert env.max_prompt_length == longest
    assert env.action_space == gym.spaces.Discrete(300)
    assert set(env.observation_space.keys()) == {"input_ids", "attention_mask"}
    for key in ("input_ids", "attention_mask"):
        assert env.observation_space[key].shape == (longest + 5,)
        assert env.observation_space[key].dtype == np.int64
    assert env.observation_space["input_ids"].high.max() == 299
    assert env.observation_space.model_name_or_path == tiny_lm_path


def test_action_space_is_logits_width(tiny_llama_320_path):
    # config.vocab_size (320) may exceed len(tokenizer) (300): every logit is an action
    env = make_env(tiny_llama_320_path, max_new_tokens=3)
    assert env.action_space.n == 320
    env.reset(seed=0)
    obs, reward, terminated, truncated, _ = env.step(310)
    assert not terminated and not truncated and reward == 0.0
    assert obs["input_ids"][env.unwrapped.max_prompt_length] == 310
    assert obs in env.observation_space


@pytest.mark.parametrize("index", [0, 1, 2])
def test_observation_layout(tiny_lm_path, index):
    env = make_env(tiny_lm_path, max_new_tokens=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    m = env.unwrapped.max_prompt_length
    prompt_ids = expected_prompt_ids(tiny_lm_path, PROMPTS[index])
    start = m - len(prompt_ids)
    obs, info = env.reset(seed=0, options={"prompt_index": index})
    assert info == {}
    assert obs["input_ids"].dtype == np.int64 and obs["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(obs["input_ids"][start:m], prompt_ids)
    np.testing.assert_array_equal(obs["input_ids"][:start], pad)
    np.testing.assert_array_equal(obs["input_ids"][m:], pad)
    expected_mask = np.zeros(m + 4, dtype=np.int64)
    expected_mask[start:m] = 1
    np.testing.assert_array_equal(obs["attention_mask"], expected_mask)

    for t, token in enumerate([PLAIN_TOKEN, 7, 42]):
        obs, *_ = env.step(token)
        assert obs["input_ids"][m + t] == token
        expected_mask[m + t] = 1
        np.testing.assert_array_equal(obs["attention_mask"], expected_mask)
        np.testing.assert_array_equal(obs["input_ids"][start:m], prompt_ids)
        np.testing.assert_array_equal(obs["input_ids"][m + t + 1 :], pad)


def test_mask_exact_when_pad_is_eos(tiny_gpt2_path):
    env = make_env(tiny_gpt2_path, max_new_tokens=4)
    unwrapped = env.unwrapped
    assert unwrapped.pad_token_id == 0 and unwrapped.eos_token_ids == [0]
    m = unwrapped.max_prompt_length
    obs, _ = env.reset(options={"prompt_index": 1})
    n_prompt = len(expected_prompt_ids(tiny_gpt2_path, PROMPTS[1]))
    assert n_prompt < m  # the short prompt is left-padded with the EOS id
    obs, _, terminated, _, _ = env.step(PLAIN_TOKEN)
    assert not terminated
    obs, _, terminated, _, info = env.step(0)  # EOS == pad: a real token, ends the episode
    assert terminated
    # the mask can be rebuilt from the lengths, but not from the ids
    rebuilt = np.zeros_like(obs["attention_mask"])
    rebuilt[m - n_prompt : m + 2] = 1
    np.testing.assert_array_equal(obs["attention_mask"], rebuilt)
    assert obs["input_ids"][m + 1] == 0 and obs["attention_mask"][m + 1] == 1
    assert not np.array_equal(obs["attention_mask"], (obs["input_ids"] != 0).astype(np.int64))
    assert info["completion"] == AutoTokenizer.from_pretrained(tiny_gpt2_path).decode([PLAIN_TOKEN])


def test_eos_at_first_step_terminates(tiny_lm_path):
    calls = []

    def reward_fn(prompts, completions):
        calls.append((list(prompts), list(completions)))
        return [0.25 + len(c) for c in completions]

    env = make_env(tiny_lm_path, reward_fn=reward_fn, max_new_tokens=5)
    eos = AutoTokenizer.from_pretrained(tiny_lm_path).eos_token_id
    env.reset(seed=0, options={"prompt_index": 2})
    obs, reward, terminated, truncated, info = env.step(eos)
    assert terminated is True and truncated is False
    assert calls == [([PROMPTS[2]], [""])]
    assert reward == 0.25
    assert info == {"prompt": PROMPTS[2], "completion": "", "score": 0.25, "eos": True}
    assert obs["attention_mask"][env.unwrapped.max_prompt_length] == 1


@pytest.mark.parametrize("max_new_tokens", [1, 3, 6])
def test_ends_at_max_new_tokens(tiny_lm_path, max_new_tokens):
    def reward_fn(prompts, completions):
        return [len(c) / 10 - 1 for c in completions]

    env = make_env(tiny_lm_path, reward_fn=reward_fn, max_new_tokens=max_new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    env.reset(seed=1)
    prompt = env.unwrapped.prompt
    actions = [PLAIN_TOKEN + 3 * t for t in range(max_new_tokens)]
    for t, action in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(action)
        assert truncated is False
        if t < max_new_tokens - 1:
            assert terminated is False and reward == 0.0 and info == {}
    assert terminated is True
    completion = tokenizer.decode(actions, skip_special_tokens=True)
    assert len(completion) > 0
    assert info == {"prompt": prompt, "completion": completion, "score": len(completion) / 10 - 1, "eos": False}
    assert reward == pytest.approx(len(completion) / 10 - 1)
    assert int(obs["attention_mask"].sum()) == len(expected_prompt_ids(tiny_lm_path, prompt)) + max_new_tokens
    with pytest.raises(AssertionError, match="reset"):
        env.unwrapped.step(PLAIN_TOKEN)


@pytest.mark.parametrize("penalty", [0.0, 0.75])
def test_missing_eos_penalty(tiny_lm_path, penalty):
    env = make_env(tiny_lm_path, reward_fn=lambda prompts, completions: [0.5] * len(prompts), missing_eos_penalty=penalty)
    eos = AutoTokenizer.from_pretrained(tiny_lm_path).eos_token_id
    env.reset(seed=0)
    steps = [env.step(PLAIN_TOKEN) for _ in range(4)]  # cut at max_new_tokens=4, no EOS
    assert [step[1] for step in steps] == [0.0, 0.0, 0.0, pytest.approx(0.5 - penalty)]
    assert steps[-1][2] is True and steps[-1][4]["score"] == 0.5 and steps[-1][4]["eos"] is False
    env.reset(seed=0)
    env.step(PLAIN_TOKEN)
    _, reward, terminated, _, info = env.step(eos)  # ended with EOS: no penalty
    assert terminated and reward == 0.5 and info["score"] == 0.5 and info["eos"] is True


@pytest.mark.parametrize("penalty", [-1.0, float("nan"), "high", True])
def test_missing_eos_penalty_refused(tiny_lm_path, penalty):
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        make_env(tiny_lm_path, missing_eos_penalty=penalty)


def test_vader_reward(tiny_llama_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    actions = tokenizer(" great happy day", add_special_tokens=False)["input_ids"]
    env = make_env(tiny_llama_path, reward_fn="vader", max_new_tokens=len(actions) + 1)
    env.reset(seed=0)
    for action in actions:
        _, reward, terminated, _, info = env.step(action)
        assert not terminated and reward == 0.0
    _, reward, terminated, _, info = env.step(tokenizer.eos_token_id)
    assert terminated
    assert info["completion"] == " great happy day"
    expected = SentimentIntensityAnalyzer().polarity_scores(" great happy day")["compound"]
    assert expected > 0.5
    assert reward == pytest.approx(expected) and info["score"] == pytest.approx(expected)


def test_render_ansi(tiny_lm_path):
    env = make_env(tiny_lm_path, render_mode="ansi")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    env.reset(options={"prompt_index": 0})
    text = env.render()
    assert PROMPTS[0] in text
    env.step(PLAIN_TOKEN)
    env.step(PLAIN_TOKEN + 1)
    text = env.render()
    assert isinstance(text, str)
    assert PROMPTS[0] in text
    assert text.endswith(tokenizer.decode([PLAIN_TOKEN, PLAIN_TOKEN + 1]))


def test_render_human(tiny_llama_path, capsys):
    env = make_env(tiny_llama_path, render_mode="human")
    env.reset(options={"prompt_index": 1})
    assert PROMPTS[1] in capsys.readouterr().out


def test_same_seed_same_prompts(tiny_llama_path):
    prompts = [f"Write one sentence about day {i}." for i in range(10)]

    def sequence(seed):
        env = make_env(tiny_llama_path, prompts=prompts)
        env.reset(seed=seed)
        seen = [env.unwrapped.prompt]
        for _ in range(11):
            env.reset()
            seen.append(env.unwrapped.prompt)
        return seen

    first = sequence(3)
    assert first == sequence(3)
    assert len(set(first)) > 3  # drawn, not fixed
    assert first != sequence(4)
    # the draw uses the env's own RNG (np_random), not the global one
    np.random.seed(0)
    a = sequence(5)
    np.random.seed(1)
    assert sequence(5) == a


@pytest.mark.parametrize("index", [0, 1, 2])
def test_reset_prompt_options(tiny_lm_path, index):
    env = make_env(tiny_lm_path)
    m = env.unwrapped.max_prompt_length
    ids = expected_prompt_ids(tiny_lm_path, PROMPTS[index])
    for options in ({"prompt_index": index}, {"prompt": PROMPTS[index]}):
        obs, _ = env.reset(seed=123, options=options)
        assert env.unwrapped.prompt == PROMPTS[index]
        np.testing.assert_array_equal(obs["input_ids"][m - len(ids) : m], ids)
        assert obs["attention_mask"].sum() == len(ids)


def test_make_vec_env(tiny_lm_path):
    n_envs, max_new_tokens = 3, 3
    env_kwargs = dict(model_name_or_path=tiny_lm_path, prompts=PROMPTS, reward_fn="vader", max_new_tokens=max_new_tokens)
    vec_env = make_vec_env(ENV_ID, n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    length = vec_env.get_attr("max_length")[0]
    obs = vec_env.reset()
    assert obs["input_ids"].shape == (n_envs, length) and obs["attention_mask"].shape == (n_envs, length)
    for t in range(max_new_tokens):
        obs, rewards, dones, infos = vec_env.step(np.full(n_envs, PLAIN_TOKEN))
        assert dones.all() == (t == max_new_tokens - 1)
    assert all("score" in info and "terminal_observation" in info for info in infos)
    # Monitor records the episode: length max_new_tokens, return = score
    assert [info["episode"]["l"] for info in infos] == [max_new_tokens] * n_envs
    np.testing.assert_allclose([info["episode"]["r"] for info in infos], rewards, atol=1e-6)
    np.testing.assert_array_equal(obs["attention_mask"][:, -max_new_tokens:], 0)  # auto-reset: a fresh prompt
    vec_env.close()


# --- property tests (Hypothesis) --------------------------------------------------------------------------------------

CONTEXT = 256  # the tiny tokenizers' model_max_length
VOCAB = 300
EOS = -1  # stands for the LM's EOS token id in drawn action sequences

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
nonblank = unicode_text.filter(str.strip)
blank = st.text(st.sampled_from(" \t\n\r\u3000\u00a0"), max_size=4)  # empty once stripped
word = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=3)
very_long = st.builds(lambda w, n: (w + " ") * n, word, st.integers(90, 200))  # beyond the context


class Recorder:
    """A reward function that records its calls: the score is the completion's length."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions):
        self.calls.append((list(prompts), list(completions)))
        return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def lm_paths(tiny_llama_path, tiny_gpt2_path):
    return {"llama": tiny_llama_path, "gpt2": tiny_gpt2_path}


def expected_error(path, prompts, max_new_tokens):
    """The error the env must raise for these arguments (a regex on the message), or None."""
    for i, p in enumerate(prompts):
        if not p.strip():
            return re.escape(f"`prompts[{i}]`")
    tokenizer = load_tokenizer(path)
    longest = max(len(encode_prompt(tokenizer, p, tokenizer.chat_template is not None)) for p in prompts)
    if longest + max_new_tokens > CONTEXT:
        return "max_new_tokens.*context"
    return None


@st.composite
def episodes(draw):
    kind = draw(st.sampled_from(["llama", "gpt2"]))
    prompts = draw(st.lists(nonblank, min_size=1, max_size=3))
    max_new_tokens = draw(st.integers(1, 10))
    # each action is EOS (possibly at step 0) or any token id (which may be an EOS id too)
    actions = draw(st.lists(st.integers(0, VOCAB - 1) | st.just(EOS), min_size=max_new_tokens, max_size=max_new_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    return kind, prompts, max_new_tokens, actions, seed


@settings(max_examples=40, **SETTINGS)
@given(
    kind=st.sampled_from(["llama", "gpt2"]),
    prompts=st.lists(st.one_of(nonblank, blank, very_long), min_size=1, max_size=3),
    max_new_tokens=st.integers(1, 10) | st.integers(CONTEXT - 8, CONTEXT + 8),
)
def test_prompts_and_budgets_refused_exactly_when_they_should(lm_paths, kind, prompts, max_new_tokens):
    """Blank prompts, prompts beyond the context, budgets beyond it: a ValueError naming the argument, else an env."""
    path = lm_paths[kind]
    error = expected_error(path, prompts, max_new_tokens)
    event("refused" if error else "accepted")
    if error is not None:
        with pytest.raises(ValueError, match=error):
            TextGenerationEnv(path, prompts, reward_fn=Recorder(), max_new_tokens=max_new_tokens)
    else:
        env = TextGenerationEnv(path, prompts, reward_fn=Recorder(), max_new_tokens=max_new_tokens)
        assert env.max_length <= CONTEXT
        obs, _ = env.reset(seed=0)
        obs, *_ = env.step(eos_token_ids(path)[0])
        assert env.observation_space.contains(obs)


@settings(max_examples=100, **SETTINGS)
@given(case=episodes())
def test_episodes(lm_paths, case):
    kind, prompts, max_new_tokens, actions, seed = case
    path = lm_paths[kind]
    reward_fn = Recorder()
    env = TextGenerationEnv(path, prompts, reward_fn=reward_fn, max_new_tokens=max_new_tokens)
    eos = eos_token_ids(path)
    obs, info = env.reset(seed=seed)
    assert info == {} and env.observation_space.contains(obs)
    prompt_length = int(obs["attention_mask"].sum())
    assert prompt_length >= 1 and obs["attention_mask"][env.max_prompt_length :].sum() == 0
    for t, action in enumerate(actions):
        token = eos[0] if action == EOS else action
        obs, reward, terminated, truncated, info = env.step(token)
        assert env.observation_space.contains(obs)
        assert obs["input_ids"][env.max_prompt_length + t] == token
        assert int(obs["attention_mask"].sum()) == prompt_length + t + 1
        assert truncated is False
        should_end = token in eos or t + 1 == max_new_tokens
        assert terminated is should_end
        if not terminated:
            assert reward == 0.0 and info == {} and reward_fn.calls == []
            continue
        # ends exactly here, scored once, with a complete info
        event("EOS at step 0" if t == 0 and token in eos else "EOS" if token in eos else "max_new_tokens reached")
        assert set(info) == {"prompt", "completion", "score", "eos"} and info["eos"] is (token in eos)
        assert info["prompt"] in prompts
        assert reward_fn.calls == [([info["prompt"]], [info["completion"]])]
        assert reward == info["score"] == float(len(info["completion"]))
        assert isinstance(reward, float)
        with pytest.raises(AssertionError, match="reset"):
            env.step(0)
        break
    else:
        pytest.fail("the episode did not end after max_new_tokens tokens")


@settings(max_examples=6, **SETTINGS)
@given(
    kind=st.sampled_from(["llama", "gpt2"]),
    prompts=st.lists(nonblank, min_size=1, max_size=3),
    max_new_tokens=st.integers(1, 8),
)
def test_env_checkers(lm_paths, kind, prompts, max_new_tokens):
    env = TextGenerationEnv(lm_paths[kind], prompts, reward_fn=Recorder(), max_new_tokens=max_new_tokens)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)


@settings(max_examples=20, **SETTINGS)
@given(kind=st.sampled_from(["llama", "gpt2"]), prompts=st.lists(nonblank, min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_reset_is_seeded(lm_paths, kind, prompts, seed):
    env = TextGenerationEnv(lm_paths[kind], prompts, reward_fn=Recorder(), max_new_tokens=3)
    first = [env.reset(seed=seed)[0]] + [env.reset()[0] for _ in range(3)]
    second = [env.reset(seed=seed)[0]] + [env.reset()[0] for _ in range(3)]
    for a, b in zip(first, second):
        assert all(np.array_equal(a[k], b[k]) for k in ("input_ids", "attention_mask"))
