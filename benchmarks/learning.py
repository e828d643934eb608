"""Learning that pays: the main job's task (SmolLM2-135M-Instruct, VADER reward, the packaged prompts) trained for a
budget over several seeds and configurations, with the held-out gain, KL, perplexity and diversity at the end and the
held-out reward against training seconds.

    python benchmarks/learning.py                                   # library and plain, seeds 0 1 2, 15 min each
    python benchmarks/learning.py --seeds 0 --iterations 20 --eval-every 5
    python benchmarks/learning.py --configs library --config lr1e-5:learning_rate=1e-5 --config vf0.5:vf_coef=0.5
    python benchmarks/learning.py --config plain-lr2e-5:base=plain,learning_rate=2e-5 --budget-seconds 600

The configurations (each run in turn per seed, in this process, each from a freshly loaded model):

- ``library``: the main job as ``sb3-textrl train`` builds it: ``TrainConfig(model=--model, seed=SEED)``,
  ``make_env``, ``make_model``, ``make_kl_callback`` (RLOO("LMPolicy"), 16 envs = 4 prompts x 4 completions of up to
  24 tokens per round, KL penalty 0.05); ``algo=ppo`` gives PPO on whole episodes (``--config ppo:algo=ppo``).
- ``plain``: the classic PPO recipe as a plain torch + transformers loop (``benchmarks/plain_ppo.py``): 16 complete
  episodes per iteration from ``model.generate``, per-token k1 KL penalty 0.05, AdamW lr 1e-5, 2 epochs of minibatches
  of 8 sequences. For the evaluation its LM weights are copied into an LMPolicy built as the main job builds it, whose
  reference model stays the initial weights: KL is measured as for ``library``.
- ``--config NAME:key=value,key=value``: a variant of ``library`` (``base=library``, the default) or of ``plain``
  (``base=plain``). For ``library`` a key is a :class:`~sb3_textrl.config.TrainConfig` field (``learning_rate``,
  ``vf_coef``, ``n_epochs``, ``batch_size``...), ``policy.KEY`` a policy keyword (``policy.lean_activations=False``),
  ``buffer.KEY`` a rollout buffer keyword (``buffer.whiten_advantages=True``), ``ab.KEY`` a variant that only the
  benchmark has (``ab.normalize_scores=True``, ``ab.value_warmup_rollouts=2``: ``benchmarks/ab_options.py``) or else a
  keyword of the algorithm (``target_kl``, ``clip_range_vf``, ``normalize_advantage``); for ``plain`` a field of
  ``PlainPPOArgs``. Values are Python literals (``3e-5``, ``False``, ``None``), else strings. ``iterations=N`` gives the
  row its own budget in iterations (algorithms whose iterations take different times, compared at equal seconds:
  ``--config grpo:algo=grpo,group_size=4,iterations=25``).

Training runs in iterations (one PPO rollout + update) until ``--iterations`` or ``--budget-seconds`` of training
time, whichever comes first (the last iteration may end past the budget). The held-out evaluation,
:func:`~sb3_textrl.common.evaluation.evaluate_prompts` on every prompt of ``prompts_eval.txt`` with ``--eval-samples``
sampled completions each and the greedy one, runs at the start, every ``--eval-every`` iterations and at the end, with
common random numbers (sampling seed = the run's seed, so every evaluation of a seed, in every configuration, draws the
same random numbers); its time is not counted as training time, and training's random state is kept aside meanwhile.
The start evaluation of a seed is the same in every configuration (same model, prompts and draws): it runs once per
seed. ``--threads 1`` lets two benchmark processes share a 2-core machine (more rows per hour at a fixed
``--iterations``; their seconds are then not comparable with a 2-thread run's).

Output (``--out``): ``learning.csv`` (one row per configuration x seed x evaluation point, rewritten after each
evaluation: ``config``, ``seed``, ``iteration``, ``train_seconds``, ``tokens`` generated so far,
``seconds_per_iteration`` (mean so far), ``eval_seconds``, the numbers of the
:class:`~sb3_textrl.common.evaluation.EvaluationResult` and ``gain_sampled``, ``gain_sampled_ci95``: the gain since
the start with its 95 % interval over prompts, paired),
``learning.png`` (held-out sampled reward against training seconds: per configuration the mean over seeds, a band from
the lowest to the highest seed, each evaluation a dot) and ``summary.md``, the table also printed: per configuration
the held-out gain (after - before, sampled and greedy) as the mean over seeds +- a 95 % t interval, the gain's
difference from ``plain`` paired by seed (same evaluation draws), the KL to the reference after training (nats per
completion), the reference perplexity and distinct-2 after / before, and the seconds per iteration (and ÷ ``plain``).
The machine's speed drifts: compare configurations within one run only.

Runs made in separate processes (a seed or a configuration each, ``--threads 1``, several at once) are reported
together with ``--from-csv runs/a/learning.csv runs/b/learning.csv --out runs/all``: no training, the rows of those
CSVs (the first run of each configuration x seed), the same table, plot and CSV. Seconds measured with several
processes at once are not comparable: ``--seconds-per-iteration grpo=9.5 ppo=11.7`` puts a configuration's
``train_seconds`` on one scale (iterations x seconds per iteration measured on the idle machine).

Cost on a 2-core CPU machine (SmolLM2, one smoke run): an evaluation ~90 s, an iteration ~13 s (library) and ~20 s
(plain), so the defaults (3 seeds x 2 configurations x 15 min, an evaluation every 10 iterations: ~8 and ~6 per run)
take about 2.6 hours; ``--eval-every 20`` saves about 25 minutes.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import gc
import inspect
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from ab_options import ScoreNormalization, ValueWarmup, ab_options
from plain_ppo import PlainPPO, args_with
from stable_baselines3.common.callbacks import CallbackList

import sb3_textrl  # noqa: F401  (registers the env and "LMPolicy")
from sb3_textrl.common.callbacks import RolloutHistoryCallback
from sb3_textrl.common.evaluation import evaluate_prompts
from sb3_textrl.config import TrainConfig
from sb3_textrl.envs.prompts import read_prompts
from sb3_textrl.lm.loading import eos_token_ids
from sb3_textrl.lm.tokens import encode_prompt
from sb3_textrl.main_job import make_env, make_kl_callback, make_model
from sb3_textrl.policies import CausalLMActorCriticPolicy
from sb3_textrl.rewards import get_reward_fn, score_completions

try:  # the gain's interval over prompts, where evaluate_prompts keeps the per-prompt scores
    from sb3_textrl.common.evaluation import paired_difference
except ImportError:
    paired_difference = None

BUDGET_SECONDS = 15 * 60  # the main job's training budget
BASES = ("library", "plain")
# evaluate_prompts(seed=...) draws the same samples for the same seed; before it has one, the global generator is seeded
EVAL_TAKES_SEED = "seed" in inspect.signature(evaluate_prompts).parameters


@dataclass
class Configuration:
    """A row of the benchmark: ``base`` (library or plain) with ``overrides`` (setting name -> value)."""

    name: str
    base: str = "library"
    overrides: dict[str, Any] = field(default_factory=dict)
    iterations: int | None = None  # this row's own budget (``--iterations`` otherwise): equal seconds at unequal speeds


def parse_configuration(text: str) -> Configuration:
    """
    ``NAME:key=value,key=value`` (``base=plain`` for a variant of the plain loop) -> :class:`Configuration`.

    :raises argparse.ArgumentTypeError: for a malformed text or an unknown base
    """
    name, _, settings = text.partition(":")
    if not name or name in BASES:
        raise argparse.ArgumentTypeError(f"`--config {text}`: give a new name before ':', e.g. lr3e-5:learning_rate=3e-5.")
    overrides: dict[str, Any] = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"`--config {text}`: {item!r} is not key=value.")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    base = overrides.pop("base", "library")
    if base not in BASES:
        raise argparse.ArgumentTypeError(f"`--config {text}`: base={base!r}, use one of {BASES}.")
    iterations = overrides.pop("iterations", None)
    if iterations is not None and not (isinstance(iterations, int) and iterations >= 1):
        raise argparse.ArgumentTypeError(f"`--config {text}`: iterations={iterations!r}, give a whole number >= 1.")
    return Configuration(name, base, overrides, iterations)


def library_settings(configuration: Configuration, model: str, seed: int) -> tuple[TrainConfig, dict, dict, dict]:
    """
    The main job's :class:`TrainConfig` with the overrides, the policy's and the algorithm's extra keywords, and the
    benchmark's own variants (``ab.KEY``, :func:`ab_options.ab_options`).

    :raises ValueError: for an unknown ``ab.KEY`` or a value of the wrong type
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config_overrides, policy_kwargs, algo_kwargs, ab = {}, {}, {}, {}
    for key, value in configuration.overrides.items():
        if key in fields:
            config_overrides[key] = value
        elif key.startswith("ab."):
            ab[key[3:]] = value
        elif key.startswith(("policy.", "policy_kwargs.")):
            policy_kwargs[key.split(".", 1)[1]] = value
        elif key.startswith(("buffer.", "rollout_buffer_kwargs.")):
            algo_kwargs.setdefault("rollout_buffer_kwargs", {})[key.split(".", 1)[1]] = value
        else:
            algo_kwargs[key] = value
    config = TrainConfig(**{"model": model, "seed": seed, **config_overrides})
    return config, policy_kwargs, algo_kwargs, ab_options(ab)


