import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch as th
from stable_baselines3 import A2C, PPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from sb3_textrl import GRPO, REINFORCE, RLOO
from sb3_textrl.cli import build_parser, main
from sb3_textrl.envs.prompts import packaged_prompts, read_prompts


def test_train_help():
    result = subprocess.run(
        [sys.executable, "-m", "sb3_textrl", "train", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--total-timesteps", "--max-new-tokens", "--kl-coef", "--output-dir", "--seed", "--model", "--n-envs"):
        assert flag in result.stdout
    assert "smollm2-135m-instruct" in result.stdout  # defaults are shown


def test_parser_defaults():
    args = build_parser().parse_args(["train"])
    assert args.model == "smollm2-135m-instruct"
    assert args.kl_coef == 0.05 and args.seed == 0 and args.reward == "vader"
    assert len(read_prompts(args.prompts, "--prompts")) == 48
    assert len(read_prompts(args.eval_prompts, "--eval-prompts")) == 24
    assert os.path.isfile(packaged_prompts("prompts_train.txt"))
    with pytest.raises(SystemExit) as error:
        build_parser().parse_args([])  # a command is required
    assert error.value.code != 0


def test_train_end_to_end(tiny_llama_path, tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = [
        "train",
        "--model",
        tiny_llama_path,
        "--algo",
        "ppo",
        "--total-timesteps",
        "64",
        "--n-envs",
        "2",
        "--n-steps",
        "16",
        "--batch-size",
        "16",
        "--max-new-tokens",
        "4",
        "--eval-samples",
        "1",
        "--learning-rate",
        "1e-3",
        "--no-progress-bar",
        "--output-dir",
        str(output_dir),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Held-out prompts: 24" in out
    assert "before" in out and "after" in out
    assert "| mean reward (greedy)" in out and "| KL to reference (nats)" in out
    assert "2 PPO iterations" in out

    assert sorted(os.listdir(output_dir)) == ["curves.png", "eval", "model.zip", "pretrained", "results.json"]
    with open(output_dir / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(output_dir / "curves.png") > 5000

    with open(output_dir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    for key in ("before", "after"):
        assert set(results[key]) >= {"reward_greedy", "reward_sampled", "kl", "samples"}
        assert -1.0 <= results[key]["reward_greedy"] <= 1.0  # VADER compound scores
        assert len(results[key]["samples"]) == 24
    assert abs(results["before"]["kl"]) < 1e-4  # before training the policy is the reference model
    assert results["eval_protocol"] == results["before"]["protocol"] == results["after"]["protocol"]
    assert results["eval_protocol"]["n_samples"] == 1 and results["eval_protocol"]["seed"] == 0
    before, after = results["before"]["reward_sampled_per_prompt"], results["after"]["reward_sampled_per_prompt"]
    per_prompt = [a - b for a, b in zip(after, before)]
    assert results["change"]["reward_sampled"] == pytest.approx(sum(per_prompt) / len(per_prompt))
    assert "Change of the sampled reward:" in out
    assert results["iterations"] == 2 == len(results["history"])
    assert [h["timesteps"] for h in results["history"]] == [32.0, 64.0]
    assert results["args"]["total_timesteps"] == 64 and results["args"]["model"] == tiny_llama_path

    model = PPO.load(output_dir / "model.zip")
    assert model.num_timesteps == 64
    lm = AutoModelForCausalLM.from_pretrained(output_dir / "pretrained").eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "pretrained")
    assert tokenizer.chat_template is not None
    ids = th.as_tensor([tokenizer("Write one sentence about rain.")["input_ids"]])
    with th.no_grad():
        th.testing.assert_close(lm(input_ids=ids).logits, model.policy.lm(input_ids=ids).logits, atol=1e-6, rtol=0)
    # the saved policy holds the initial LM as its reference model
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    for p, q in zip(model.policy.reference_model.parameters(), initial.parameters()):
        assert th.equal(p, q)


def test_train_errors(tiny_llama_path, tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model_name_or_path" in err

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert main(["train", "--model", tiny_llama_path, "--prompts", str(empty), "--output-dir", str(tmp_path / "out")]) == 2
    assert "--prompts" in capsys.readouterr().err
    missing = str(tmp_path / "nope.txt")
    assert main(["train", "--model", tiny_llama_path, "--eval-prompts", missing, "--output-dir", str(tmp_path)]) == 2
    assert "--eval-prompts" in capsys.readouterr().err


def test_train_evaluates_during_training(tiny_llama_path, tmp_path, capsys):
    """--eval-every N runs LMEvalCallback every N rollouts: results.json and OUTPUT_DIR/eval get its results."""
    out = tmp_path / "run"
    code = main(
        ["train", "--model", tiny_llama_path, "--algo", "ppo", "--total-timesteps", "96", "--n-envs", "2", "--n-steps",
         "16", "--batch-size", "16", "--max-new-tokens", "4", "--eval-samples", "1", "--eval-every", "1",
         "--no-progress-bar", "--output-dir", str(out)]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [e["timesteps"] for e in results["evaluations"]] == [0.0, 32.0, 64.0, 96.0]  # from the before point on
    assert results["evaluations"][0]["reward_sampled"] == results["before"]["reward_sampled"]  # not evaluated twice
    assert (out / "eval" / "eval_curves.png").is_file() and (out / "eval" / "samples.md").is_file()
    assert main(["train", "--model", tiny_llama_path, "--eval-every", "-1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--eval-every" in capsys.readouterr().err


def tiny_run_argv(model_path, output_dir, *args):
    """``sb3-textrl train`` on the tiny LM: 2 envs x 4 new tokens, 16 tokens in all (2 rollouts), one sampled
    completion per held-out prompt before and after training, none during."""
    return [
        "train", "--model", model_path, "--algo", "ppo", "--total-timesteps", "16", "--n-envs", "2", "--max-new-tokens", "4",
        "--batch-size", "8", "--eval-samples", "1", "--eval-every", "0", "--learning-rate", "1e-3", "--no-progress-bar",
        "--output-dir", str(output_dir), *args,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "algo, args",
    [
        ("grpo", ["--group-size", "2", "--beta", "0.05", "--clip-range-high", "0.28"]),
        ("rloo", ["--group-size", "2"]),
        ("reinforce", []),
        ("a2c", []),
    ],
)
def test_train_each_algo(tiny_llama_path, tmp_path, capsys, algo, args):
    """--algo trains that algorithm end to end (GRPO and RLOO on groups of 2 completions per prompt), with the KL
    penalty, the before/after evaluation and every output; results.json records the algorithm."""
    out = tmp_path / "run"
    assert main(tiny_run_argv(tiny_llama_path, out, "--algo", algo, *args)) == 0
    stdout = capsys.readouterr().out
    assert "| KL to reference (nats)" in stdout and f" {algo.upper()} iterations in " in stdout
    assert sorted(os.listdir(out)) == ["curves.png", "model.zip", "pretrained", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["algo"] == algo and results["iterations"] == len(results["history"]) >= 2
    assert all(np.isfinite(h["kl"]) for h in results["history"])  # the KL penalty callback ran each rollout
    algorithm = {"grpo": GRPO, "rloo": RLOO, "reinforce": REINFORCE, "a2c": A2C}[algo]
    model = algorithm.load(out / "model.zip", device="cpu")
    assert type(model) is algorithm and model.num_timesteps >= 16 and model.n_steps == 4
    if algo == "grpo":
        assert model.beta == 0.05 and model.clip_range_high(1.0) == 0.28 and model.n_epochs == 2


def test_train_group_algo_resumes(tiny_llama_path, tmp_path, capsys):
    """A GRPO run resumed from its checkpoint after 2 rounds ends with the weights of an uninterrupted run: the same
    prompts in round 3 (the checkpoint keeps the draws), the same samples; --algo must stay the checkpointed run's."""

    def with_budget(argv, total_timesteps):
        argv = list(argv)
        argv[argv.index("--total-timesteps") + 1] = str(total_timesteps)
        return argv

    argv = tiny_run_argv(tiny_llama_path, tmp_path / "whole", "--algo", "grpo", "--group-size", "2")
    assert main(with_budget(argv, 24)) == 0
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "resumed")
    assert main([*with_budget(argv, 16), "--checkpoint-every", "1"]) == 0
    assert main([*with_budget(argv, 24), "--algo", "rloo", "--resume"]) == 2
    assert "`--algo` was 'grpo' in the checkpointed run, got 'rloo'" in capsys.readouterr().err
    assert main([*with_budget(argv, 24), "--resume"]) == 0
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["resumed_from"].endswith("_16_steps.zip") and results["args"]["algo"] == "grpo"
    whole, resumed = (GRPO.load(tmp_path / name / "model.zip", device="cpu") for name in ("whole", "resumed"))
    assert whole.num_timesteps == resumed.num_timesteps == 24
    for a, b in zip(whole.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert th.equal(a, b)


@pytest.mark.parametrize(
    "args, flags",
    [
        (["--algo", "grpo", "--n-envs", "6"], ["--group-size", "--n-envs"]),
        (["--algo", "grpo", "--group-size", "1"], ["--group-size"]),
        (["--algo", "rloo", "--group-size", "2", "--n-envs", "3"], ["--n-envs", "--group-size"]),
        (
            ["--algo", "grpo", "--group-size", "2", "--n-steps", "2", "--max-new-tokens", "4"],
            ["--n-steps", "--max-new-tokens"],
        ),
        (["--algo", "reinforce", "--group-size", "2"], ["--group-size"]),
    ],
)
def test_train_algo_errors(tmp_path, capsys, args, flags):
    """Bad --algo/--group-size combinations exit with status 2 before any model is loaded, naming the flags."""
    assert main(["train", "--model", str(tmp_path / "never-loaded"), "--output-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `") and all(f"`{flag}`" in err for flag in flags), err
    assert not (tmp_path / "out").exists()
