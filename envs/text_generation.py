"""Text generation as a Gymnasium environment: one step is one token."""

from __future__ import annotations

import math
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_textrl.common.spaces import TokenObservationSpace
from sb3_textrl.lm.loading import eos_token_ids, load_config, load_tokenizer, logits_width
from sb3_textrl.lm.tokens import encode_prompt
from sb3_textrl.rewards import (
    REWARD_REGISTRY,
    RewardFn,
    check_reward_spec,
    get_reward_fn,
    is_per_token,
    score_completions,
    score_tokens,
    term_scores,
)

__all__ = ["TextGenerationEnv"]


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
    A :class:`~sb3_textrl.common.spaces.TokenObservationSpace`, a ``Dict`` of two int64 arrays of length
    ``max_length = max_prompt_length + max_new_tokens``:

    - ``input_ids``: the prompt (chat-formatted when the tokenizer has a chat template), left-padded to
      ``max_prompt_length`` with ``pad_token_id``, then the tokens generated so far, right-padded;
    - ``attention_mask``: 1 on real tokens, 0 on padding (exact even when ``pad_token_id == eos_token_id``).

    Generated token ``t`` (0-based) sits at index ``max_prompt_length + t``.

    ## Rewards
    0 at every step but the last; at the last step, the reward function's score of the completion
    (``"vader"``: VADER compound sentiment in [-1, 1]; see :mod:`sb3_textrl.rewards` for the others and their ranges).

    With ``missing_eos_penalty`` > 0, an episode that ends at ``max_new_tokens`` without an EOS token has that much
    taken off its last reward (TRL's ``missing_eos_penalty``; the "EOS trick" of Huang et al. 2024, *The N+
    Implementation Details of RLHF with PPO*, replaces the score by -1 instead); ``info["score"]`` stays the reward
    function's score.

    A per-token reward (``per_token = True``, see :mod:`sb3_textrl.rewards.base`) instead pays each step the reward
    of the token just generated: the environment calls it after every step with the tokens so far (each decoded on
    its own; EOS as ``""``) and the episode's return is the sum of the token rewards.

    With ``defer_scoring=True`` the environment does not score: the last step's reward is 0 and its ``info`` has
    ``score_deferred=True``, for :class:`sb3_textrl.common.vec_env.BatchedRewardVecEnv`, which scores all the episodes that
    end in the same vectorized step with one call and adds the scores to their rewards
    (:func:`sb3_textrl.common.vec_env.make_text_vec_env` builds both).

    ## Starting State
    A prompt drawn uniformly from ``prompts`` with ``self.np_random`` (or chosen with
    ``reset(options={"prompt": str})`` / ``options={"prompt_index": int}``), and no generated tokens.

    ## Episode End
    The episode ends if any one of the following occurs:

    1. Termination: the action is an EOS token id (the tokenizer's or the model config's).
    2. Termination: ``max_new_tokens`` tokens have been generated. This is a termination, not a truncation:
       the completion is finished and scored, so no value is bootstrapped after it.

    The last step's ``info`` holds ``prompt``, ``completion`` (decoded without special tokens), ``eos`` (whether the
    completion ended with an EOS token) and ``score`` (the episode's score; the sum of the token rewards for a per-token
    reward, which also gives ``token_rewards``), plus ``score_terms`` (``{term: score}``) for a reward that keeps
    per-term scores, such as ``"combined"``.

    ## Arguments
    - ``model_name_or_path``: the LM whose tokenizer and vocabulary to use: an alias (``"smollm2-135m-instruct"``),
      a ``.gguf`` file or a local ``save_pretrained`` directory. Never downloaded.
    - ``prompts``: non-empty list of prompt strings.
    - ``reward_fn``: a reward name (``"vader"``, ``"reward_model"``, ``"bleu"``...: see
      :data:`sb3_textrl.rewards.REWARD_REGISTRY`), a callable ``(prompts: list[str], completions: list[str]) -> list[float]``
      or a per-token reward. Objects holding a model should share it when deep-copied (``gym.make`` deep-copies the
      registered kwargs), as the built-in ones do.
    - ``max_new_tokens``: episode length limit in tokens (default 32).
    - ``max_prompt_length``: prompt slots in the observation (default: the longest encoded prompt);
      a longer prompt is refused with a ``ValueError``.
    - ``use_chat_template``: format prompts with the tokenizer's chat template (default: when it has one).
    - ``system_prompt``: optional system message for the chat template.
    - ``render_mode``: ``"ansi"`` (returns prompt and text so far) or ``"human"`` (prints it); other modes
      (SB3's ``make_vec_env`` asks for ``"rgb_array"``) render nothing.
    - ``reward_kwargs``: arguments of a named reward, e.g. ``reward_fn="bleu", reward_kwargs=dict(references=path)``.
    - ``defer_scoring``: leave the scoring to :class:`sb3_textrl.common.vec_env.BatchedRewardVecEnv` (default False); the
      reward is then only checked here, not built, and may be ``None`` (the wrapper brings it).
    - ``missing_eos_penalty``: taken off the last reward of a completion cut at ``max_new_tokens`` without EOS, in the
      reward's units (default 0: none).

    The constructor raises a ``ValueError`` naming the argument for: empty or blank prompts, a prompt that encodes to no
    token or to more than ``max_prompt_length`` tokens, ``max_new_tokens`` that is not a positive integer or that, with
    the longest prompt, exceeds the LM's context (the tokenizer's ``model_max_length``, else the config's
    ``max_position_embeddings``/``n_positions``), a tokenizer larger than the LM's logits, ``use_chat_template=True``
    without a chat template, a negative or non-finite ``missing_eos_penalty``, a reward that
    :func:`~sb3_textrl.rewards.get_reward_fn` refuses, or a per-token reward with ``defer_scoring=True``; ``step`` for
    an action that is not a token id, ``reset`` for an unknown ``options["prompt"]``.

    ## Version History
    - v0: initial version; later, ``missing_eos_penalty`` (default 0: rewards unchanged) and ``info["eos"]``
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}
    #: the attributes that hold the episode in flight: checkpoints save them to resume mid-episode
    #: (:mod:`sb3_textrl.common.training_checkpoints`); list any new per-episode attribute here
    episode_state_attrs = ("_prompt_index", "_input_ids", "_attention_mask", "_generated", "_pieces", "_return", "_done")

    def __init__(
        self,
        model_name_or_path: str,
        prompts: Sequence[str],
        reward_fn: str | RewardFn | None = "vader",
        max_new_tokens: int = 32,
        max_prompt_length: int | None = None,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        render_mode: str | None = None,
        reward_kwargs: dict | None = None,
        defer_scoring: bool = False,
        missing_eos_penalty: float = 0.0,
    ):
        _check_prompts_and_budget(prompts, max_new_tokens)
        self.missing_eos_penalty = _check_missing_eos_penalty(missing_eos_penalty)
        self.model_name_or_path = model_name_or_path
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.vocab_size = logits_width(model_name_or_path)
        _check_tokenizer_fits(self.tokenizer, self.vocab_size, model_name_or_path)
        self.reward_spec = reward_fn
        self.reward_kwargs = reward_kwargs
        self.defer_scoring = bool(defer_scoring)
        self.reward_fn: RewardFn | None = _build_reward(reward_fn, reward_kwargs, self.defer_scoring)
        self.per_token = is_per_token(self.reward_fn)
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
        self.max_prompt_length = _prompt_slots(self.prompts, encoded, max_prompt_length)
        self.max_length = self.max_prompt_length + self.max_new_tokens
        _check_context(self.max_new_tokens, self.max_prompt_length, _context_length(self.tokenizer, model_name_or_path))
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
        self._pieces: list[str] = []  # per-token rewards: each generated token decoded on its own
        self._return = 0.0
        self._done = False

    @property
    def prompt(self) -> str:
        """The prompt of the current episode."""
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
        self._pieces = []
        self._return = 0.0
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
        ended_with_eos = token in self.eos_token_ids
        terminated = ended_with_eos or len(self._generated) >= self.max_new_tokens
        reward, info = 0.0, {}
        if terminated:
            self._done = True
        if self.per_token:
            self._pieces.append(self.tokenizer.decode([token], skip_special_tokens=True))
            token_rewards = score_tokens(self.reward_fn, [self.prompt], [self._pieces])[0]  # type: ignore[arg-type]
            reward = token_rewards[-1]
            self._return += reward
            if terminated:
                info = {"prompt": self.prompt, "completion": self.completion(), "score": self._return}
                info["token_rewards"] = token_rewards
        elif terminated and self.defer_scoring:
            info = {"prompt": self.prompt, "completion": self.completion(), "score_deferred": True}
        elif terminated:
            completion = self.completion()
            reward = score_completions(self.reward_fn, [self.prompt], [completion])[0]  # type: ignore[arg-type]
            info = {"prompt": self.prompt, "completion": completion, "score": reward}
            terms = term_scores(self.reward_fn, 0)
            if terms is not None:
                info["score_terms"] = terms
        if terminated:
            info["eos"] = ended_with_eos
            if not ended_with_eos:
                reward -= self.missing_eos_penalty
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


