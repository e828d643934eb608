"""The README's usage example: stock PPO fine-tunes SmolLM2-135M-Instruct toward positive sentiment (VADER)."""

import gymnasium as gym
from stable_baselines3 import PPO

import sb3_textrl
from sb3_textrl.common.buffers import EpisodeRolloutBuffer

env = gym.make(
    "sb3_textrl/TextGeneration-v0",
    model_name_or_path="smollm2-135m-instruct",  # or a save_pretrained directory, or a .gguf file
    prompts=["Write one sentence about rain.", "Write a short review of a cafe."],
    reward_fn="vader",  # or any callable (prompts, completions) -> list[float]
    max_new_tokens=16,
)
model = PPO("LMPolicy", env, n_steps=64, batch_size=64, learning_rate=2e-5, rollout_buffer_class=EpisodeRolloutBuffer)
model.learn(total_timesteps=128, callback=sb3_textrl.KLPenaltyCallback(kl_coef=0.05), progress_bar=True)
obs, _ = env.reset(seed=0)
done = False
while not done:
    action, _ = model.predict(obs, deterministic=True)
    obs, reward, done, _, info = env.step(action)
print(info["prompt"], "->", info["completion"], f"(score {reward:+.2f})")
