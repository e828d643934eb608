"""
The two-state, two-action MDP of the design documents' worked example of Generalized Advantage Estimation.

Source: the GAE worked example of the project's source documents: ``s1 --a1--> s2`` with reward 1,
``s2 --a2--> s1`` with reward 0; with gamma = 0.9, lambda = 0.5 and V = 0, the trajectory s1, a1, r=1, s2, a2, r=0
has A(s1, a1) = 1 (Schulman et al. 2016, https://arxiv.org/abs/1506.02438, eq. 16). The example names only those
two transitions; the other two and the episode end are defined here.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["A1", "A2", "S1", "S2", "TRANSITIONS", "TwoStateMDPEnv"]

#: the states s1 and s2 (the observations)
S1, S2 = 0, 1
#: the actions a1 and a2
A1, A2 = 0, 1
#: (state, action) -> (next state, reward)
TRANSITIONS: dict[tuple[int, int], tuple[int, float]] = {
    (S1, A1): (S2, 1.0),  # the worked example
    (S2, A2): (S1, 0.0),  # the worked example
    (S1, A2): (S1, 0.0),  # defined here: the "wrong" action stays, unrewarded
    (S2, A1): (S2, 0.0),  # defined here
}


class TwoStateMDPEnv(gym.Env[int, int]):
    """
    ## Description
    Two states, two actions, deterministic. Action ``a1`` in ``s1`` moves to ``s2`` and earns 1; action ``a2`` in
    ``s2`` moves back to ``s1`` and earns 0; the two other (state, action) pairs stay where they are and earn 0.
    The optimal policy alternates ``a1, a2, a1, ...``: it is the smallest problem where a reward depends on an
    earlier action (``a2`` earns nothing itself but makes the next 1 possible), which is what GAE's lambda trades off.

    | state | action | next state | reward |
    |-------|--------|------------|--------|
    | s1 (0) | a1 (0) | s2 | 1 |
    | s2 (1) | a2 (1) | s1 | 0 |
    | s1 (0) | a2 (1) | s1 | 0 |
    | s2 (1) | a1 (0) | s2 | 0 |

    The first two rows are the documents' worked example; the last two and the episode end are defined here.

    ## Action Space
    ``Discrete(2)``: 0 is ``a1``, 1 is ``a2``.

    ## Observation Space
    ``Discrete(2)``: 0 is ``s1``, 1 is ``s2``.

    ## Rewards
    1 for ``a1`` in ``s1``, else 0. Over the 10 steps of an episode the optimal return is 5 (undiscounted);
    a uniformly random policy gets 2.75 on average (1/2 at the first step, 1/4 at each later one).

    ## Starting State
    Always ``s1``.

    ## Episode End
    The MDP itself never ends (no termination). The episode is truncated after 10 steps
    (``max_episode_steps`` of ``sb3_textrl/TwoStateMDP-v0``), so SB3 bootstraps the last value.

    ## Arguments
    - ``render_mode``: ``"ansi"`` (returns the state as text) or ``"human"`` (prints it).

    ```python
    >>> import gymnasium as gym
    >>> import sb3_textrl
    >>> env = gym.make("sb3_textrl/TwoStateMDP-v0")
    >>> env.reset(seed=0)
    (0, {})
    >>> env.step(0)[:4]
    (1, 1.0, False, False)

    ```

    ## Version History
    - v0: initial version
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None):
        self.observation_space = spaces.Discrete(2)
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode
        self._state: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = S1
        if self.render_mode == "human":
            self.render()
        return self._state, {}

    def step(self, action: int):
        assert self._state is not None, "Call reset before using step method."
        a = np.asarray(action)
        if a.size != 1 or not np.issubdtype(a.dtype, np.integer) or int(a) not in (A1, A2):
            raise ValueError(f"`action` must be the integer 0 (a1) or 1 (a2), got {action!r}.")
        self._state, reward = TRANSITIONS[(self._state, int(action))]
        if self.render_mode == "human":
            self.render()
        return self._state, reward, False, False, {}

    def render(self):
        if self.render_mode not in self.metadata["render_modes"]:
            gym.logger.warn(f'Cannot render with render_mode={self.render_mode!r}: use gym.make(..., render_mode="ansi").')
            return None
        text = "(not reset)" if self._state is None else f"s{self._state + 1}"
        if self.render_mode == "ansi":
            return text
        print(text)
        return None
