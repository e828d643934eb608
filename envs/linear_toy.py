"""
The 1-D control task of the design documents ("drive a point to 1"), with the documents' bugs fixed.

Source: the toy continuous-control example of the project's source documents: state s, action a,
``s <- s + 0.1 * a``, reward ``-|s - 1|``, done when ``|s - 1| < 0.1``. That version let the action be unbounded,
returned a ``torch`` tensor as ``done`` and was paired with a policy that ignored its state; see the class docstring.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["LinearToyEnv"]


class LinearToyEnv(gym.Env[np.ndarray, np.ndarray]):
    """
    ## Description
    A point on a line must reach the goal ``s = 1``: each step moves it by ``0.1 * a`` and costs its distance to the
    goal. The smallest continuous-control task there is: the optimal policy is ``a = sign(1 - s)`` (full speed towards
    the goal), so it checks that an agent reads its observation and outputs a bounded action.

    Differences from the documents' version:

    1. The action is bounded, ``Box(-1, 1)``, and clipped to it in ``step`` (the documents' was unbounded, so the
       optimum moved arbitrarily far in one step).
    2. ``terminated`` and ``truncated`` are Python ``bool`` (the documents returned a ``torch`` tensor as ``done``),
       the time limit is a truncation by ``max_episode_steps`` (Gymnasium's ``TimeLimit``), not a termination.
    3. The documents' policy ignored its state; here the state is the observation, so policies can (and must) use it.

    ## Action Space
    ``Box(-1.0, 1.0, (1,), float32)``: the velocity ``a``. Actions outside ``[-1, 1]`` are clipped.

    ## Observation Space
    ``Box(-3.4e38, 3.4e38, (1,), float32)`` (the float32 range: unbounded): the position ``s``.

    ## Rewards
    ``-|s' - 1|`` after each step, ``s'`` the new position: always ``<= 0``. Mean undiscounted return over the
    starting distribution (4000 episodes): about -9.3 for the optimal policy ``a = sign(1 - s)``, about -114 for a
    uniformly random one.

    ## Starting State
    ``s ~ N(0, 1)``, drawn from ``self.np_random``.

    ## Episode End
    The episode ends if any one of the following occurs:

    1. Termination: ``|s' - 1| < 0.1`` (the goal is reached).
    2. Truncation: the episode length reaches 100 (``max_episode_steps`` of ``sb3_textrl/LinearToy-v0``).

    ## Arguments
    - ``render_mode``: ``"ansi"`` (returns the position as text) or ``"human"`` (prints it).

    ```python
    >>> import gymnasium as gym
    >>> import sb3_textrl
    >>> env = gym.make("sb3_textrl/LinearToy-v0")
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, env.action_space
    ((1,), Box(-1.0, 1.0, (1,), float32))
    >>> env.spec.max_episode_steps
    100

    ```

    ## Version History
    - v0: initial version (the documents' task with a bounded action, ``bool`` flags and an observed state).
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    step_size = 0.1
    goal = 1.0
    tolerance = 0.1

    def __init__(self, render_mode: str | None = None):
        high = np.finfo(np.float32).max  # unbounded, as CartPole's velocities (an infinite bound fails check_env)
        self.observation_space = spaces.Box(-high, high, (1,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.render_mode = render_mode
        self._state: float | None = None

    def _get_obs(self) -> np.ndarray:
        return np.array([self._state], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = float(self.np_random.normal(0.0, 1.0))
        if self.render_mode == "human":
            self.render()
        return self._get_obs(), {}

    def step(self, action: np.ndarray):
        assert self._state is not None, "Call reset before using step method."
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (1,) or not np.isfinite(a[0]):
            raise ValueError(f"`action` must be one finite number (shape (1,)), got {action!r}.")
        velocity = float(np.clip(a[0], -1.0, 1.0))
        self._state += self.step_size * velocity
        distance = abs(self._state - self.goal)
        terminated = bool(distance < self.tolerance)
        if self.render_mode == "human":
            self.render()
        return self._get_obs(), -distance, terminated, False, {}

    def render(self):
        if self.render_mode not in self.metadata["render_modes"]:
            gym.logger.warn(f'Cannot render with render_mode={self.render_mode!r}: use gym.make(..., render_mode="ansi").')
            return None
        text = "s = (not reset)" if self._state is None else f"s = {self._state:+.3f} (goal {self.goal:+.1f})"
        if self.render_mode == "ansi":
            return text
        print(text)
        return None
