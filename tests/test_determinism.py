"""Same seed, same run on CPU: the same completions and bit-identical weights (see docs/checkpoints.md for GPU limits)."""

import numpy as np
import torch as th
from conftest import ENV_ID
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env

from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback, RolloutHistoryCallback
from sb3_textrl.common.evaluation import evaluate_prompts

PROMPTS = ["Write one sentence about rain.", "Hi", "Write a short review of a cafe.", "The ocean"]


class Completions(BaseCallback):
    """Record every finished episode's prompt and completion, in order."""

    def __init__(self):
        super().__init__()
        self.completions = []

    def _on_step(self):
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done:
                self.completions.append((info["prompt"], info["completion"]))
        return True


def run(path, seed):
    env = make_vec_env(
        ENV_ID,
        n_envs=2,
        seed=seed,
        env_kwargs=dict(model_name_or_path=path, prompts=PROMPTS, reward_fn="vader", max_new_tokens=6),
    )
    model = PPO(
        "LMPolicy",
        env,
        n_steps=6,
        batch_size=6,
        n_epochs=2,
        learning_rate=1e-2,
        seed=seed,
        rollout_buffer_class=EpisodeRolloutBuffer,
    )
    kl = KLPenaltyCallback(0.1)
    history, completions = RolloutHistoryCallback(kl), Completions()
    model.learn(36, callback=CallbackList([kl, history, completions]))
    after = evaluate_prompts(model.policy, PROMPTS[:2], max_new_tokens=6, n_samples=1)
    state = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
    return completions.completions, history.history, after, state


def test_same_seed_same_completions_and_weights(tiny_llama_path):
    completions, history, after, state = run(tiny_llama_path, seed=3)
    completions2, history2, after2, state2 = run(tiny_llama_path, seed=3)
    assert len(completions) >= 6
    assert completions == completions2
    np.testing.assert_equal(history, history2)  # NaN scores compare equal
    np.testing.assert_equal(after.__dict__, after2.__dict__)
    assert state.keys() == state2.keys()
    for key in state:
        assert th.equal(state[key], state2[key]), key
    # and the run depends on the seed: another seed samples other prompts and completions
    completions3, *_ = run(tiny_llama_path, seed=4)
    assert completions3 != completions
