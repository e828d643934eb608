"""Resumable training checkpoints (sb3_textrl.common.training_checkpoints and training_state): atomic saves every N
rollouts, exact resumes, refused mismatches, loading a model whose LM moved, and the CLI's checkpoint flags, SIGINT and
SIGKILL."""

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch as th
from conftest import ENV_ID
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize
from transformers import AutoModelForCausalLM, AutoTokenizer

from sb3_textrl.cli import main
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback, RolloutHistoryCallback
from sb3_textrl.common.kl import AdaptiveKLController
from sb3_textrl.common.training_checkpoints import (
    RESUME_STATE_NAME,
    AtomicCheckpointCallback,
    atomic_write,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    read_resume_state,
)
from sb3_textrl.envs.text_generation import TextGenerationEnv

PROMPTS = ["Write one sentence about rain.", "Hi", "Write a short review of a cafe."]
N_ENVS, N_STEPS = 2, 4  # rollouts of 8 transitions; episodes of up to 5 tokens span rollout boundaries


def make_env(path, seed=0, n_envs=N_ENVS):
    env_kwargs = dict(model_name_or_path=path, prompts=PROMPTS, reward_fn="vader", max_new_tokens=5)
    return make_vec_env(ENV_ID, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)


def make_model(path, seed=0):
    return PPO(
        "LMPolicy",
        make_env(path, seed),
        n_steps=N_STEPS,
        batch_size=8,
        n_epochs=2,
        learning_rate=1e-2,
        seed=seed,
        rollout_buffer_class=EpisodeRolloutBuffer,
    )


def make_callbacks():
    # an adaptive coefficient that moves a lot per rollout, so that a lost KL state would show
    kl = KLPenaltyCallback(AdaptiveKLController(kl_coef=0.1, target=0.01, horizon=4))
    return kl, RolloutHistoryCallback(kl)


def weights(model):
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert th.equal(a[key], b[key]), key


def perturb_rngs():
    random.seed(12345)
    np.random.seed(12345)
    th.manual_seed(12345)


class StopAt(BaseCallback):
    """Ask the checkpoint callback to stop at a given timestep (as the CLI's SIGINT handler does)."""

    def __init__(self, checkpoint, at):
        super().__init__()
        self.checkpoint, self.at = checkpoint, at

    def _on_step(self):
        if self.num_timesteps >= self.at:
            self.checkpoint.request_stop()
        return True


@pytest.fixture(scope="module")
def reference_run(tiny_llama_path, tmp_path_factory):
    """An uninterrupted run of 4 rollouts that writes a checkpoint every 2 rollouts."""
    save_path = str(tmp_path_factory.mktemp("reference") / "checkpoints")
    model = make_model(tiny_llama_path)
    kl, history = make_callbacks()
    checkpoint = AtomicCheckpointCallback(2, save_path, callbacks=[kl, history])
    model.learn(32, callback=CallbackList([kl, history, checkpoint]))
    return dict(save_path=save_path, weights=weights(model), history=history.history, kl_coef=kl.kl_coef, model=model)


def test_checkpoint_every_n_rollouts(reference_run):
    save_path = reference_run["save_path"]
    # rollout boundaries after rollouts 2 and 4 (the end of training), SB3's file names, no temporary file left
    assert sorted(os.listdir(save_path)) == ["rl_model_16_steps.zip", "rl_model_32_steps.zip"]
    assert [steps for steps, _ in list_checkpoints(save_path)] == [16, 32]
    assert latest_checkpoint(save_path).endswith("rl_model_32_steps.zip")
    # a plain SB3 zip with one more member
    with zipfile.ZipFile(os.path.join(save_path, "rl_model_16_steps.zip")) as archive:
        assert {"data", "policy.pth", "policy.optimizer.pth", RESUME_STATE_NAME} <= set(archive.namelist())
    model = PPO.load(os.path.join(save_path, "rl_model_16_steps.zip"))
    assert model.num_timesteps == 16
    state = read_resume_state(os.path.join(save_path, "rl_model_16_steps.zip"))
    assert state["algorithm"] == "stable_baselines3.ppo.ppo:PPO"
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert len(state["env"]["np_random"]) == N_ENVS
    # the episodes in flight match the algorithm's last observation
    for i in range(N_ENVS):
        assert np.array_equal(state["env"]["episodes"]["_input_ids"][i], state["model"]["_last_obs"]["input_ids"][i])
    assert [h["timesteps"] for h in state["callbacks"][1]["history"]] == [8.0, 16.0]
    final = read_resume_state(latest_checkpoint(save_path))
    assert final["callbacks"][0]["controller"]["kl_coef"] == pytest.approx(reference_run["kl_coef"])
    np.testing.assert_equal(final["callbacks"][1]["history"], reference_run["history"])  # NaN == NaN


