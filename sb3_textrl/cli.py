"""Command line: ``sb3-textrl train`` (also ``python -m sb3_textrl train``), the RLHF main job with stock PPO."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.vec_env import VecEnv

import sb3_textrl  # noqa: F401  (registers the env and the "LMPolicy" alias)
from sb3_textrl import distributed
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback, LMEvalCallback, RolloutHistoryCallback
from sb3_textrl.common.evaluation import EvaluationResult, evaluate_prompts
from sb3_textrl.common.kl import AdaptiveKLController
from sb3_textrl.common.plotting import plot_rollout_history
from sb3_textrl.common.training_checkpoints import (
    AtomicCheckpointCallback,
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    read_resume_state,
)
from sb3_textrl.common.validation import check_lm_setup, check_rollout_size
from sb3_textrl.common.vec_env import make_text_vec_env

# arguments that must not change when a run is resumed (besides the prompts' content)
RESUME_FIXED_ARGS = (
    "reward",
    "reward_kwargs",
    "max_new_tokens",
    "n_envs",
    "n_steps",
    "batch_size",
    "n_epochs",
    "kl_coef",
    "kl_target",
    "kl_horizon",
    "kl_estimator",
    "gamma",
    "gae_lambda",
    "clip_range",
    "vf_coef",
    "ent_coef",
    "max_grad_norm",
    "eval_samples",
    "seed",
    "activation_checkpointing",
)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT; a checkpoint was written."""

    def __init__(self, checkpoint: str, num_timesteps: int):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint
        self.num_timesteps = num_timesteps


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
    train.add_argument("--reward", default="vader", help="reward function name (see sb3_textrl.rewards.REWARD_REGISTRY)")
    train.add_argument(
        "--reward-kwargs",
        type=json.loads,
        default=None,
        help='JSON object of the named reward\'s arguments, e.g. \'{"references": "examples/prompts_with_references.jsonl"}\'',
    )
    train.add_argument("--total-timesteps", type=int, default=7_680, help="PPO budget in generated tokens (env steps)")
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
    train.add_argument(
        "--eval-every",
        type=int,
        default=10,
        help="also evaluate the held-out prompts every N rollouts during training (one sample per prompt; eval/ keys, "
        "OUTPUT_DIR/eval/samples.md and eval_curves.png); 0 disables",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed")
    train.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    train.add_argument("--output-dir", default="runs/main", help="folder for model.zip, pretrained/, curves.png, results.json")
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="write a resumable checkpoint to OUTPUT_DIR/checkpoints every N rollouts (0: only on SIGINT; "
        "default: 0, or the interrupted run's value with --resume)",
    )
    train.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its latest checkpoint (same arguments; --total-timesteps may grow)",
    )
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the gradients and the Adam state across the ranks (FSDP2) instead of keeping a "
        "replica of them on each rank; turns prefix sharing off and writes no checkpoints (docs/distributed.md)",
    )
    train.add_argument(
        "--activation-checkpointing",
        type=int,
        default=0,
        metavar="N",
        help="recompute every N-th decoder layer in the backward pass instead of keeping its activations (less memory, "
        "~10-20%% slower updates at N=1 on a CPU); 0: off",
    )
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


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before any model is loaded."""
    positive = {
        "--total-timesteps": args.total_timesteps,
        "--max-new-tokens": args.max_new_tokens,
        "--n-epochs": args.n_epochs,
        "--eval-samples": args.eval_samples,
        "--keep-checkpoints": args.keep_checkpoints,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    if not args.learning_rate > 0:
        raise ValueError(f"`--learning-rate` must be > 0, got {args.learning_rate}.")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise ValueError(f"`--checkpoint-every` (rollouts) must be >= 0, got {args.checkpoint_every}; 0 saves only on SIGINT.")
    if args.eval_every < 0:
        raise ValueError(f"`--eval-every` (rollouts) must be >= 0, got {args.eval_every}; 0 disables it.")
    if args.activation_checkpointing < 0:
        raise ValueError(
            f"`--activation-checkpointing` (every N-th decoder layer) must be >= 0, got {args.activation_checkpointing}; "
            "0 turns it off."
        )
    if getattr(args, "fsdp", False):
        if not distributed.launched_distributed():
            raise ValueError(
                "`--fsdp` shards the training state across ranks: launch with `torchrun --nproc_per_node N`, N > 1."
            )
        if args.resume or args.checkpoint_every:
            flag = "--resume" if args.resume else "--checkpoint-every"
            raise ValueError(
                f"`{flag}` with `--fsdp`: FSDP mode writes no checkpoints (each rank holds a shard of the Adam state): "
                "drop the flag, or train without --fsdp."
            )
    n_steps = args.n_steps or args.max_new_tokens
    check_rollout_size(n_steps, args.n_envs, args.batch_size, names=("--n-steps", "--n-envs", "--batch-size"))


def check_resume_args(args: argparse.Namespace, saved: dict, train_prompts: list[str], eval_prompts: list[str]) -> None:
    """The resumed run must be the same run: same prompts and training arguments."""
    for name in RESUME_FIXED_ARGS:
        if name in saved["args"] and saved["args"][name] != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"`--resume`: `{flag}` was {saved['args'][name]!r} in the checkpointed run, got {getattr(args, name)!r}: "
                "resume with the same arguments (only --total-timesteps, --learning-rate, --model (if the LM moved), "
                "--device, --checkpoint-every, --keep-checkpoints and the output options may change)."
            )
    for flag, prompts, key in (("--prompts", train_prompts, "prompts"), ("--eval-prompts", eval_prompts, "eval_prompts")):
        if saved[key] != prompts:
            raise ValueError(
                f"`--resume`: the prompts of `{flag}` differ from the checkpointed run's: resume with the same prompt file."
            )


def _stop_on_sigint(checkpoint: AtomicCheckpointCallback | distributed.DistributedCallback) -> Callable[[], None]:
    """
    Make SIGINT ask ``checkpoint`` to stop training at the next step (a second SIGINT interrupts at once).

    :return: a function that puts the previous handler back
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return lambda: None

    def handler(signum, frame):
        checkpoint.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def make_env(args: argparse.Namespace, prompts: list[str], seed: int) -> VecEnv:
    """The main job's ``args.n_envs`` environments over ``prompts``, scored with one reward call per step."""
    env_kwargs = dict(
        model_name_or_path=args.model,
        prompts=prompts,
        reward_fn=args.reward,
        reward_kwargs=args.reward_kwargs,
        max_new_tokens=args.max_new_tokens,
        render_mode=None,
    )
    return make_text_vec_env(n_envs=args.n_envs, seed=seed, env_kwargs=env_kwargs)


