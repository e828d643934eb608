"""Make ``"LMPolicy"`` resolvable by name in SB3 algorithms (SB3 has no plugin entry points)."""

from __future__ import annotations

from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_textrl.policies import LMPolicy

__all__ = ["ALIAS", "add_lm_policy_alias", "register_policy_alias"]

#: the name ``PPO("LMPolicy", env)`` resolves to :class:`~sb3_textrl.policies.CausalLMActorCriticPolicy`
ALIAS = "LMPolicy"


def add_lm_policy_alias(algorithm_class: type[BaseAlgorithm]) -> None:
    """
    Add ``"LMPolicy"`` to ``algorithm_class.policy_aliases`` without leaking it into other classes.

    ``policy_aliases`` may be inherited from a parent class (``OnPolicyAlgorithm`` and ``BaseAlgorithm`` share one
    dict): the class gets its own copy before the alias is added.

    :param algorithm_class: an SB3 algorithm class (``PPO``, ``A2C``...), changed in place
    """
    if "policy_aliases" not in vars(algorithm_class):
        algorithm_class.policy_aliases = dict(algorithm_class.policy_aliases)
    algorithm_class.policy_aliases[ALIAS] = LMPolicy


def register_policy_alias() -> None:
    """Register the alias in PPO, A2C, REINFORCE, GRPO, RLOO and, if sb3-contrib is installed, TRPO (idempotent; importing
    :mod:`sb3_textrl` does it)."""
    from stable_baselines3 import A2C, PPO

    from sb3_textrl.grpo import GRPO
    from sb3_textrl.reinforce import REINFORCE
    from sb3_textrl.rloo import RLOO

    classes: list[type[BaseAlgorithm]] = [PPO, A2C, REINFORCE, GRPO, RLOO]
    try:
        from sb3_contrib import TRPO
    except ImportError:
        pass
    else:
        classes.append(TRPO)
    for algorithm_class in classes:
        add_lm_policy_alias(algorithm_class)
