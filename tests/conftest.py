"""Shared pytest fixtures and helpers.

Fixtures: tiny, random, fully offline causal LMs with tokenizers (see :mod:`sb3_textrl.testing`). Helpers, imported by
the test modules with ``from conftest import ...``: the text environment's id, prompts, a learnable reward and a
vectorized text environment.
"""

from __future__ import annotations

import string

import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

from sb3_textrl.testing import build_tiny_lm

__all__ = ["ENV_ID", "PROMPTS", "SHORT_PROMPTS", "build_tiny_lm", "letter_fraction", "make_vec"]

ENV_ID = "sb3_textrl/TextGeneration-v0"
PROMPTS = ["Hi", "Write one sentence about rain.", "Write a short review of a cafe."]
SHORT_PROMPTS = ["the sun is good", "rain"]


def letter_fraction(prompts, completions):
    """A trivially learnable reward: the fraction of ASCII letters in the completion (0 for an empty one)."""
    return [sum(ch in string.ascii_letters for ch in c) / len(c) if c else 0.0 for c in completions]


def make_vec(path, n_envs=2, max_new_tokens=4, reward_fn=letter_fraction, seed=0, **env_kwargs) -> VecEnv:
    """``n_envs`` text environments on the LM at ``path`` (SB3's ``make_vec_env``: a ``Monitor`` each, seeds
    ``seed + i``), with :data:`PROMPTS` unless ``env_kwargs`` gives other ``prompts``."""
    env_kwargs = {"model_name_or_path": path, "prompts": PROMPTS, "reward_fn": reward_fn, "max_new_tokens": max_new_tokens,
                  **env_kwargs}  # fmt: skip
    return make_vec_env(ENV_ID, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory with a tiny random ``LlamaForCausalLM`` and its tokenizer (pad != eos, chat template)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), kind="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory with a tiny random ``GPT2LMHeadModel`` and its tokenizer (pad == eos, no chat template)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_gpt2"), kind="gpt2")


# --- added for the test suite -----------------------------------------------------------------------------------------

# The tiny models run thousands of very small matmuls, for which OpenMP's thread synchronisation costs more than the
# work itself: one thread.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_320_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with 320 logits (``config.vocab_size``) for a 300-token tokenizer."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_llama_320"), kind="llama", vocab_size=320)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_lm_path(request: pytest.FixtureRequest, tiny_llama_path: str, tiny_gpt2_path: str) -> str:
    """Each of the two tiny LMs in turn."""
    return {"llama": tiny_llama_path, "gpt2": tiny_gpt2_path}[request.param]