def make_model(args: argparse.Namespace, env: VecEnv, **kwargs: Any) -> PPO:
    """
    ``PPO("LMPolicy", env)`` with the main job's hyperparameters from ``args``.

    :param kwargs: more ``PPO`` keywords (``seed``, ``device``, ``verbose``), or ones that replace the main job's
        (``rollout_buffer_class``, ``policy_kwargs``)
    """
    policy_kwargs = dict(activation_checkpointing=args.activation_checkpointing or False)
    if getattr(args, "fsdp", False):  # one forward per minibatch on every rank (see sb3_textrl.distributed.fsdp)
        policy_kwargs["prefix_sharing"] = False
    settings = dict(
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
        policy_kwargs=policy_kwargs,
    )
    return PPO("LMPolicy", env, **{**settings, **kwargs})


def train(args: argparse.Namespace) -> dict:
    """
    Run the main job; returns what it wrote to ``results.json``.

    :raises ValueError: for bad arguments or inputs, before any training where possible
    :raises TrainingInterrupted: on SIGINT during training, after writing a checkpoint
    """
    started = time.time()
    check_args(args)
    # under torchrun with WORLD_SIZE > 1: one replica per rank, gradients averaged, rank 0 evaluates and saves
    parallel = distributed.launched_distributed()
    fsdp = getattr(args, "fsdp", False)  # --fsdp: gradients and Adam state sharded across the ranks
    device = distributed.setup_distributed(args.device) if parallel else args.device
    main_process = distributed.is_main_process()
    seed = distributed.rank_seed(args.seed, args.n_envs)  # args.seed on rank 0
    train_prompts = read_prompts(args.prompts, "--prompts")
    eval_prompts = read_prompts(args.eval_prompts, "--eval-prompts")
    checkpoint_dir = os.path.join(args.output_dir, "checkpoints")
    resume_from = latest_checkpoint(checkpoint_dir)
    if args.resume and resume_from is None:
        raise ValueError(
            f"`--resume`: no checkpoint in {checkpoint_dir!r}. Give the --output-dir of the run to continue, or start a new "
            "run without --resume (--checkpoint-every N writes checkpoints; SIGINT writes one)."
        )
    if not args.resume and resume_from is not None:
        raise ValueError(
            f"`--output-dir` {args.output_dir!r} holds checkpoints of an earlier run ({resume_from}): continue it with "
            "--resume, or choose another --output-dir."
        )
    saved = read_resume_state(resume_from)["extra"] if args.resume else None
    if saved is not None:
        check_resume_args(args, saved, train_prompts, eval_prompts)
        if args.checkpoint_every is None:
            args.checkpoint_every = saved["args"].get("checkpoint_every", 0)
    checkpoint_every = args.checkpoint_every or 0
    kl_coef = args.kl_coef
    if args.kl_target is not None:
        kl_coef = AdaptiveKLController(kl_coef=args.kl_coef, target=args.kl_target, horizon=args.kl_horizon)
    kl_callback = KLPenaltyCallback(kl_coef=kl_coef, estimator=args.kl_estimator)
    history = RolloutHistoryCallback(kl_callback)

    os.makedirs(args.output_dir, exist_ok=True)
    env = make_env(args, train_prompts, seed)
    evaluate = dict(reward_fn=args.reward, reward_kwargs=args.reward_kwargs)
    evaluate.update(max_new_tokens=args.max_new_tokens, n_samples=args.eval_samples)
    if saved is not None:
        model, saved = load_checkpoint(
            resume_from,
            env=env,
            callbacks=[kl_callback, history],
            device=device,
            model_name_or_path=args.model,
            learning_rate=args.learning_rate,  # may be lowered to get past a divergence
        )
        check_lm_setup(model)
        if not main_process:
            distributed.reseed_replica(model, seed + model.num_timesteps)  # the checkpoint holds rank 0's streams
        before = EvaluationResult(**saved["before"])
        print(f"Resuming {resume_from} at {model.num_timesteps} timesteps.", flush=True)
    else:
        model = make_model(args, env, seed=seed, device=device, verbose=args.verbose if main_process else 0)
        check_lm_setup(model)
    sharded = distributed.prepare_model(model, fsdp=fsdp)  # no-op in one process
    if saved is None and main_process:
        print(
            f"Model loaded in {time.time() - started:.0f} s; evaluating {len(eval_prompts)} held-out prompts ...", flush=True
        )
        before = evaluate_prompts(model.policy, eval_prompts, **evaluate)
    elif saved is None:
        before = None  # rank 0 evaluates
    if main_process:
        print(f"Evaluated in {time.time() - started:.0f} s (since start); training ...", flush=True)

    run_args = {name: getattr(args, name) for name in (*RESUME_FIXED_ARGS, "model", "total_timesteps", "learning_rate")}
    run_args["checkpoint_every"] = checkpoint_every
    extra_state = {
        "args": run_args,
        "prompts": train_prompts,
        "eval_prompts": eval_prompts,
        "before": before.__dict__ if before else None,
    }
    checkpoint = AtomicCheckpointCallback(
        checkpoint_every,
        checkpoint_dir,
        callbacks=[kl_callback, history],
        extra_state=extra_state,
        keep_last=args.keep_checkpoints,
    )
    callbacks = [kl_callback, history, checkpoint]
    if parallel:  # all ranks stop together (SIGINT on any); rank 0 alone checkpoints
        sync = distributed.DistributedCallback(kl_callback, history, stop_callback=checkpoint)
        callbacks[2:] = [sync, checkpoint] if main_process else [sync]
    eval_callback = None
    if args.eval_every > 0 and main_process:  # its results restart after a resume (they are not checkpointed)
        eval_kwargs = {**evaluate, "n_samples": 1}
        eval_dir = os.path.join(args.output_dir, "eval")
        eval_callback = LMEvalCallback(eval_prompts, args.eval_every, log_path=eval_dir, **eval_kwargs)
        callbacks.append(eval_callback)
    train_started = time.time()
    restore_sigint = _stop_on_sigint(sync if parallel else checkpoint)
    try:
        model.learn(
            max(0, args.total_timesteps - model.num_timesteps),
            callback=CallbackList(callbacks),
            progress_bar=not args.no_progress_bar and main_process,
            reset_num_timesteps=saved is None,
        )
    except FloatingPointError as error:  # NaN/inf logits or weights: say when, and where to resume from
        last = latest_checkpoint(checkpoint_dir)
        raise FloatingPointError(
            f"Training diverged at num_timesteps={model.num_timesteps}: {error} Last checkpoint: {last or 'none'}."
        ) from error
    finally:
        restore_sigint()
    train_seconds = time.time() - train_started
    stopped = sync.stopped if parallel else checkpoint.stopped
    if stopped and fsdp:
        raise TrainingInterrupted("none (--fsdp writes no checkpoints)", model.num_timesteps)
    if stopped:
        path = checkpoint.save_last_boundary() if main_process else None
        distributed.barrier()
        if path is None:
            raise TrainingInterrupted("(written by rank 0)", model.num_timesteps)
        raise TrainingInterrupted(path, read_resume_state(path)["model"]["num_timesteps"])
    if parallel:
        distributed.check_in_sync(model.policy)
    # FSDP: every rank takes part in gathering the full weights; rank 0 saves them
    full_state = sharded.full_state_dict() if fsdp else None
    if not main_process:
        distributed.barrier()  # while rank 0 evaluates and saves
        return {}

    after = evaluate_prompts(model.policy, eval_prompts, **evaluate)
    print(format_table(before, after, len(eval_prompts)), flush=True)

    curves = plot_rollout_history(history.history, os.path.join(args.output_dir, "curves.png"), f"PPO on {args.model}")
    export_dir = os.path.join(args.output_dir, "pretrained")
    with sharded.as_full_state(full_state) if full_state is not None else contextlib.nullcontext():
        model_path = atomic_write(os.path.join(args.output_dir, "model.zip"), model.save)  # never a broken model.zip
        model.policy.save_pretrained(export_dir)
    results = {
        "args": vars(args),
        "before": before.__dict__,
        "after": after.__dict__,
        "history": history.history,
        "evaluations": eval_callback.results if eval_callback is not None else [],
        "iterations": len(history.history),
        "resumed_from": resume_from if saved is not None else None,
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
    distributed.barrier()
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
    except FloatingPointError as error:  # NaN/inf logits or weights: training diverged
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        print(
            f"interrupted: wrote the checkpoint {stop.checkpoint} ({stop.num_timesteps} timesteps); "
            "continue with the same command plus --resume.",
            file=sys.stderr,
        )
        return 130
    finally:
        distributed.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
