# This file is here just to define MlpPolicy/CnnPolicy/MultiInputPolicy for REINFORCE, as SB3's a2c/policies.py does
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy

MlpPolicy = ActorCriticPolicy
CnnPolicy = ActorCriticCnnPolicy
MultiInputPolicy = MultiInputActorCriticPolicy
