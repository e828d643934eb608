"""The policy aliases of REINFORCE, as SB3's ``a2c/policies.py`` defines them for A2C (``"LMPolicy"`` is added by
:func:`sb3_textrl.registration.register_policy_alias`)."""

from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy

__all__ = ["CnnPolicy", "MlpPolicy", "MultiInputPolicy"]

MlpPolicy = ActorCriticPolicy
CnnPolicy = ActorCriticCnnPolicy
MultiInputPolicy = MultiInputActorCriticPolicy