class LibraryRun:
    """The main job (``sb3-textrl train``'s builders), one rollout and its update per :meth:`iteration`."""

    def __init__(self, configuration: Configuration, model: str, seed: int, device: str):
        self.config, policy_kwargs, algo_kwargs, ab = library_settings(configuration, model, seed)
        self.env = make_env(self.config, read_prompts(self.config.prompts, "--prompts"), seed=seed)
        if ab.get("normalize_scores", False):
            self.env = ScoreNormalization(self.env)
        policy_kwargs = {"activation_checkpointing": self.config.activation_checkpointing or False, **policy_kwargs}
        self.model = make_model(self.config, self.env, seed=seed, device=device, policy_kwargs=policy_kwargs, **algo_kwargs)
        kl_callback = make_kl_callback(self.config)
        self.history = RolloutHistoryCallback(kl_callback)
        callbacks = [kl_callback, self.history]
        if ab.get("value_warmup_rollouts", 0):
            callbacks.append(ValueWarmup(ab["value_warmup_rollouts"]))
        self.callbacks = CallbackList(callbacks)
        self.tokens = 0

    def eval_policy(self) -> CausalLMActorCriticPolicy:
        """The policy to evaluate: the model's own."""
        return self.model.policy  # type: ignore[return-value]

    def iteration(self) -> dict[str, float]:
        # one timestep past the count so far: exactly one rollout and its update, whatever a rollout counts (GRPO and
        # RLOO count real tokens only, fewer than n_steps x n_envs)
        self.model.learn(1, callback=self.callbacks, reset_num_timesteps=self.tokens == 0, progress_bar=False)
        self.tokens = self.model.num_timesteps
        return {key: self.history.history[-1][key] for key in ("score", "kl", "eos_fraction")}


