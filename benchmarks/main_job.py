"""End to end: seconds per iteration of the main job with PPO (``sb3-textrl train --algo ppo``: SmolLM2-135M-Instruct,
16 envs x 24 new tokens, 2 epochs of minibatches of 192 steps, VADER reward, KL penalty callback), as the library runs
it and with its speed-ups off, measured one after the other in one run.

    python benchmarks/main_job.py                        # library and flags-off, 1 warm-up + 2 timed iterations each
    python benchmarks/main_job.py --only library naive   # naive may be killed for memory (see below)

The settings (each in its own process, so peak RSS is its own):

- ``library``: the main job as ``sb3-textrl train`` builds it (``sb3_textrl.main_job.make_model``).
- ``flags-off``: the same, with the KV cache, prefix sharing, packing, prepacked weights and lean activations off,
  and SB3's stock ``DictRolloutBuffer`` (shuffled single steps) instead of the episode buffer. Training still runs one
  forward per group of observations that one covers (:func:`sb3_textrl.lm.tokens.covering_rows`), and the other
  speed-ups stay (fused Adam, the sampler, the LM head's layout, the log-prob backward): it is faster than a naive
  policy.
- ``naive``: ``flags-off`` with one row per observation as well, as issue 6 describes a naive env + policy: every
  rollout step re-reads prompt + generated text, and every (prefix, action) sample of a minibatch is its own row of
  the forward pass. At the main job's minibatch of 192 samples that is ~12k tokens of activations: where they do not
  fit in memory it is killed in its first ``train()``, and the table says so.

An iteration is one rollout start to the next inside ``learn()`` (rollout with VADER scoring, the KL callback's
reference pass, ``train()``, SB3's logging); the first ``--warmup`` iterations are dropped. The table gives the
median iteration and how many such iterations fit in the main job's 15 minutes. A machine's speed can drift over
minutes, so compare settings within one run only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch as th
from _common import IterationTimer
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import CallbackList

from sb3_textrl import policies
from sb3_textrl.common.callbacks import KLPenaltyCallback
from sb3_textrl.config import TrainConfig
from sb3_textrl.envs.prompts import read_prompts
from sb3_textrl.main_job import make_env, make_model

SETTINGS = ("library", "flags-off", "naive")
BUDGET_SECONDS = 15 * 60  # the main job's training budget


def one_row_per_observation(input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Stands in for ``covering_rows``: every observation is its own row (no reuse of a longer one's forward)."""
    rows = th.arange(len(input_ids))
    return rows, rows


def run_setting(setting: str, model_name: str, warmup: int, iterations: int) -> dict:
    config = TrainConfig(model=model_name, algo="ppo")  # sb3-textrl train --algo ppo --model MODEL_NAME
    prompts = read_prompts(config.prompts, "--prompts")
    env = make_env(config, prompts, seed=config.seed)
    overrides = {}
    if setting != "library":
        off = dict(use_kv_cache=False, prefix_sharing=False, packing=False, prepacked_weights=False, lean_activations=False)
        overrides = dict(rollout_buffer_class=DictRolloutBuffer, policy_kwargs=off)
    if setting == "naive":
        policies.covering_rows = one_row_per_observation
    model = make_model(config, env, seed=config.seed, device="cpu", **overrides)
    timer = IterationTimer()
    kl_callback = KLPenaltyCallback(kl_coef=config.kl_coef, estimator=config.kl_estimator)
    model.learn((warmup + iterations) * model.n_steps * model.n_envs, callback=CallbackList([kl_callback, timer]))
    return {
        "setting": setting,
        "seconds": timer.seconds[warmup:],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "tokens_per_iteration": model.n_steps * model.n_envs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="as sb3-textrl train --model")
    parser.add_argument("--warmup", type=int, default=1, help="iterations dropped at the start of each setting")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per setting")
    parser.add_argument("--only", nargs="+", choices=SETTINGS, default=["library", "flags-off"])
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # one setting, in a child process
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(run_setting(args.setting, args.model, args.warmup, args.iterations)))
        return

    results, failed = [], {}
    for setting in args.only:
        command = [sys.executable, __file__, "--setting", setting, "--model", args.model]
        command += ["--warmup", str(args.warmup), "--iterations", str(args.iterations)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:  # -9: killed, for memory on this machine (naive)
            failed[setting] = done.returncode
            print(f"{setting}: exit {done.returncode}\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{setting}: {[round(s, 1) for s in results[-1]['seconds']]} s per iteration", flush=True)

    if not results or results[0]["setting"] != "library":
        return
    library = statistics.median(results[0]["seconds"])
    tokens, threads = results[0]["tokens_per_iteration"], th.get_num_threads()
    print(f"\nmain job defaults ({args.model}), {tokens} generated tokens per iteration, {threads} threads")
    header = ("setting", "s / iteration", "iterations in 15 min", "÷ library", "peak RSS GiB")
    print(f"| {header[0]:<10} | {header[1]:>13} | {header[2]:>20} | {header[3]:>12} | {header[4]:>12} |")
    print(f"|{'-' * 12}|{'-' * 15}|{'-' * 22}|{'-' * 14}|{'-' * 14}|")
    for result in results:
        seconds = statistics.median(result["seconds"])
        print(
            f"| {result['setting']:<10} | {seconds:>13.1f} | {BUDGET_SECONDS / seconds:>20.1f} | {seconds / library:>12.2f} "
            f"| {result['peak_rss_gib']:>12.2f} |"
        )
    for setting, code in failed.items():
        print(f"| {setting:<10} | {'exit ' + str(code):>13} | {0:>20} | {'-':>12} | {'-':>12} |")


if __name__ == "__main__":
    main()