# --- argument checks of TextGenerationEnv -----------------------------------------------------------------------------


def _check_prompts_and_budget(prompts: Sequence[str], max_new_tokens: int) -> None:
    """
    :raises ValueError: unless ``prompts`` is a non-empty sequence of non-blank strings and ``max_new_tokens`` a
        positive integer
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("`prompts` must be a non-empty list of strings, e.g. prompts=['Write one sentence about rain.'].")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"`prompts[{i}]` is {prompt!r}: every prompt must be a non-empty string.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")


def _check_missing_eos_penalty(missing_eos_penalty: float) -> float:
    """:raises ValueError: unless ``missing_eos_penalty`` is a finite number >= 0"""
    try:
        penalty = float(missing_eos_penalty)
    except (TypeError, ValueError):
        penalty = float("nan")
    if isinstance(missing_eos_penalty, bool) or not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(
            f"`missing_eos_penalty` ({missing_eos_penalty!r}) must be a finite number >= 0, in the reward's units: "
            "what a completion cut at max_new_tokens without EOS loses (0 for none)."
        )
    return penalty


def _check_tokenizer_fits(tokenizer, vocab_size: int, model_name_or_path: str) -> None:
    """
    :raises ValueError: if the tokenizer has more tokens than the LM has logits
    """
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer of `model_name_or_path={model_name_or_path!r}` has {len(tokenizer)} tokens but the LM's "
            f"logits width (config.vocab_size) is {vocab_size}: tokenizer and LM do not match. "
            "Save them together with `save_pretrained` into one directory."
        )


def _build_reward(reward_fn: str | RewardFn | None, reward_kwargs: dict | None, defer_scoring: bool) -> RewardFn | None:
    """
    The reward the environment calls: built from ``reward_fn`` and ``reward_kwargs``, or, with ``defer_scoring``, only
    checked (``None``: :class:`~sb3_textrl.common.vec_env.BatchedRewardVecEnv` builds and calls it).

    :raises ValueError: for a reward :func:`~sb3_textrl.rewards.get_reward_fn` refuses, or a per-token reward with
        ``defer_scoring``
    """
    if not defer_scoring:
        return get_reward_fn(reward_fn, reward_kwargs)
    if reward_fn is not None:  # checked here, built by the wrapper
        check_reward_spec(reward_fn, reward_kwargs)
    factory = REWARD_REGISTRY.get(reward_fn) if isinstance(reward_fn, str) else reward_fn
    if is_per_token(factory):
        raise ValueError(
            "`defer_scoring=True` but `reward_fn` is a per-token reward, which the environment pays at every step: "
            "pass defer_scoring=False."
        )
    return None


def _prompt_slots(prompts: list[str], encoded: list[list[int]], max_prompt_length: int | None) -> int:
    """
    The number of prompt slots of an observation: ``max_prompt_length``, by default the longest encoded prompt.

    :raises ValueError: if a prompt encodes to no token, or to more than ``max_prompt_length`` tokens
    """
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"`prompts[{i}]` ({prompts[i]!r}) encodes to no tokens: give a prompt with text.")
    longest = max(len(ids) for ids in encoded)
    slots = longest if max_prompt_length is None else int(max_prompt_length)
    if longest > slots:
        i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
        raise ValueError(
            f"`prompts[{i}]` encodes to {longest} tokens, more than `max_prompt_length={slots}`: "
            "shorten the prompt or raise `max_prompt_length`."
        )
    return slots


def _context_length(tokenizer, model_name_or_path: str) -> int | None:
    """The LM's context in tokens: the tokenizer's limit, or the LM's position embeddings (GGUF tokenizers often have no
    limit); ``None`` when neither gives one."""
    config = load_config(model_name_or_path)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(tokenizer, "model_max_length", None)]
    limits += [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    return min((int(n) for n in limits if isinstance(n, (int, float)) and 0 < n < 1e9), default=None)


def _check_context(max_new_tokens: int, max_prompt_length: int, context: int | None) -> None:
    """
    :raises ValueError: if the prompt slots plus ``max_new_tokens`` exceed the LM's context
    """
    if context is not None and max_prompt_length + max_new_tokens > context:
        raise ValueError(
            f"`max_new_tokens={max_new_tokens}` plus the longest prompt ({max_prompt_length} tokens) "
            f"exceeds the LM's context of {context} tokens: lower `max_new_tokens` or shorten the prompts."
        )
