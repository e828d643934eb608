"""Data-parallel scaling: PPO("LMPolicy") tokens/s (rollout + update, all ranks together) with 1 and 2 ranks on this
machine (gloo on CPU, NCCL on GPUs), and the ratio. Each rank keeps the same n_envs, n_steps and batch size, so 2 ranks
generate twice the tokens per iteration; ideal scaling is a ratio of 2.

    python benchmarks/distributed_scaling.py                              # the tiny random Llama (built in a temp dir)
    python benchmarks/distributed_scaling.py --model smollm2-135m-instruct --n-envs 8 --max-new-tokens 16
    python benchmarks/distributed_scaling.py --threads-per-rank 2 --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch as th
import torch.multiprocessing as mp
from _common import make_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList

from sb3_textrl import distributed
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import KLPenaltyCallback, RolloutHistoryCallback
from sb3_textrl.testing import build_tiny_lm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    th.set_num_threads(args.threads_per_rank)
    device = distributed.setup_distributed(args.device) if world_size > 1 else args.device
    seed = distributed.rank_seed(0, args.n_envs)
    env = make_env(args.model, args.n_envs, args.max_new_tokens)
    env.seed(seed)
    model = PPO(
        "LMPolicy",
        env,
        n_steps=args.max_new_tokens,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        learning_rate=1e-5,
        rollout_buffer_class=EpisodeRolloutBuffer,
        seed=seed,
        device=device,
    )
    averager = distributed.prepare_model(model)
    kl_callback = KLPenaltyCallback(0.05)
    history = RolloutHistoryCallback(kl_callback)
    sync = distributed.DistributedCallback(kl_callback, history, stop_check_every=args.stop_check_every)
    callbacks = [kl_callback, history] + ([sync] if world_size > 1 else [])
    per_iteration = model.n_steps * model.n_envs
    model.learn(per_iteration * args.warmup, callback=CallbackList(callbacks))  # first-call costs
    distributed.barrier()
    comm_start = averager.seconds if averager is not None else 0.0
    start = time.perf_counter()
    model.learn(per_iteration * args.iterations, callback=CallbackList(callbacks), reset_num_timesteps=False)
    distributed.barrier()
    seconds = time.perf_counter() - start
    if world_size > 1:
        distributed.check_in_sync(model.policy)
    if rank == 0:
        tokens = per_iteration * args.iterations * world_size
        comm = (averager.seconds - comm_start) if averager is not None else 0.0
        result = {"world_size": world_size, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
        with open(out, "w") as f:
            json.dump({**result, "all_reduce_seconds": comm}, f)
    distributed.cleanup_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (a random tiny Llama) or an LM alias/path")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to measure")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch threads in each rank")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="also n_steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed PPO iterations")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stop-check-every", type=int, default=1, help="steps between the ranks' stop-flag all-reduces")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distributed_scaling_") as workdir:
        if args.model == "tiny":
            args.model = build_tiny_lm(os.path.join(workdir, "tiny"), kind="llama")
        results = []
        for world_size in args.ranks:
            out = os.path.join(workdir, f"result-{world_size}.json")
            mp.spawn(run_rank, args=(world_size, _free_port(), args, out), nprocs=world_size, join=True)
            with open(out) as f:
                results.append(json.load(f))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]["tokens_per_s"]
    print(f"\nmodel={args.model if 'distributed_scaling_' not in args.model else 'tiny'} threads/rank={args.threads_per_rank}")
    print(f"{'ranks':>5} | {'tokens/s':>9} | {'scaling':>7} | {'all-reduce share':>16}")
    for r in results:
        share = r["all_reduce_seconds"] / r["seconds"]
        print(f"{r['world_size']:>5} | {r['tokens_per_s']:>9.1f} | {r['tokens_per_s'] / base:>6.2f}x | {share:>15.1%}")


if __name__ == "__main__":
    main()