@pytest.mark.parametrize("how", ["checkpoint", "interrupted"])
def test_resume_is_exact(reference_run, tiny_llama_path, tmp_path, how):
    """Resuming gives the weights, history and KL coefficient of the uninterrupted run, bit for bit (CPU)."""
    if how == "checkpoint":
        path = os.path.join(reference_run["save_path"], "rl_model_16_steps.zip")
    else:  # stop in the middle of rollout 3, as on SIGINT: the checkpoint is the boundary before it
        model = make_model(tiny_llama_path)
        kl, history = make_callbacks()
        checkpoint = AtomicCheckpointCallback(0, str(tmp_path), callbacks=[kl, history])
        model.learn(32, callback=CallbackList([kl, history, StopAt(checkpoint, 20), checkpoint]))
        assert checkpoint.stopped and model.num_timesteps == 20
        assert os.listdir(tmp_path) == []  # save_freq=0: nothing written until asked
        path = checkpoint.save_last_boundary()
        assert path.endswith("rl_model_16_steps.zip")
        assert PPO.load(path).num_timesteps == 16

    perturb_rngs()  # the checkpoint restores every stream
    kl, history = make_callbacks()
    env = make_env(tiny_llama_path, seed=99)  # another seed: the envs' RNGs and episodes come from the checkpoint
    model, extra = load_checkpoint(path, env=env, callbacks=[kl, history])
    assert extra == {}
    assert model.num_timesteps == 16 and len(history.history) == 2
    model.learn(32 - model.num_timesteps, callback=CallbackList([kl, history]), reset_num_timesteps=False)
    assert model.num_timesteps == 32
    np.testing.assert_equal(history.history, reference_run["history"])
    assert kl.kl_coef == reference_run["kl_coef"]
    assert_same_weights(weights(model), reference_run["weights"])


def test_resume_refuses_mismatches(reference_run, tiny_llama_path):
    """Another number of envs, other callbacks or another KL controller than the checkpointed run's are refused."""
    kl, history = make_callbacks()
    path = os.path.join(reference_run["save_path"], "rl_model_16_steps.zip")
    with pytest.raises(ValueError, match="n_envs=2"):
        load_checkpoint(path, env=make_env(tiny_llama_path, n_envs=3), callbacks=[kl, history])
    with pytest.raises(ValueError, match="callbacks"):
        load_checkpoint(path, env=make_env(tiny_llama_path), callbacks=[kl])
    with pytest.raises(ValueError, match="same KL settings"):
        load_checkpoint(path, env=make_env(tiny_llama_path), callbacks=[KLPenaltyCallback(0.1), history])


def test_episode_state_attrs_cover_the_episode(tiny_llama_path):
    """Every attribute that a step changes is listed in `episode_state_attrs`, so checkpoints resume mid-episode."""
    env = TextGenerationEnv(tiny_llama_path, PROMPTS, reward_fn="vader", max_new_tokens=5)
    plain = (int, float, bool, str, list, tuple, np.ndarray, type(None))

    def state():
        return {k: copy.deepcopy(v) for k, v in vars(env).items() if isinstance(v, plain)}

    before = state()
    env.reset(seed=0)
    env.step(100)
    env.step(101)
    after = state()

    def same(a, b):
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
        return a == b

    changed = {k for k in after.keys() | before.keys() if not same(after.get(k), before.get(k))}
    assert changed - {"_np_random_seed"} <= set(env.episode_state_attrs)
    assert {"_generated", "_input_ids", "_prompt_index"} <= changed


def test_keep_last_and_stale_temporary_files(tiny_llama_path, tmp_path):
    stale = tmp_path / ".tmp-999999-rl_model_8_steps.zip"
    stale.write_bytes(b"partial")
    model = make_model(tiny_llama_path)
    checkpoint = AtomicCheckpointCallback(1, str(tmp_path), keep_last=2, name_prefix="rl_model")
    model.learn(32, callback=checkpoint)
    assert sorted(os.listdir(tmp_path)) == ["rl_model_24_steps.zip", "rl_model_32_steps.zip"]
    assert checkpoint.last_checkpoint.endswith("rl_model_32_steps.zip")


def test_vecnormalize_statistics(tiny_llama_path, tmp_path):
    env = VecNormalize(make_env(tiny_llama_path), norm_obs=False, norm_reward=True)
    model = PPO("LMPolicy", env, n_steps=N_STEPS, batch_size=8, n_epochs=1, seed=0)
    model.learn(16, callback=AtomicCheckpointCallback(2, str(tmp_path), save_vecnormalize=True))
    assert sorted(os.listdir(tmp_path)) == ["rl_model_16_steps.zip", "rl_model_vecnormalize_16_steps.pkl"]
    loaded = VecNormalize.load(str(tmp_path / "rl_model_vecnormalize_16_steps.pkl"), make_env(tiny_llama_path))
    assert loaded.ret_rms.count == env.ret_rms.count


