"""The README's usage example, shortened: stock PPO fine-tunes SmolLM2-135M-Instruct toward positive sentiment (VADER)
on rounds of whole episodes, then completes one prompt greedily."""

import gymnasium as gym
from stable_baselines3 import PPO

import sb3_textrl
from sb3_textrl import EpisodeRolloutBuffer, make_text_vec_env

env_kwargs = dict(
    model_name_or_path="smollm2-135m-instruct",  # or a save_pretrained directory, or a .gguf file
    prompts=["Write one sentence about rain.", "Write a short review of a cafe."],
    reward_fn="vader",  # or any callable (prompts, completions) -> list[float]
    max_new_tokens=16,
)
env = make_text_vec_env(n_envs=4, seed=0, whole_episodes=True, env_kwargs=env_kwargs)
model = PPO("LMPolicy", env, n_steps=16, batch_size=64, learning_rate=2e-5, rollout_buffer_class=EpisodeRolloutBuffer)
model.learn(total_timesteps=128, callback=sb3_textrl.KLPenaltyCallback(kl_coef=0.05), progress_bar=True)

demo = gym.make("sb3_textrl/TextGeneration-v0", **env_kwargs)
obs, _ = demo.reset(seed=0)
done = False
while not done:
    action, _ = model.predict(obs, deterministic=True)
    obs, reward, done, _, info = demo.step(action)
print(info["prompt"], "->", info["completion"], f"(score {reward:+.2f})")