class PlainRun:
    """The plain loop (``plain_ppo.py``), evaluated through an LMPolicy built as the main job builds it."""

    def __init__(self, configuration: Configuration, model: str, seed: int, device: str):
        self.config = TrainConfig(model=model, seed=seed, algo="ppo")
        prompts = read_prompts(self.config.prompts, "--prompts")
        self.evaluator = make_model(self.config, make_env(self.config, prompts, seed=seed), seed=seed, device=device)
        reference = self.evaluator.policy.reference_model  # the initial weights, frozen: the plain loop's reference too
        lm = copy.deepcopy(reference).requires_grad_(True)
        tokenizer = self.evaluator.policy.tokenizer
        chat = tokenizer.chat_template is not None  # as the env formats prompts
        reward_fn = get_reward_fn(self.config.reward, self.config.reward_kwargs)
        self.loop = PlainPPO(
            lm,
            reference,
            prompt_ids=[encode_prompt(tokenizer, p, chat) for p in prompts],
            prompts=prompts,
            reward_fn=lambda p, c: score_completions(reward_fn, p, c),
            eos_token_ids=eos_token_ids(model),
            pad_token_id=int(tokenizer.pad_token_id),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            args=args_with({"max_new_tokens": self.config.max_new_tokens, **configuration.overrides}),
            seed=seed,
        )
        self.tokens = 0

    def eval_policy(self) -> CausalLMActorCriticPolicy:
        """The policy to evaluate: the LMPolicy with the plain loop's current LM weights (its reference unchanged)."""
        policy: CausalLMActorCriticPolicy = self.evaluator.policy  # type: ignore[assignment]
        policy.lm.load_state_dict(self.loop.lm.state_dict())
        policy.reset_kv_cache()
        return policy

    def iteration(self) -> dict[str, float]:
        stats = self.loop.iteration()
        self.tokens += stats["tokens"]
        return stats