def test_diverged_weights_are_not_checkpointed(tiny_llama_path, tmp_path):
    model = make_model(tiny_llama_path)
    checkpoint = AtomicCheckpointCallback(0, str(tmp_path))
    model.learn(8, callback=checkpoint)
    with th.no_grad():
        model.policy.value_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="num_timesteps=8"):
        checkpoint.save_last_boundary()
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "model.zip")
    atomic_write(path, lambda p: open(p, "wb").write(b"old"))

    def crash(p):
        with open(p, "wb") as f:
            f.write(b"half a new fi")
        raise KeyboardInterrupt  # e.g. killed mid-save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["model.zip"]


def test_bad_arguments(tiny_llama_path, tmp_path):
    with pytest.raises(ValueError, match="save_freq"):
        AtomicCheckpointCallback(-1, str(tmp_path))
    with pytest.raises(ValueError, match="keep_last"):
        AtomicCheckpointCallback(1, str(tmp_path), keep_last=0)

    class Opaque(BaseCallback):
        def _on_step(self):
            return True

    with pytest.raises(ValueError, match="state_dict"):
        AtomicCheckpointCallback(1, str(tmp_path), callbacks=[Opaque()])
    plain = str(tmp_path / "plain.zip")
    make_model(tiny_llama_path).save(plain)
    with pytest.raises(ValueError, match="plain SB3 zip"):
        load_checkpoint(plain)
    with pytest.raises(ValueError, match="not a model saved by SB3"):
        load_model(__file__)


def test_saved_model_whose_lm_moved(tiny_llama_path, tiny_gpt2_path, tmp_path):
    """Loading a model whose LM cannot be found names `model_name_or_path` and how to point to the new location."""
    lm = str(tmp_path / "lm")
    shutil.copytree(tiny_llama_path, lm)
    model = PPO("LMPolicy", make_env(lm), n_steps=N_STEPS, batch_size=8, seed=0)
    model.learn(8)
    saved = str(tmp_path / "model.zip")
    model.save(saved)
    shutil.rmtree(lm)
    with pytest.raises(ValueError, match=re.escape(f"`model_name_or_path={lm!r}`")) as error:
        PPO.load(saved)  # stock SB3 load: the message comes from the loader
    assert "load_model(path, model_name_or_path=NEW_LOCATION)" in str(error.value)
    with pytest.raises(ValueError, match="trained with the LM `model_name_or_path=") as error:
        load_model(saved)
    assert "--model NEW_LOCATION --resume" in str(error.value)
    moved = load_model(saved, model_name_or_path=tiny_llama_path, env=make_env(tiny_llama_path))
    assert moved.policy.model_name_or_path == tiny_llama_path
    assert moved.observation_space.model_name_or_path == tiny_llama_path
    assert_same_weights(weights(moved), weights(model))
    # an LM with another tokenizer: refused before any weight is loaded
    with pytest.raises(ValueError, match="tokenizers differ"):
        load_model(saved, model_name_or_path=tiny_gpt2_path)
    # the same tokenizer but another architecture: the saved weights do not fit it
    other_architecture = str(tmp_path / "gpt2_with_llama_tokenizer")
    AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).save_pretrained(other_architecture)
    AutoTokenizer.from_pretrained(tiny_llama_path).save_pretrained(other_architecture)
    with pytest.raises(ValueError, match="do not fit"):
        load_model(saved, model_name_or_path=other_architecture)


# --- the CLI ------------------------------------------------------------------------------------------------------------


def cli_args(model_path, output_dir, prompts_file, total=64, *extra):
    return [
        "train",
        "--model",
        model_path,
        "--algo",
        "ppo",
        "--prompts",
        prompts_file,
        "--eval-prompts",
        prompts_file,
        "--total-timesteps",
        str(total),
        "--n-envs",
        "2",
        "--n-steps",
        "8",
        "--batch-size",
        "16",
        "--max-new-tokens",
        "6",
        "--no-whole-episodes",  # episodes of up to 6 tokens in flight across rollouts of 8 steps: resumed mid-episode
        "--eval-samples",
        "1",
        "--learning-rate",
        "1e-2",
        "--kl-target",
        "0.05",
        "--kl-horizon",
        "8",
        "--no-progress-bar",
        "--output-dir",
        str(output_dir),
        *extra,
    ]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return str(path)


def test_resume_needs_a_checkpoint(tiny_llama_path, tmp_path, prompts_file, capsys):
    assert main([*cli_args(tiny_llama_path, tmp_path / "run", prompts_file), "--resume"]) == 2
    assert "`--resume`: no checkpoint" in capsys.readouterr().err
    assert main([*cli_args(tiny_llama_path, tmp_path / "run", prompts_file), "--checkpoint-every", "-1"]) == 2
    assert "`--checkpoint-every`" in capsys.readouterr().err


