"""Property tests of TextGeneration-v0's API (Hypothesis): any prompts, action sequences and ``max_new_tokens``."""

import re

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from sb3_textrl.envs.text_generation import TextGenerationEnv
from sb3_textrl.lm.loading import eos_token_ids, load_tokenizer
from sb3_textrl.lm.tokens import encode_prompt

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
        assert set(info) == {"prompt", "completion", "score"}
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
