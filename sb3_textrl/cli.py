"""Command line: ``sb3-textrl train`` (also ``python -m sb3_textrl train``), the RLHF main job with stock PPO."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.env_util import make_vec_env

import sb3_textrl  # noqa: F401  (registers the env and the "LMPolicy" alias)
from sb3_textrl.buffers import EpisodeRolloutBuffer
from sb3_textrl.callbacks import KLPenaltyCallback, RolloutHistoryCallback
from sb3_textrl.evaluation import EvaluationResult, evaluate_prompts
from sb3_textrl.kl import AdaptiveKLController
from sb3_textrl.plotting import plot_rollout_history


def packaged_prompts(name: str) -> str:
    """Path of a prompt file shipped with the package (``prompts_train.txt``, ``prompts_eval.txt``)."""
    return str(resources.files("sb3_textrl") / "data" / name)


def read_prompts(path: str, argument: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise ValueError(f"`{argument}`: no such file {path!r}; give a text file with one prompt per line.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"`{argument}`: {path!r} holds no prompts; give a text file with one prompt per line.")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sb3-textrl", description="Fine-tune causal LMs with Stable-Baselines3.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="fine-tune an LM with stock PPO, a reward function and a KL penalty (RLHF main job)",
        description="PPO('LMPolicy') on sb3_textrl/TextGeneration-v0 with a KL penalty to the reference model; "
        "prints a before/after table on held-out prompts and saves the model, an export and a PNG of the curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--model", default="smollm2-135m-instruct", help="LM alias, .gguf file or save_pretrained directory")
    train.add_argument("--prompts", default=packaged_prompts("prompts_train.txt"), help="training prompts, one per line")
    train.add_argument("--eval-prompts", default=packaged_prompts("prompts_eval.txt"), help="held-out prompts, one per line")
    train.add_argument("--reward", default="vader", help="reward function name")
    train.add_argument("--total-timesteps", type=int, default=9_216, help="PPO budget in generated tokens (env steps)")
    train.add_argument("--max-new-tokens", type=int, default=24, help="completion length limit (tokens)")
    train.add_argument("--n-envs", type=int, default=16, help="parallel environments (completions per rollout step)")
    train.add_argument(
        "--n-steps", type=int, default=None, help="steps per environment per rollout (default: --max-new-tokens)"
    )
    train.add_argument("--batch-size", type=int, default=192, help="PPO minibatch size in steps (whole episodes)")
    train.add_argument("--n-epochs", type=int, default=2, help="PPO epochs per rollout")
    train.add_argument("--learning-rate", type=float, default=2e-5, help="Adam learning rate")
    train.add_argument("--kl-coef", type=float, default=0.05, help="KL penalty coefficient (0 disables it)")
    train.add_argument(
        "--kl-target",
        type=float,
        default=None,
        help="target KL per completion (nats): adapt the coefficient (Ziegler et al. 2019), starting at --kl-coef",
    )
    train.add_argument("--kl-horizon", type=int, default=10_000, help="horizon (episodes) of the adaptive KL controller")
    train.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1", help="per-token KL estimator")
    train.add_argument("--gamma", type=float, default=1.0, help="discount factor")
    train.add_argument("--gae-lambda", type=float, default=0.95, help="GAE lambda")
    train.add_argument("--clip-range", type=float, default=0.2, help="PPO clip range")
    train.add_argument("--vf-coef", type=float, default=0.1, help="value loss coefficient")
    train.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus coefficient")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient norm clipping")
    train.add_argument("--eval-samples", type=int, default=2, help="sampled completions per held-out prompt")
    train.add_argument("--seed", type=int, default=0, help="random seed")
    train.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    train.add_argument("--output-dir", default="runs/main", help="folder for model.zip, pretrained/, curves.png, results.json")
    train.add_argument("--no-progress-bar", action="store_true", help="hide SB3's progress bar")
    train.add_argument("--verbose", type=int, default=0, help="SB3 verbosity (1 prints the logger's tables)")
    return parser


def format_table(before: EvaluationResult, after: EvaluationResult, n_prompts: int) -> str:
    lines = [
        f"Held-out prompts: {n_prompts}",
        f"| {'':<24} | {'before':>8} | {'after':>8} |",
        f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|",
        f"| {'mean reward (greedy)':<24} | {before.reward_greedy:>+8.3f} | {after.reward_greedy:>+8.3f} |",
        f"| {'mean reward (sampled)':<24} | {before.reward_sampled:>+8.3f} | {after.reward_sampled:>+8.3f} |",
        f"| {'KL to reference (nats)':<24} | {before.kl:>8.3f} | {after.kl:>8.3f} |",
        "",
        "Sample completions (greedy):",
    ]
    for b, a in list(zip(before.samples, after.samples))[:3]:
        lines += [
            f"  prompt: {b['prompt']}",
            f"    before [{b['greedy_score']:+.2f}]: {str(b['greedy']).strip()!r}",
            f"    after  [{a['greedy_score']:+.2f}]: {str(a['greedy']).strip()!r}",
        ]
    return "\n".join(lines)


def train(args: argparse.Namespace) -> dict:
    """Run the main job; returns what it wrote to ``results.json``."""
    started = time.time()
    train_prompts = read_prompts(args.prompts, "--prompts")
    eval_prompts = read_prompts(args.eval_prompts, "--eval-prompts")
    os.makedirs(args.output_dir, exist_ok=True)
    env_kwargs = dict(
        model_name_or_path=args.model,
        prompts=train_prompts,
        reward_fn=args.reward,
        max_new_tokens=args.max_new_tokens,
        render_mode=None,
    )
    env = make_vec_env("sb3_textrl/TextGeneration-v0", n_envs=args.n_envs, seed=args.seed, env_kwargs=env_kwargs)
    model = PPO(
        "LMPolicy",
        env,
        learning_rate=args.learning_rate,
        n_steps=args.n_steps or args.max_new_tokens,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        gamma=args.gamma,
        gae_lambda=args.gae_lambda,
        clip_range=args.clip_range,
        vf_coef=args.vf_coef,
        ent_coef=args.ent_coef,
        max_grad_norm=args.max_grad_norm,
        rollout_buffer_class=EpisodeRolloutBuffer,
        seed=args.seed,
        device=args.device,
        verbose=args.verbose,
    )
    evaluate = dict(reward_fn=args.reward, max_new_tokens=args.max_new_tokens, n_samples=args.eval_samples)
    print(f"Model loaded in {time.time() - started:.0f} s; evaluating {len(eval_prompts)} held-out prompts ...", flush=True)
    before = evaluate_prompts(model.policy, eval_prompts, **evaluate)

    kl_coef = args.kl_coef
    if args.kl_target is not None:
        kl_coef = AdaptiveKLController(kl_coef=args.kl_coef, target=args.kl_target, horizon=args.kl_horizon)
    kl_callback = KLPenaltyCallback(kl_coef=kl_coef, estimator=args.kl_estimator)
    history = RolloutHistoryCallback(kl_callback)
    train_started = time.time()
    model.learn(args.total_timesteps, callback=CallbackList([kl_callback, history]), progress_bar=not args.no_progress_bar)
    train_seconds = time.time() - train_started

    after = evaluate_prompts(model.policy, eval_prompts, **evaluate)
    print(format_table(before, after, len(eval_prompts)), flush=True)

    curves = plot_rollout_history(history.history, os.path.join(args.output_dir, "curves.png"), f"PPO on {args.model}")
    model_path = os.path.join(args.output_dir, "model.zip")
    partial = os.path.join(args.output_dir, "model.partial.zip")
    model.save(partial)
    os.replace(partial, model_path)  # atomic: a crash mid-save never leaves a broken model.zip
    export_dir = os.path.join(args.output_dir, "pretrained")
    model.policy.save_pretrained(export_dir)
    results = {
        "args": vars(args),
        "before": before.__dict__,
        "after": after.__dict__,
        "history": history.history,
        "iterations": len(history.history),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - started,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    print(
        f"\n{len(history.history)} PPO iterations in {train_seconds:.0f} s (total {results['total_seconds']:.0f} s).\n"
        f"Wrote {model_path}, {export_dir}/, {curves} and results.json.",
        flush=True,
    )
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gym.logger.min_level = 40  # hide gymnasium's passive-checker chatter in the console
    try:
        if args.command == "train":
            train(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
