"""
The target-sequence task of the design documents: emit a target sequence of tokens, one token per step.

Source: the token-matching example of the project's source documents: a target of ``length`` tokens over
``vocab_size`` tokens, reward 1 when the action equals the target token at the current position. The documents drew
a fresh target every episode and never showed it, so no policy can beat chance (``mode="random"`` here); the
learnable variants ``mode="fixed"`` (a target to memorise) and ``mode="copy"`` (the target is observed) are added.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["MODES", "TokenMatchEnv"]

#: the three tasks of :class:`TokenMatchEnv` (see its docstring)
MODES = ("fixed", "copy", "random")


class TokenMatchEnv(gym.Env[np.ndarray, int]):
    """
    ## Description
    Write a target sequence of ``length`` tokens, one token per step, and earn 1 for every token in the right place.
    A token-level stand-in for text generation that any policy can be checked on, the LM policy
    (``LMPolicy``, with a ``vocab_size`` equal to the LM's logits width) as well as ``MlpPolicy``. Three modes:

    - ``"fixed"``: one target for all episodes, drawn from ``target_seed``; the policy must memorise it
      (the map from position to token).
    - ``"copy"``: a fresh target each episode, drawn from ``self.np_random`` and shown in the observation; the policy
      must copy the token at the current position.
    - ``"random"``: the documents' original: a fresh target each episode, never shown. Nothing can be learned:
      every policy is at chance level. Kept as a control.

    ## Action Space
    ``Discrete(vocab_size)``: the token id for the current position.

    ## Observation Space
    ``Box(0, vocab_size - 1, (n,), int64)`` token ids, so that an LM can read them (the last token is the one the
    LM conditions on) and SB3 stores them as integers (never a ``MultiDiscrete``, which SB3 would one-hot):

    - ``"fixed"`` and ``"random"``: ``n = 1``, the position marker ``[t]``;
    - ``"copy"``: ``n = length + 1``, the target then the position marker, ``[target_0, ..., target_{length-1}, t]``.

    The position marker is the token id ``t``, the number of tokens written so far (``0 <= t <= length``), hence
    ``vocab_size > length``. ``MlpPolicy`` reads the ids as floats (SB3 does not rescale a ``Box``).

    ## Rewards
    1.0 when the action equals ``target[t]``, else 0.0. Episode return: at most ``length`` (the optimum in
    ``"fixed"`` and ``"copy"`` modes); a uniformly random policy gets ``length / vocab_size`` on average (chance
    level, also the optimum of ``"random"`` mode). Defaults: optimum 20, chance 20 / 32 = 0.625.

    ## Starting State
    ``t = 0``. The target: in ``"fixed"`` mode ``np.random.default_rng(target_seed).integers(vocab_size, size=length)``
    (the same in every copy of the env, whatever seed ``reset`` gets), or with ``target_seed=None`` drawn from
    ``self.np_random`` at the first reset and again at every reset given a seed (one target per env seed);
    in ``"copy"`` and ``"random"`` modes drawn from ``self.np_random`` at every reset.

    ## Episode End
    1. Termination: ``length`` tokens have been written (the sequence is complete, so no value is bootstrapped).

    No truncation (``sb3_textrl/TokenMatch-v0`` has no ``max_episode_steps``). The info of each step holds
    ``target_token`` and ``is_match``.

    ## Arguments
    - ``length``: tokens per episode (default 20).
    - ``vocab_size``: number of token ids, ``> length`` (default 32). With ``LMPolicy``: the LM's logits width.
    - ``mode``: ``"fixed"`` (default), ``"copy"`` or ``"random"``.
    - ``target_seed``: the seed of the ``"fixed"`` target (default 0); ``None`` for one target per env seed.
    - ``render_mode``: ``"ansi"`` (returns target and tokens written so far as text) or ``"human"`` (prints them).

    ```python
    >>> import gymnasium as gym
    >>> import sb3_textrl
    >>> env = gym.make("sb3_textrl/TokenMatch-v0", length=4, vocab_size=8, mode="copy")
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, obs[-1]
    ((5,), np.int64(0))
    >>> obs, reward, terminated, truncated, info = env.step(obs[0])
    >>> reward, obs[-1]
    (1.0, np.int64(1))

    ```

    ## Version History
    - v0: initial version (``"fixed"`` and ``"copy"`` added to the documents' unlearnable ``"random"`` task).
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
        length: int = 20,
        vocab_size: int = 32,
        mode: str = "fixed",
        target_seed: int | None = 0,
        render_mode: str | None = None,
    ):
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"`length` must be a positive integer, got {length!r}.")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= length:
            raise ValueError(
                f"`vocab_size` must be an integer greater than `length` ({length}), got {vocab_size!r}: the position "
                "marker t (0 <= t <= length) is a token id. Raise `vocab_size` or lower `length`."
            )
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if target_seed is not None and (isinstance(target_seed, bool) or not isinstance(target_seed, (int, np.integer))):
            raise ValueError(f"`target_seed` must be an integer or None, got {target_seed!r}.")
        self.length = int(length)
        self.vocab_size = int(vocab_size)
        self.mode = mode
        self.target_seed = target_seed
        n = self.length + 1 if mode == "copy" else 1
        self.observation_space = spaces.Box(0, self.vocab_size - 1, (n,), np.int64)
        self.action_space = spaces.Discrete(self.vocab_size)
        self.render_mode = render_mode

        self.target: np.ndarray | None = None
        if mode == "fixed" and target_seed is not None:
            self.target = self._draw_target(np.random.default_rng(target_seed))
        self._chosen: list[int] | None = None  # the tokens written so far; None before the first reset

    @property
    def chance_return(self) -> float:
        """Mean episode return of a uniformly random policy: ``length / vocab_size``."""
        return self.length / self.vocab_size

    @property
    def optimal_return(self) -> float:
        """Best mean episode return: ``length`` (``length / vocab_size`` in ``"random"`` mode)."""
        return self.chance_return if self.mode == "random" else float(self.length)

    def _draw_target(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.vocab_size, size=self.length, dtype=np.int64)

    def _get_obs(self) -> np.ndarray:
        assert self.target is not None and self._chosen is not None
        marker = np.array([len(self._chosen)], dtype=np.int64)
        return np.concatenate([self.target, marker]) if self.mode == "copy" else marker

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        fixed = self.mode == "fixed"
        if not fixed or (self.target_seed is None and (seed is not None or self.target is None)):
            self.target = self._draw_target(self.np_random)
        self._chosen = []
        if self.render_mode == "human":
            self.render()
        return self._get_obs(), {}

    def step(self, action: int):
        assert self.target is not None and self._chosen is not None, "Call reset before using step method."
        t = len(self._chosen)
        assert t < self.length, "The episode has ended: call reset before using step method again."
        a = np.asarray(action)
        if a.size != 1 or not np.issubdtype(a.dtype, np.integer) or not 0 <= int(a) < self.vocab_size:
            raise ValueError(f"`action` must be a token id, an integer in [0, {self.vocab_size}), got {action!r}.")
        token = int(a)
        self._chosen.append(token)
        target_token = int(self.target[t])
        is_match = token == target_token
        terminated = len(self._chosen) == self.length
        if self.render_mode == "human":
            self.render()
        return self._get_obs(), float(is_match), terminated, False, {"target_token": target_token, "is_match": is_match}

    def render(self):
        if self.render_mode not in self.metadata["render_modes"]:
            gym.logger.warn(f'Cannot render with render_mode={self.render_mode!r}: use gym.make(..., render_mode="ansi").')
            return None
        text = "(not reset)"
        if self.target is not None and self._chosen is not None:
            marks = "".join("+" if c == int(g) else "." for c, g in zip(self._chosen, self.target))
            text = f"target: {self.target.tolist()}\nchosen: {self._chosen} [{marks}]"
        if self.render_mode == "ansi":
            return text
        print(text)
        return None
