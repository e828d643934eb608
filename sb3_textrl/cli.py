"""Command line: ``sb3-textrl train`` (also ``python -m sb3_textrl train``), the RLHF main job with RLOO (4 completions
per prompt), or with stock PPO or A2C, REINFORCE or GRPO (``--algo``; GRPO and RLOO with ``--group-size G`` completions
per prompt).

The settings and their defaults are :class:`sb3_textrl.config.TrainConfig`'s; this module parses them, runs the job
(:func:`train`) and reports. Only ``sb3_textrl.__main__`` imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv

import sb3_textrl  # noqa: F401  (registers the env and the "LMPolicy" alias)
from sb3_textrl import distributed
from sb3_textrl.common.callbacks import LMEvalCallback, RolloutHistoryCallback
from sb3_textrl.common.evaluation import EvaluationResult, evaluate_prompts, paired_difference
from sb3_textrl.common.group_vec_env import GroupedVecEnv
from sb3_textrl.common.plotting import plot_rollout_history
from sb3_textrl.common.training_checkpoints import (
    AtomicCheckpointCallback,
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    read_resume_state,
)
from sb3_textrl.common.validation import check_lm_setup
from sb3_textrl.config import (
    RESUME_FIXED_ARGS,
    TrainConfig,
    add_arguments,
    check_resume_args,
)
from sb3_textrl.envs.prompts import read_prompts
from sb3_textrl.main_job import make_env, make_kl_callback, make_model

__all__ = ["TrainingInterrupted", "build_parser", "format_table", "main", "train"]


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT; a checkpoint was written."""

    def __init__(self, checkpoint: str, num_timesteps: int):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint
        self.num_timesteps = num_timesteps


@dataclasses.dataclass
class _Run:
    """What the steps of one run of the main job share: its settings, its process, its prompts and its checkpoints."""

    config: TrainConfig
    started: float  # time.time() when the run started
    device: str
    parallel: bool  # under torchrun with WORLD_SIZE > 1: one replica per rank, rank 0 evaluates and saves
    main_process: bool
    seed: int  # this rank's seed (config.seed on rank 0)
    train_prompts: list[str]
    eval_prompts: list[str]
    checkpoint_dir: str
    resume_from: str | None  # the latest checkpoint in checkpoint_dir
    saved: dict[str, Any] | None  # the checkpointed run's extra state, with --resume


@dataclasses.dataclass
class _Callbacks:
    """The main job's callbacks; ``ordered`` is the list ``model.learn()`` runs."""

    history: RolloutHistoryCallback
    checkpoint: AtomicCheckpointCallback
    stopper: AtomicCheckpointCallback | distributed.DistributedCallback  # what SIGINT asks to stop training
    eval_callback: LMEvalCallback | None
    ordered: list[BaseCallback]