def test_sigint_saves_a_checkpoint_and_resume_is_exact(tiny_llama_path, tmp_path, prompts_file, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert main(cli_args(tiny_llama_path, reference, prompts_file)) == 0
    assert not os.path.exists(reference / "checkpoints")  # --checkpoint-every defaults to 0

    # SIGINT during rollout 3: the run stops at the next step and writes the checkpoint of the boundary before it
    original = RolloutHistoryCallback._on_rollout_end

    def on_rollout_end(self):
        original(self)
        if len(self.history) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RolloutHistoryCallback, "_on_rollout_end", on_rollout_end)
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    assert main(cli_args(tiny_llama_path, run, prompts_file)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err
    assert signal.getsignal(signal.SIGINT) is handler  # the CLI put the handler back
    assert os.listdir(run / "checkpoints") == ["rl_model_32_steps.zip"]
    assert not os.path.exists(run / "model.zip")
    monkeypatch.undo()

    # a new run into the same folder, or a resume with other arguments, is refused before loading anything
    assert main(cli_args(tiny_llama_path, run, prompts_file)) == 2
    assert "--resume" in capsys.readouterr().err
    changed = cli_args(tiny_llama_path, run, prompts_file)
    changed[changed.index("--n-envs") + 1] = "4"
    assert main([*changed, "--resume"]) == 2
    assert "`--n-envs` was 2" in capsys.readouterr().err

    assert main([*cli_args(tiny_llama_path, run, prompts_file), "--resume"]) == 0
    with open(run / "results.json", encoding="utf-8") as f:
        resumed = json.load(f)
    with open(reference / "results.json", encoding="utf-8") as f:
        expected = json.load(f)
    assert resumed["resumed_from"].endswith("rl_model_32_steps.zip")
    assert [h["timesteps"] for h in resumed["history"]] == [16.0, 32.0, 48.0, 64.0]
    np.testing.assert_equal(resumed["history"], expected["history"])  # same scores, KL and adaptive coefficients
    assert resumed["before"] == expected["before"] and resumed["after"] == expected["after"]
    assert_same_weights(weights(PPO.load(run / "model.zip")), weights(PPO.load(reference / "model.zip")))


def test_cli_divergence_names_the_step(tiny_llama_path, tmp_path, prompts_file, monkeypatch, capsys):
    """NaN weights after rollout 2: the CLI fails with the step and the last checkpoint, nothing was sampled from NaN."""
    original = RolloutHistoryCallback._on_rollout_end

    def on_rollout_end(self):
        original(self)
        if len(self.history) == 2:
            with th.no_grad():
                self.model.policy.lm.get_output_embeddings().weight.fill_(float("nan"))

    monkeypatch.setattr(RolloutHistoryCallback, "_on_rollout_end", on_rollout_end)
    run = tmp_path / "run"
    assert main([*cli_args(tiny_llama_path, run, prompts_file), "--checkpoint-every", "1"]) == 1
    err = capsys.readouterr().err
    assert "Training diverged at num_timesteps=32" in err and "NaN or infinite" in err
    assert f"Last checkpoint: {run / 'checkpoints' / 'rl_model_16_steps.zip'}" in err
    assert os.listdir(run / "checkpoints") == ["rl_model_16_steps.zip"]


def test_sigkill_then_resume(tiny_llama_path, tmp_path, prompts_file):
    """A training process killed with SIGKILL resumes from its last checkpoint: at most one rollout is lost."""
    run = tmp_path / "run"
    total, rollout = 320, 16
    argv = [sys.executable, "-m", "sb3_textrl", *cli_args(tiny_llama_path, run, prompts_file, total), "--verbose", "1"]
    argv += ["--checkpoint-every", "1", "--keep-checkpoints", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while latest_checkpoint(str(run / "checkpoints")) is None and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # let it get into a later rollout, or the middle of a save
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, log.read_text()
    checkpoint = latest_checkpoint(str(run / "checkpoints"))
    assert checkpoint is not None
    saved_steps = read_resume_state(checkpoint)["model"]["num_timesteps"]
    # the killed process's progress: SB3 prints `total_timesteps` after each rollout
    reached = max(int(n) for n in re.findall(r"total_timesteps\s*\|\s*(\d+)", log.read_text()))
    assert saved_steps < total and reached - saved_steps <= rollout, (reached, saved_steps)

    resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at {saved_steps} timesteps" in resumed.stdout
    with open(run / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert [h["timesteps"] for h in results["history"]] == [float(t) for t in range(rollout, total + 1, rollout)]
    model = PPO.load(run / "model.zip")
    assert model.num_timesteps == total
    assert not [name for name in os.listdir(run / "checkpoints") if name.startswith(".tmp")]