def evaluate(policy: CausalLMActorCriticPolicy, prompts: list[str], config: TrainConfig, n_samples: int, seed: int):
    """
    The held-out evaluation with common random numbers (``seed``); training's random state (torch, numpy, Python) is
    put back afterwards, so that evaluating does not change what training draws.

    :return: the :class:`~sb3_textrl.common.evaluation.EvaluationResult` and its numbers (``seed`` as ``eval_seed``)
    """
    policy.set_training_mode(False)
    kwargs = {**config.evaluate_kwargs, "n_samples": n_samples}
    devices = [policy.device.index or 0] if policy.device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with th.random.fork_rng(devices=devices):
        if EVAL_TAKES_SEED:
            kwargs["seed"] = seed
        else:
            th.manual_seed(seed)
        result = evaluate_prompts(policy, prompts, **kwargs)
    np.random.set_state(np_state)
    random.setstate(py_state)
    metrics = {k: float(v) for k, v in vars(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "seed" in metrics:
        metrics["eval_seed"] = int(metrics.pop("seed"))
    return result, metrics


# the start evaluation of a seed: the same model, prompts and draws in every configuration, so it is evaluated once
_START_EVALUATIONS: dict[tuple, tuple[Any, dict]] = {}


def run(
    configuration: Configuration,
    args: argparse.Namespace,
    seed: int,
    eval_prompts: list[str],
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Train one configuration with one seed for the budget; one row per evaluation point, each handed to ``on_row``
    (with the rows so far) as soon as it is measured."""
    started = time.perf_counter()
    runner = (LibraryRun if configuration.base == "library" else PlainRun)(configuration, args.model, seed, args.device)
    load_s = time.perf_counter() - started
    rows: list[dict] = []
    results: list[Any] = []
    iteration, train_s, iteration_s = 0, 0.0, []

    start_key = (seed, runner.config.model, repr(sorted(runner.config.evaluate_kwargs.items())), args.eval_samples)

    def add_row() -> None:
        t0 = time.perf_counter()
        if iteration == 0 and start_key in _START_EVALUATIONS:
            result, metrics = _START_EVALUATIONS[start_key]
            metrics = dict(metrics)
        else:
            result, metrics = evaluate(runner.eval_policy(), eval_prompts, runner.config, args.eval_samples, seed)
            if iteration == 0:
                _START_EVALUATIONS[start_key] = (result, dict(metrics))
        eval_s = time.perf_counter() - t0
        results.append(result)
        if paired_difference is not None:  # the gain since the start, with its 95 % interval over prompts (paired)
            metrics["gain_sampled"], metrics["gain_sampled_ci95"] = paired_difference(results[0], result)
        rows.append({
            "config": configuration.name, "seed": seed, "iteration": iteration, "train_seconds": round(train_s, 2),
            "tokens": runner.tokens, "seconds_per_iteration": round(float(np.mean(iteration_s)), 3) if iteration_s else "",
            "eval_seconds": round(eval_s, 2), **metrics,
        })  # fmt: skip
        if on_row is not None:
            on_row(rows)
        print(
            f"{configuration.name} seed {seed} eval @ iteration {iteration} ({train_s:.0f} s): sampled "
            f"{metrics['reward_sampled']:+.3f}, greedy {metrics['reward_greedy']:+.3f}, KL {metrics['kl']:.2f} "
            f"[{eval_s:.0f} s]",
            file=sys.stderr,
            flush=True,
        )

    iterations = configuration.iterations or args.iterations

    def done() -> bool:
        return (iterations is not None and iteration >= iterations) or (
            args.budget_seconds is not None and train_s >= args.budget_seconds
        )

    print(f"{configuration.name} seed {seed}: built in {load_s:.0f} s", file=sys.stderr, flush=True)
    add_row()
    while not done():
        t0 = time.perf_counter()
        stats = runner.iteration()
        iteration_s.append(time.perf_counter() - t0)
        iteration, train_s = iteration + 1, train_s + iteration_s[-1]
        print(
            f"{configuration.name} seed {seed} iteration {iteration}: {iteration_s[-1]:.1f} s, rollout score "
            f"{stats['score']:+.3f}, KL {stats['kl']:.2f}, EOS {stats.get('eos_fraction', math.nan):.2f}",
            file=sys.stderr,
            flush=True,
        )
        if iteration % args.eval_every == 0 or done():
            add_row()
    return rows


# --- the report ------------------------------------------------------------------------------------------------------

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student's t, 97.5 %, df 1..10


def mean_ci(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95 % t interval (``nan`` for fewer than 2 values)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    n = len(values)
    if n < 2:
        return float(values[0]), float("nan")
    df, z = n - 1, 1.959964
    t = _T975[df - 1] if df <= len(_T975) else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return float(np.mean(values)), float(t * np.std(values, ddof=1) / math.sqrt(n))


def _pm(mean: float, half: float, fmt: str = "+.3f") -> str:
    return f"{mean:{fmt}}" + ("" if math.isnan(half) else f" ± {half:.3f}")


def summary_table(rows: list[dict], names: list[str]) -> str:
    """The markdown table of the module docstring, one line per configuration."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        runs.setdefault(row["config"], {}).setdefault(row["seed"], []).append(row)
    per_iteration = {
        name: float(np.mean([r[-1]["seconds_per_iteration"] for r in runs[name].values() if r[-1]["seconds_per_iteration"]]))
        for name in names
        if name in runs and any(r[-1]["seconds_per_iteration"] for r in runs[name].values())
    }

    def gains(name: str, metric: str) -> dict[int, float]:
        return {seed: r[-1][metric] - r[0][metric] for seed, r in runs.get(name, {}).items()}

    header = (
        "| config | seeds | iterations | train s | gain sampled | ± prompts | gain greedy | gain - plain (paired) | KL after "
        "| ref ppl after/before | distinct-2 after/before | s / iteration | ÷ plain |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    plain = gains("plain", "reward_sampled")
    for name in names:
        if name not in runs:
            continue
        seeds = runs[name]
        sampled, greedy = gains(name, "reward_sampled"), gains(name, "reward_greedy")
        paired = [sampled[s] - plain[s] for s in sampled if s in plain] if name != "plain" and plain else []
        ratios = {m: [r[-1][m] / r[0][m] for r in seeds.values()] for m in ("ref_perplexity", "distinct_2")}
        seconds = per_iteration.get(name, float("nan"))
        vs_plain = seconds / per_iteration["plain"] if "plain" in per_iteration else float("nan")
        cells = [
            name,
            str(len(seeds)),
            f"{np.mean([r[-1]['iteration'] for r in seeds.values()]):.1f}",
            f"{np.mean([r[-1]['train_seconds'] for r in seeds.values()]):.0f}",
            _pm(*mean_ci(list(sampled.values()))),
            f"{np.mean([r[-1].get('gain_sampled_ci95', float('nan')) for r in seeds.values()]):.3f}",
            _pm(*mean_ci(list(greedy.values()))),
            _pm(*mean_ci(paired)) if paired else "—",
            _pm(*mean_ci([r[-1]["kl"] for r in seeds.values()]), fmt=".2f"),
            f"{np.mean(ratios['ref_perplexity']):.3f}",
            f"{np.mean(ratios['distinct_2']):.3f}",
            f"{seconds:.1f}",
            f"{vs_plain:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_INT_COLUMNS = ("seed", "iteration", "tokens")


def read_csv(paths: list[str]) -> list[dict]:
    """
    The rows of ``learning.csv`` files, numbers as numbers; of a configuration x seed found in several files, the
    first file's run.

    :raises FileNotFoundError: for a path that does not exist
    """
    rows: list[dict] = []
    taken: set[tuple[str, int]] = set()
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            found = [{k: _number(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
        runs = {(r["config"], r["seed"]) for r in found}
        rows += [r for r in found if (r["config"], r["seed"]) not in taken]
        taken |= runs
    return rows


def _number(column: str, text: str) -> Any:
    if column in _INT_COLUMNS and text:
        return int(float(text))
    try:
        return float(text)
    except ValueError:
        return text  # the config name, or an empty cell


def rescale_seconds(rows: list[dict], seconds_per_iteration: dict[str, float]) -> None:
    """Set ``train_seconds`` (and ``seconds_per_iteration``) of the named configurations to iterations x the given
    seconds, in place."""
    for row in rows:
        if row["config"] in seconds_per_iteration:
            row["seconds_per_iteration"] = seconds_per_iteration[row["config"]]
            row["train_seconds"] = round(row["iteration"] * row["seconds_per_iteration"], 2)


def write_csv(rows: list[dict], path: str) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], names: list[str], path: str, title: str) -> None:
    """Held-out sampled reward against training seconds: per configuration the mean over seeds (interpolated on a
    common grid up to the shortest seed's last evaluation), a min-max band across seeds, and each evaluation a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(names):
        seeds: dict[int, list[dict]] = {}
        for row in rows:
            if row["config"] == name:
                seeds.setdefault(row["seed"], []).append(row)
        if not seeds:
            continue
        color = f"C{i}"
        curves = [([r["train_seconds"] for r in s], [r["reward_sampled"] for r in s]) for s in seeds.values()]
        for x, y in curves:
            ax.scatter(x, y, s=10, color=color, alpha=0.5)
        end = min(x[-1] for x, _ in curves)
        grid = np.linspace(0.0, end, 100) if end > 0 else np.zeros(1)
        ys = np.array([np.interp(grid, x, y) for x, y in curves])
        ax.plot(grid, ys.mean(0), color=color, label=f"{name} ({len(curves)} seed{'s' * (len(curves) != 1)})")
        if len(curves) > 1:
            ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.2)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out reward, sampled")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--budget-seconds", type=float, help=f"training seconds per run (default {BUDGET_SECONDS} if no --iterations)"
    )
    parser.add_argument("--iterations", type=int, help="iterations per run (default: none, the budget alone)")
    parser.add_argument("--eval-every", type=int, default=10, help="evaluate every N iterations (and at the start and end)")
    parser.add_argument("--eval-samples", type=int, default=8, help="sampled completions per held-out prompt")
    parser.add_argument("--configs", nargs="+", default=list(BASES), help="configurations to run, in order")
    parser.add_argument("--config", type=parse_configuration, action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="define a configuration (run after --configs unless listed there)")  # fmt: skip
    parser.add_argument("--model", default="smollm2-135m-instruct", help="as sb3-textrl train --model")
    parser.add_argument("--device", default="auto", help="torch device (auto: cuda if available)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="runs/learning", help="folder for learning.csv, learning.png and summary.md")
    parser.add_argument("--from-csv", nargs="+", metavar="CSV", help="report these runs' learning.csv files, no training")
    parser.add_argument(
        "--seconds-per-iteration", nargs="+", default=[], metavar="NAME=S",
        help="a configuration's train_seconds = iterations x S (seconds measured on the idle machine)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        seconds_per_iteration = {k: float(v) for k, _, v in (item.partition("=") for item in args.seconds_per_iteration)}
    except ValueError:
        parser.error(f"`--seconds-per-iteration` takes NAME=SECONDS items, got {args.seconds_per_iteration}.")
    if args.from_csv:
        return report(read_csv(args.from_csv), args, seconds_per_iteration)
    if args.budget_seconds is None and args.iterations is None:
        args.budget_seconds = BUDGET_SECONDS
    if args.eval_every < 1:
        parser.error(f"`--eval-every` must be >= 1, got {args.eval_every}.")
    if args.threads is not None:
        th.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if th.cuda.is_available() else "cpu"
    defined = {c.name: c for c in args.config}
    names = list(dict.fromkeys([*args.configs, *defined]))
    unknown = [n for n in names if n not in BASES and n not in defined]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}: use {list(BASES)} or define them with --config NAME:key=value.")
    configurations = [defined.get(n) or Configuration(n, n) for n in names]

    gym.logger.min_level = 40  # hide gymnasium's passive-checker chatter
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "learning.csv")
    eval_prompts = read_prompts(TrainConfig().eval_prompts, "--eval-prompts")
    started, rows = time.perf_counter(), []
    for seed in args.seeds:  # seeds outermost: a drift of the machine's speed hits every configuration alike
        for configuration in configurations:
            # the CSV is rewritten after every evaluation: a run stopped part-way keeps what it measured
            def save(new: list[dict], done: list[dict] = rows) -> None:
                write_csv(done + new, csv_path)

            rows += run(configuration, args, seed, eval_prompts, on_row=save)
            gc.collect()  # the run's models (SB3 holds reference cycles) before the next one loads its own

    rescale_seconds(rows, seconds_per_iteration)
    budget = " and ".join(
        ([f"{args.budget_seconds:.0f} training s"] if args.budget_seconds is not None else [])
        + ([f"{args.iterations} iterations"] if args.iterations is not None else [])
    )
    title = f"{args.model}, {len(args.seeds)} seed{'s' * (len(args.seeds) != 1)}, {budget}"
    crn = "evaluate_prompts(seed=seed)" if EVAL_TAKES_SEED else "torch.manual_seed(seed) before evaluate_prompts"
    notes = (
        f"{title}; held-out: {len(eval_prompts)} prompts x {args.eval_samples} samples + greedy, same draws before and "
        f"after ({crn}); {th.get_num_threads()} threads on {args.device}; {time.perf_counter() - started:.0f} s in all.\n"
        "gain: held-out reward after - before, mean over seeds ± 95 % t interval; ± prompts: the 95 % interval of one "
        "run's gain over prompts (before/after paired per prompt), mean over seeds; KL in nats per completion."
    )
    write_report(rows, names, args.out, title, notes)
    return 0


def write_report(rows: list[dict], names: list[str], out: str, title: str, notes: str) -> None:
    """``learning.png`` and ``summary.md`` (``notes``, then the table) in ``out``; the table printed."""
    plot(rows, names, os.path.join(out, "learning.png"), title)
    table = summary_table(rows, names)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(f"{notes}\n\n{table}\n")
    print(f"\n{notes}\n\n{table}\n\nWrote learning.csv, learning.png and summary.md in {out}.", flush=True)


def report(rows: list[dict], args: argparse.Namespace, seconds_per_iteration: dict[str, float]) -> int:
    """``--from-csv``: the table, plot and CSV of runs already made."""
    rescale_seconds(rows, seconds_per_iteration)
    names = list(dict.fromkeys(r["config"] for r in rows))
    os.makedirs(args.out, exist_ok=True)
    seeds = sorted({r["seed"] for r in rows})
    title = f"{args.model}, seeds {' '.join(map(str, seeds))}"
    write_csv(rows, os.path.join(args.out, "learning.csv"))
    scaled = f"; seconds per iteration set for {', '.join(seconds_per_iteration)}" if seconds_per_iteration else ""
    write_report(rows, names, args.out, title, f"{title}; from {', '.join(args.from_csv)}{scaled}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
