"""Text generation as a Gymnasium environment: one step is one token."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_textrl.loading import eos_token_ids, load_tokenizer, logits_width
from sb3_textrl.rewards import RewardFn, get_reward_fn, score_completions
from sb3_textrl.spaces import TokenObservationSpace


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool, system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt, chat-formatted (with the generation prompt) when ``use_chat_template``."""
    if use_chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


class TextGenerationEnv(gym.Env[dict, int]):
    """
    ## Description
    A causal language model writes a completion to a prompt, one token per step, and a reward function scores
    the finished completion. With ``LMPolicy`` as the agent, any SB3 on-policy algorithm fine-tunes the LM
    (RLHF-style when combined with :class:`sb3_textrl.KLPenaltyCallback`).

    ## Action Space
    ``Discrete(vocab_size)``: the id of the next token, where ``vocab_size`` is the LM's logits width
    (``config.vocab_size``, which may exceed ``len(tokenizer)``).

    ## Observation Space
    A :class:`~sb3_textrl.spaces.TokenObservationSpace`, a ``Dict`` of two int64 arrays of length
    ``max_length = max_prompt_length + max_new_tokens``:

    - ``input_ids``: the prompt (chat-formatted when the tokenizer has a chat template), left-padded to
      ``max_prompt_length`` with ``pad_token_id``, then the tokens generated so far, right-padded;
    - ``attention_mask``: 1 on real tokens, 0 on padding (exact even when ``pad_token_id == eos_token_id``).

    Generated token ``t`` (0-based) sits at index ``max_prompt_length + t``.

    ## Rewards
    0 at every step but the last; at the last step, the reward function's score of the completion
    (``"vader"``: VADER compound sentiment in [-1, 1]).

    ## Starting State
    A prompt drawn uniformly from ``prompts`` with ``self.np_random`` (or chosen with
    ``reset(options={"prompt": str})`` / ``options={"prompt_index": int}``), and no generated tokens.

    ## Episode End
    The episode ends if any one of the following occurs:

    1. Termination: the action is an EOS token id (the tokenizer's or the model config's).
    2. Termination: ``max_new_tokens`` tokens have been generated. This is a termination, not a truncation:
       the completion is finished and scored, so no value is bootstrapped after it.

    The last step's ``info`` holds ``prompt``, ``completion`` (decoded without special tokens) and ``score``.

    ## Arguments
    - ``model_name_or_path``: the LM whose tokenizer and vocabulary to use: an alias (``"smollm2-135m-instruct"``),
      a ``.gguf`` file or a local ``save_pretrained`` directory. Never downloaded.
    - ``prompts``: non-empty list of prompt strings.
    - ``reward_fn``: ``"vader"`` or a callable ``(prompts: list[str], completions: list[str]) -> list[float]``.
    - ``max_new_tokens``: episode length limit in tokens (default 32).
    - ``max_prompt_length``: prompt slots in the observation (default: the longest encoded prompt);
      a longer prompt is refused with a ``ValueError``.
    - ``use_chat_template``: format prompts with the tokenizer's chat template (default: when it has one).
    - ``system_prompt``: optional system message for the chat template.
    - ``render_mode``: ``"ansi"`` (returns prompt and text so far) or ``"human"`` (prints it); other modes
      (SB3's ``make_vec_env`` asks for ``"rgb_array"``) render nothing.

    ## Version History
    - v0: initial version
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
        model_name_or_path: str,
        prompts: Sequence[str],
        reward_fn: str | RewardFn = "vader",
        max_new_tokens: int = 32,
        max_prompt_length: int | None = None,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        render_mode: str | None = None,
    ):
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("`prompts` must be a non-empty list of strings, e.g. prompts=['Write one sentence about rain.'].")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"`prompts[{i}]` is {prompt!r}: every prompt must be a non-empty string.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")

        self.model_name_or_path = model_name_or_path
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.vocab_size = logits_width(model_name_or_path)
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(
                f"The tokenizer of `model_name_or_path={model_name_or_path!r}` has {len(self.tokenizer)} tokens but the LM's "
                f"logits width (config.vocab_size) is {self.vocab_size}: tokenizer and LM do not match. "
                "Save them together with `save_pretrained` into one directory."
            )
        self.reward_fn = get_reward_fn(reward_fn)
        self.prompts = list(prompts)
        self.max_new_tokens = int(max_new_tokens)
        self.use_chat_template = (
            self.tokenizer.chat_template is not None if use_chat_template is None else bool(use_chat_template)
        )
        if self.use_chat_template and self.tokenizer.chat_template is None:
            raise ValueError("`use_chat_template=True` but the tokenizer has no chat template: pass use_chat_template=False.")
        self.system_prompt = system_prompt
        self.eos_token_ids = eos_token_ids(model_name_or_path)
        self.pad_token_id = int(self.tokenizer.pad_token_id)

        encoded = [encode_prompt(self.tokenizer, p, self.use_chat_template, system_prompt) for p in self.prompts]
        longest = max(len(ids) for ids in encoded)
        self.max_prompt_length = longest if max_prompt_length is None else int(max_prompt_length)
        if longest > self.max_prompt_length:
            i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
            raise ValueError(
                f"`prompts[{i}]` encodes to {longest} tokens, more than `max_prompt_length={self.max_prompt_length}`: "
                "shorten the prompt or raise `max_prompt_length`."
            )
        context = getattr(self.tokenizer, "model_max_length", None)
        self.max_length = self.max_prompt_length + self.max_new_tokens
        if context is not None and context < 1e9 and self.max_length > context:
            raise ValueError(
                f"`max_new_tokens={self.max_new_tokens}` plus the longest prompt ({self.max_prompt_length} tokens) "
                f"exceeds the LM's context of {context} tokens: lower `max_new_tokens` or shorten the prompts."
            )
        # left-padded prompt rows, built once
        self._prompt_ids = np.full((len(encoded), self.max_length), self.pad_token_id, dtype=np.int64)
        self._prompt_mask = np.zeros((len(encoded), self.max_length), dtype=np.int64)
        for row, ids in enumerate(encoded):
            self._prompt_ids[row, self.max_prompt_length - len(ids) : self.max_prompt_length] = ids
            self._prompt_mask[row, self.max_prompt_length - len(ids) : self.max_prompt_length] = 1

        self.observation_space = TokenObservationSpace(self.max_length, self.vocab_size, model_name_or_path)
        self.action_space = spaces.Discrete(self.vocab_size)
        self.render_mode = render_mode

        self._prompt_index: int | None = None
        self._input_ids: np.ndarray | None = None
        self._attention_mask: np.ndarray | None = None
        self._generated: list[int] = []
        self._done = False

    @property
    def prompt(self) -> str:
        assert self._prompt_index is not None, "Call reset before using the prompt."
        return self.prompts[self._prompt_index]

    def _get_obs(self) -> dict[str, np.ndarray]:
        assert self._input_ids is not None and self._attention_mask is not None
        return {"input_ids": self._input_ids.copy(), "attention_mask": self._attention_mask.copy()}

    def completion(self) -> str:
        """The text generated so far, without special tokens."""
        return self.tokenizer.decode(self._generated, skip_special_tokens=True)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "prompt" in options:
            if options["prompt"] not in self.prompts:
                raise ValueError(f"`options['prompt']` ({options['prompt']!r}) is not one of this env's prompts.")
            self._prompt_index = self.prompts.index(options["prompt"])
        elif "prompt_index" in options:
            self._prompt_index = int(options["prompt_index"]) % len(self.prompts)
        else:
            self._prompt_index = int(self.np_random.integers(len(self.prompts)))
        self._input_ids = self._prompt_ids[self._prompt_index].copy()
        self._attention_mask = self._prompt_mask[self._prompt_index].copy()
        self._generated = []
        self._done = False
        if self.render_mode == "human":
            self.render()
        return self._get_obs(), {}

    def step(self, action: int):
        assert self._input_ids is not None, "Call reset before using step method."
        assert not self._done, "The episode has ended: call reset before using step method again."
        token = int(action)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"`action` {token} is not a token id in [0, {self.vocab_size}).")
        position = self.max_prompt_length + len(self._generated)
        self._input_ids[position] = token
        self._attention_mask[position] = 1
        self._generated.append(token)
        terminated = token in self.eos_token_ids or len(self._generated) >= self.max_new_tokens
        reward, info = 0.0, {}
        if terminated:
            self._done = True
            completion = self.completion()
            score = score_completions(self.reward_fn, [self.prompt], [completion])[0]
            reward = score
            info = {"prompt": self.prompt, "completion": completion, "score": score}
        if self.render_mode == "human":
            self.render()
        return self._get_obs(), reward, terminated, False, info

    def render(self):
        if self.render_mode not in self.metadata["render_modes"]:
            # SB3's make_vec_env asks for "rgb_array" by default: tolerate it, as a text env cannot draw
            gym.logger.warn(f'Cannot render with render_mode={self.render_mode!r}: use gym.make(..., render_mode="ansi").')
            return None
        text = f"{self.prompt}\n>>> {self.completion()}" if self._prompt_index is not None else ""
        if self.render_mode == "ansi":
            return text
        print(text)
        return None
