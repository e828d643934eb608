"""Shared pytest fixtures: tiny, random, fully offline causal LMs with tokenizers (see :mod:`sb3_textrl.testing`)."""

from __future__ import annotations

import pytest
import torch

from sb3_textrl.testing import build_tiny_lm

__all__ = ["build_tiny_lm"]


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory with a tiny random ``LlamaForCausalLM`` and its tokenizer (pad != eos, chat template)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), kind="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory with a tiny random ``GPT2LMHeadModel`` and its tokenizer (pad == eos, no chat template)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_gpt2"), kind="gpt2")


# --- added for the test suite -----------------------------------------------------------------------------------------

# The tiny models run thousands of very small matmuls: with more than one thread, OpenMP synchronisation costs ~100x
# the work itself (and much more when another process competes for the 2 cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_320_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with 320 logits (``config.vocab_size``) for a 300-token tokenizer."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_llama_320"), kind="llama", vocab_size=320)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_lm_path(request: pytest.FixtureRequest, tiny_llama_path: str, tiny_gpt2_path: str) -> str:
    """Each of the two tiny LMs in turn."""
    return {"llama": tiny_llama_path, "gpt2": tiny_gpt2_path}[request.param]
