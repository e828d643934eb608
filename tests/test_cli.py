import json
import os
import subprocess
import sys

import pytest
import torch as th
from stable_baselines3 import PPO
from transformers import AutoModelForCausalLM, AutoTokenizer

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

    assert sorted(os.listdir(output_dir)) == ["curves.png", "model.zip", "pretrained", "results.json"]
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
        ["train", "--model", tiny_llama_path, "--total-timesteps", "96", "--n-envs", "2", "--n-steps", "16",
         "--batch-size", "16", "--max-new-tokens", "4", "--eval-samples", "1", "--eval-every", "1",
         "--no-progress-bar", "--output-dir", str(out)]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [e["timesteps"] for e in results["evaluations"]] == [32.0, 64.0, 96.0]
    assert (out / "eval" / "eval_curves.png").is_file() and (out / "eval" / "samples.md").is_file()
    assert main(["train", "--model", tiny_llama_path, "--eval-every", "-1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--eval-every" in capsys.readouterr().err
