"""Tiny, random, fully offline causal LMs with tokenizers, for tests, examples and benchmarks.

The models are built from configs (random weights, ``torch.manual_seed(0)``) with a small byte-level BPE tokenizer
trained on a built-in corpus, and saved with ``save_pretrained``, so that they load back through the real loading code
(``AutoModelForCausalLM.from_pretrained(path)``) without any network access::

    from sb3_textrl.testing import build_tiny_lm
    path = build_tiny_lm("/tmp/tiny", kind="llama")
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "GPT2_SPECIAL_TOKENS",
    "LLAMA_SPECIAL_TOKENS",
    "TINY_BPE_VOCAB_SIZE",
    "TINY_CHAT_TEMPLATE",
    "TINY_CORPUS",
    "build_tiny_lm",
    "build_tiny_tokenizer",
]

# Target size of the BPE vocabulary (256 byte-level symbols + special tokens + merges).
TINY_BPE_VOCAB_SIZE = 300

# Small built-in English corpus used to train the BPE tokenizer.
TINY_CORPUS = [
    "Write one sentence about rain.",
    "Write a short review of a cafe.",
    "The sun is good and the sky is blue.",
    "It was a great day at the ocean.",
    "I am happy because the sun came out.",
    "The rain made the morning feel bad and grey.",
    "This cafe has great coffee and a happy staff.",
    "The review said the food was bad but the view was good.",
    "Write one sentence about the ocean.",
    "Describe your morning commute in one sentence.",
    "The train was late again and everyone was tired.",
    "What a wonderful, bright and sunny afternoon!",
    "She wrote a good review of the new book.",
    "He felt sad when the rain did not stop.",
    "The ocean waves were calm, and the sand was warm.",
    "A short sentence can still be a great sentence.",
    "We had a bad experience at the cafe downtown.",
    "The movie was good, the music was great, and I was happy.",
    "Monday mornings are hard, but coffee helps.",
    "The weather today is cold, wet and windy.",
    "I love walking by the ocean when the sun sets.",
    "Please write a positive sentence about your day.",
    "The service was slow and the soup was cold.",
    "This is the best day of the year!",
    "The city was quiet after the rain.",
    "Our team did a great job on the project.",
    "My phone battery died in the middle of the call.",
    "The garden looks happy and green in the sun.",
    "Thank you for the good advice, it helped a lot.",
    "Nothing went right today, and it was a bad day.",
    "Describe a rainy evening at home in one sentence.",
    "The children laughed and played in the park.",
    "Write a short review of a movie you watched.",
    "The sentence was short, clear and kind.",
    "Good news travels fast, and bad news travels faster.",
    "We drank tea at the small cafe near the ocean.",
    "The traffic was terrible, but the radio was fun.",
    "I think tomorrow will be a great and happy day.",
    "Reviews help people pick a good place to eat.",
    "The sun, the rain, the ocean and the wind: 1, 2, 3, 4, 5.",
    "user assistant system: hello, how are you? I am fine, thanks!",
]

# Special tokens. The Llama-style tokenizer has distinct bos/eos/pad and chat markers.
LLAMA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
GPT2_SPECIAL_TOKENS = ["<|endoftext|>"]

# Simple ChatML-like template; ``</s>`` (eos) closes every turn so generation stops on eos.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _train_bpe(special_tokens: list[str], vocab_size: int = TINY_BPE_VOCAB_SIZE) -> Tokenizer:
    """Train a small byte-level BPE tokenizer on ``TINY_CORPUS``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS, trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(kind: str = "llama") -> PreTrainedTokenizerFast:
    """
    Build the tiny byte-level BPE tokenizer for ``kind``, trained on :data:`TINY_CORPUS` (300 tokens, special ones
    included; ``model_max_length=256``).

    :param kind: ``"llama"`` (default: ``<s>``, ``</s>``, ``<pad>`` distinct, chat markers and a chat template) or
        ``"gpt2"`` (``<|endoftext|>`` is bos, eos, unk and pad; no chat template)
    :raises ValueError: for another ``kind``
    """
    if kind == "llama":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(LLAMA_SPECIAL_TOKENS),
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
            clean_up_tokenization_spaces=False,
            model_max_length=256,
        )
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    elif kind == "gpt2":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(GPT2_SPECIAL_TOKENS),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            clean_up_tokenization_spaces=False,
            model_max_length=256,
        )
    else:
        raise ValueError(f"Unknown tiny LM kind {kind!r}, expected 'llama' or 'gpt2'")
    return tokenizer


def build_tiny_lm(path: str | os.PathLike, kind: str = "llama", vocab_size: int | None = None) -> str:
    """Build a tiny random causal LM + tokenizer and save both to ``path``.

    The LM (float32, weights drawn after ``torch.manual_seed(0)``, 256 positions): ``"llama"`` is a
    ``LlamaForCausalLM`` with 2 layers, hidden size 32, 4 attention heads and 2 key-value heads, tied embeddings;
    ``"gpt2"`` a ``GPT2LMHeadModel`` with 2 layers, hidden size 32 and 2 heads.

    :param path: Output directory (created if needed).
    :param kind: ``"llama"`` (default; distinct bos/eos/pad, chat template) or ``"gpt2"`` (pad == eos, no chat template).
    :param vocab_size: Model vocabulary size (logits width). Defaults to ``len(tokenizer)``;
        pass a different value to get a model/tokenizer vocabulary mismatch.
    :return: ``path`` as a string.
    :raises ValueError: for another ``kind``
    """
    path = str(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tiny_tokenizer(kind)
    if vocab_size is None:
        vocab_size = len(tokenizer)

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_layer=2,
            n_embd=32,
            n_head=2,
            n_positions=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)

    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