def build_parser() -> argparse.ArgumentParser:
    """The ``sb3-textrl`` parser; the ``train`` command's flags are :class:`~sb3_textrl.config.TrainConfig`'s fields."""
    parser = argparse.ArgumentParser(prog="sb3-textrl", description="Fine-tune causal LMs with Stable-Baselines3.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="fine-tune an LM with RLOO (or --algo ppo, a2c, reinforce, grpo), a reward function and a KL penalty",
        description="RLOO('LMPolicy') (or --algo PPO, A2C, REINFORCE, GRPO) on sb3_textrl/TextGeneration-v0 with a KL "
        "penalty to the reference model; prints a before/after table on held-out prompts and saves the model, an export "
        "and a PNG of the curves. Flags whose help names algorithms apply to those only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(train_parser)
    return parser


def format_table(before: EvaluationResult, after: EvaluationResult, n_prompts: int) -> str:
    """The before/after table of the held-out evaluation, with the first three prompts' greedy completions."""
    lines = [
        f"Held-out prompts: {n_prompts}",
        f"| {'':<24} | {'before':>8} | {'after':>8} |",
        f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|",
        f"| {'mean reward (greedy)':<24} | {before.reward_greedy:>+8.3f} | {after.reward_greedy:>+8.3f} |",
        f"| {'mean reward (sampled)':<24} | {before.reward_sampled:>+8.3f} | {after.reward_sampled:>+8.3f} |",
        f"| {'KL to reference (nats)':<24} | {before.kl:>8.3f} | {after.kl:>8.3f} |",
    ]
    change = _sampled_change(before, after)
    if change is not None:
        ci95 = change["reward_sampled_ci95"]
        lines.append(f"Change of the sampled reward: {change['reward_sampled']:+.3f} ± {ci95:.3f} (95 % CI over prompts)")
    lines += [
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


def _start_run(config: TrainConfig, started: float) -> _Run:
    """
    Join the ``torchrun`` group (if launched so), read the prompts and, with ``--resume``, check the checkpointed run.

    :raises ValueError: for a missing prompt file, a missing checkpoint with ``--resume`` (or one left without it), or
        arguments that differ from the checkpointed run's
    """
    parallel = distributed.launched_distributed()
    device = distributed.setup_distributed(config.device) if parallel else config.device
    main_process = distributed.is_main_process()
    seed = distributed.rank_seed(config.seed, config.n_envs)  # config.seed on rank 0
    train_prompts = read_prompts(config.prompts, "--prompts")
    eval_prompts = read_prompts(config.eval_prompts, "--eval-prompts")
    checkpoint_dir = os.path.join(config.output_dir, "checkpoints")
    resume_from = latest_checkpoint(checkpoint_dir)
    if config.resume and resume_from is None:
        raise ValueError(
            f"`--resume`: no checkpoint in {checkpoint_dir!r}. Give the --output-dir of the run to continue, or start a new "
            "run without --resume (--checkpoint-every N writes checkpoints; SIGINT writes one)."
        )
    if not config.resume and resume_from is not None:
        raise ValueError(
            f"`--output-dir` {config.output_dir!r} holds checkpoints of an earlier run ({resume_from}): continue it with "
            "--resume, or choose another --output-dir."
        )
    saved = read_resume_state(resume_from)["extra"] if config.resume else None
    if saved is not None:
        check_resume_args(config, saved, train_prompts, eval_prompts)
        if config.checkpoint_every is None:
            config = dataclasses.replace(config, checkpoint_every=saved["args"].get("checkpoint_every", 0))
    return _Run(
        config, started, device, parallel, main_process, seed, train_prompts, eval_prompts, checkpoint_dir, resume_from, saved
    )


def _build_model(run: _Run, env: VecEnv, callbacks: list[BaseCallback]) -> tuple[OnPolicyAlgorithm, EvaluationResult | None]:
    """
    A new ``RLOO("LMPolicy")`` (or ``--algo``'s), or with ``--resume`` the checkpointed one (which restores ``callbacks``
    too; the checkpoint names its algorithm).

    :return: the model, and the checkpointed run's evaluation before training (``None`` for a new run)
    """
    config = run.config
    if run.saved is None:
        model = make_model(config, env, seed=run.seed, device=run.device, verbose=config.verbose if run.main_process else 0)
        check_lm_setup(model)
        return model, None
    model, saved = load_checkpoint(
        run.resume_from,
        env=env,
        callbacks=callbacks,
        device=run.device,
        model_name_or_path=config.model,
        learning_rate=config.learning_rate,  # may be lowered to get past a divergence
    )
    check_lm_setup(model)
    if not run.main_process:
        distributed.reseed_replica(model, run.seed + model.num_timesteps)  # the checkpoint holds rank 0's streams
    print(f"Resuming {run.resume_from} at {model.num_timesteps} timesteps.", flush=True)
    return model, EvaluationResult(**saved["before"])


def _evaluate_before(run: _Run, model: OnPolicyAlgorithm) -> EvaluationResult | None:
    """The held-out evaluation before training, on rank 0 (``None`` on the other ranks)."""
    if not run.main_process:
        return None
    loaded = time.time() - run.started
    print(f"Model loaded in {loaded:.0f} s; evaluating {len(run.eval_prompts)} held-out prompts ...", flush=True)
    return evaluate_prompts(model.policy, run.eval_prompts, **run.config.evaluate_kwargs)


class _GroupDrawsCallback(BaseCallback):
    """Checkpoints the prompt draws of a ``GroupedVecEnv`` (GRPO, RLOO) as they stood before the next round (drawn before
    the checkpoint's boundary), so that a resumed run plays the rounds the interrupted one would have played. The
    checkpoints' env state holds them too now; this callback stays so that checkpoints written before can resume (their
    callback states name it)."""

    def __init__(self, env: GroupedVecEnv):
        super().__init__()
        self.env, self.draws = env, env.state_dict()

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.draws = self.env.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return self.draws

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = state
        self.env.load_state_dict(state)


def _make_callbacks(run: _Run, state_callbacks: list[BaseCallback], before: EvaluationResult | None) -> _Callbacks:
    """The checkpoints (with what ``--resume`` checks, and ``state_callbacks``: the KL penalty, the rollout history, for
    GRPO and RLOO the prompt draws), the ranks' synchronisation and the periodic evaluation."""
    config, (kl_callback, history) = run.config, state_callbacks[:2]
    run_args = {name: getattr(config, name) for name in (*RESUME_FIXED_ARGS, "model", "total_timesteps", "learning_rate")}
    run_args["checkpoint_every"] = config.checkpoint_every or 0
    extra_state = {
        "args": run_args,
        "prompts": run.train_prompts,
        "eval_prompts": run.eval_prompts,
        "before": before.__dict__ if before else None,
    }
    checkpoint = AtomicCheckpointCallback(
        config.checkpoint_every or 0,
        run.checkpoint_dir,
        callbacks=state_callbacks,
        extra_state=extra_state,
        keep_last=config.keep_checkpoints,
    )
    stopper: AtomicCheckpointCallback | distributed.DistributedCallback = checkpoint
    ordered: list[BaseCallback] = [*state_callbacks, checkpoint]
    if run.parallel:  # all ranks stop together (SIGINT on any); rank 0 alone checkpoints
        stopper = distributed.DistributedCallback(kl_callback, history, stop_callback=checkpoint)
        ordered[len(state_callbacks) :] = [stopper, checkpoint] if run.main_process else [stopper]
    eval_callback = None
    if config.eval_every > 0 and run.main_process:  # its results restart after a resume (they are not checkpointed)
        eval_dir = os.path.join(config.output_dir, "eval")
        start = before if run.saved is None else None  # the curve's first point costs no second evaluation
        eval_callback = LMEvalCallback(
            run.eval_prompts, config.eval_every, log_path=eval_dir, before=start, **run.config.evaluate_kwargs
        )
        ordered.append(eval_callback)
    return _Callbacks(history, checkpoint, stopper, eval_callback, ordered)


def _learn(run: _Run, model: OnPolicyAlgorithm, callbacks: _Callbacks) -> float:
    """
    Train up to ``--total-timesteps``; SIGINT stops at the next step.

    :return: the seconds ``model.learn()`` took
    :raises FloatingPointError: if training diverged, naming the step and the last checkpoint
    """
    train_started = time.time()
    restore_sigint = _stop_on_sigint(callbacks.stopper)
    try:
        model.learn(
            max(0, run.config.total_timesteps - model.num_timesteps),
            callback=CallbackList(callbacks.ordered),
            progress_bar=not run.config.no_progress_bar and run.main_process,
            reset_num_timesteps=run.saved is None,
        )
    except FloatingPointError as error:  # NaN/inf logits or weights: say when, and where to resume from
        last = latest_checkpoint(run.checkpoint_dir)
        raise FloatingPointError(
            f"Training diverged at num_timesteps={model.num_timesteps}: {error} Last checkpoint: {last or 'none'}."
        ) from error
    finally:
        restore_sigint()
    return time.time() - train_started


def _raise_if_stopped(run: _Run, model: OnPolicyAlgorithm, callbacks: _Callbacks) -> None:
    """
    End the run if SIGINT stopped training: rank 0 checkpoints the last rollout boundary first.

    :raises TrainingInterrupted: if training was stopped
    """
    if not callbacks.stopper.stopped:
        return
    if run.config.fsdp:
        raise TrainingInterrupted("none (--fsdp writes no checkpoints)", model.num_timesteps)
    path = callbacks.checkpoint.save_last_boundary() if run.main_process else None
    distributed.barrier()
    if path is None:
        raise TrainingInterrupted("(written by rank 0)", model.num_timesteps)
    raise TrainingInterrupted(path, read_resume_state(path)["model"]["num_timesteps"])


def _save_outputs(
    run: _Run, model: OnPolicyAlgorithm, sharded: Any, full_state: dict | None, history: list[dict]
) -> tuple[str, str, str]:
    """
    Plot ``history`` to ``curves.png``, then write ``model.zip`` and the export ``pretrained/`` (from ``full_state``,
    the gathered weights of the policy ``sharded``, under FSDP).

    :return: the paths of ``curves.png``, ``model.zip`` and the export folder
    """
    output_dir = run.config.output_dir
    title = f"{run.config.algo.upper()} on {run.config.model}"
    curves = plot_rollout_history(history, os.path.join(output_dir, "curves.png"), title)
    export_dir = os.path.join(output_dir, "pretrained")
    with sharded.as_full_state(full_state) if full_state is not None else contextlib.nullcontext():
        model_path = atomic_write(os.path.join(output_dir, "model.zip"), model.save)  # never a broken model.zip
        model.policy.save_pretrained(export_dir)
    return curves, model_path, export_dir


def _sampled_change(before: EvaluationResult, after: EvaluationResult) -> dict[str, float] | None:
    """The held-out sampled reward's change with its 95 % CI over prompts (``None`` if the protocols differ)."""
    if before.protocol != after.protocol or not before.reward_sampled_per_prompt:
        return None
    change, ci95 = paired_difference(before, after)
    return {"reward_sampled": change, "reward_sampled_ci95": ci95}


def _write_results(
    run: _Run, callbacks: _Callbacks, before: EvaluationResult, after: EvaluationResult, seconds: float
) -> dict:
    """Write and return ``results.json``: settings, evaluations, rollout history and timings (``seconds`` training)."""
    history = callbacks.history.history
    results = {
        "args": {"command": "train", **dataclasses.asdict(run.config)},
        "before": before.__dict__,
        "after": after.__dict__,
        "eval_protocol": after.protocol,
        "change": _sampled_change(before, after),
        "history": history,
        "evaluations": callbacks.eval_callback.results if callbacks.eval_callback is not None else [],
        "iterations": len(history),
        "resumed_from": run.resume_from if run.saved is not None else None,
        "train_seconds": seconds,
        "total_seconds": time.time() - run.started,
    }
    with open(os.path.join(run.config.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    return results


def train(args: argparse.Namespace | TrainConfig) -> dict:
    """
    Run the main job; returns what it wrote to ``results.json`` (``{}`` on ranks other than 0).

    :param args: the settings, or the namespace :func:`build_parser` parsed
    :raises ValueError: for bad arguments or inputs, before any training where possible
    :raises TrainingInterrupted: on SIGINT during training, after writing a checkpoint
    """
    started = time.time()
    run = _start_run(args if isinstance(args, TrainConfig) else TrainConfig.from_namespace(args), started)
    kl_callback = make_kl_callback(run.config)
    history = RolloutHistoryCallback(kl_callback)
    os.makedirs(run.config.output_dir, exist_ok=True)
    env = make_env(run.config, run.train_prompts, run.seed)
    state_callbacks: list[BaseCallback] = [kl_callback, history]
    if isinstance(env, GroupedVecEnv):  # GRPO, RLOO: the checkpoints keep the prompt draws too
        state_callbacks.append(_GroupDrawsCallback(env))
    model, before = _build_model(run, env, state_callbacks)
    sharded = distributed.prepare_model(model, fsdp=run.config.fsdp)  # no-op in one process
    if run.saved is None:
        before = _evaluate_before(run, model)
    if run.main_process:
        print(f"Evaluated in {time.time() - started:.0f} s (since start); training ...", flush=True)
    callbacks = _make_callbacks(run, state_callbacks, before)
    train_seconds = _learn(run, model, callbacks)
    _raise_if_stopped(run, model, callbacks)
    if run.parallel:
        distributed.check_in_sync(model.policy)
    # FSDP: every rank takes part in gathering the full weights; rank 0 saves them
    full_state = sharded.full_state_dict() if run.config.fsdp else None
    if not run.main_process:
        distributed.barrier()  # while rank 0 evaluates and saves
        return {}

    after = evaluate_prompts(model.policy, run.eval_prompts, **run.config.evaluate_kwargs)
    print(format_table(before, after, len(run.eval_prompts)), flush=True)
    curves, model_path, export_dir = _save_outputs(run, model, sharded, full_state, history.history)
    results = _write_results(run, callbacks, before, after, train_seconds)
    print(
        f"\n{len(history.history)} {run.config.algo.upper()} iterations in {train_seconds:.0f} s "
        f"(total {results['total_seconds']:.0f} s).\n"
        f"Wrote {model_path}, {export_dir}/, {curves} and results.json.",
        flush=True,
    )
    distributed.barrier()
    return results


def main(argv: list[str] | None = None) -> int:
    """
    ``sb3-textrl`` with the arguments ``argv`` (default: ``sys.argv[1:]``).

    :return: the exit status: 0 done, 1 training diverged, 2 bad arguments or inputs, 130 interrupted (checkpointed)
    """
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
