"""Data-parallel PPO across processes (``torchrun``): stock PPO in every rank, the LM's gradients averaged across ranks.

Each rank runs the unchanged SB3 loop (``collect_rollouts`` then ``PPO.train``) on its own environments and rollout
buffer. What makes the ranks one run:

- **same start**: :func:`prepare_model` broadcasts rank 0's parameters and buffers;
- **averaged gradients**: :class:`GradientAverager` hooks every trainable parameter
  (``Tensor.register_post_accumulate_grad_hook``); the first hook of a backward queues one callback at the end of that
  backward, which all-reduces the gradients (bucketed, flattened) and divides them by the world size. So
  ``loss.backward()`` in ``PPO.train`` returns averaged gradients, *before* SB3's ``clip_grad_norm_`` and
  ``optimizer.step()``: every rank clips and steps identically, and the weights stay bitwise equal;
- **same number of optimizer steps**: every backward is a collective, so all ranks must take as many minibatches per
  epoch. :class:`DistributedEpisodeRolloutBuffer` agrees on the largest count (one all-reduce per epoch) and splits
  its own largest minibatches until it has as many (an episode may then be split; ``LMPolicy`` handles any subset).
  ``target_kl`` is refused: its early stop is decided per rank, mid-epoch;
- **same KL coefficient**: :class:`DistributedCallback` averages the per-episode KL over all ranks' episodes before
  the adaptive controller updates the coefficient, and gives the rollout history (rank 0 logs it) the global KL and
  score; it also turns a stop request (SIGINT on any rank) into a stop of all ranks at the same step.

Different episodes per rank: :func:`rank_seed` offsets the seed by ``rank * n_envs``, so rank ``r``'s environment ``i``
gets the seed a single process with ``world_size * n_envs`` environments would give its environment ``r * n_envs + i``.

FSDP mode (``prepare_model(model, fsdp=True)``, ``sb3-textrl train --fsdp``): the gradients and the Adam state are
sharded across the ranks instead (:mod:`sb3_textrl.distributed.fsdp`).

Launch: ``torchrun --nproc_per_node 2 -m sb3_textrl train ...`` (see ``docs/distributed.md``).
"""

from __future__ import annotations

import copy
import datetime
import os
import time
from collections.abc import Generator, Iterable

import numpy as np
import torch as th
import torch.distributed as dist
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples
from stable_baselines3.common.utils import set_random_seed
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.callbacks import EpisodeScores, KLPenaltyCallback, RolloutHistoryCallback
from sb3_textrl.distributed.fsdp import ShardedPolicy, check_fsdp_policy

__all__ = [
    "BUCKET_ELEMENTS",
    "DistributedCallback",
    "DistributedEpisodeRolloutBuffer",
    "GradientAverager",
    "barrier",
    "broadcast_module",
    "check_in_sync",
    "cleanup_distributed",
    "is_main_process",
    "launched_distributed",
    "prepare_model",
    "rank",
    "rank_seed",
    "reseed_replica",
    "setup_distributed",
    "split_minibatches",
    "world_size",
]

_owned_group = [False]  # whether setup_distributed() initialised the process group

#: gradients are all-reduced in flat buckets of at most this many elements (128 MiB in float32)
BUCKET_ELEMENTS = 1 << 25


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0: the one that logs, evaluates and saves."""
    return rank() == 0


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device: str = "auto", timeout_minutes: float = 120.0) -> th.device:
    """
    Join the process group described by torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when the ranks use CUDA, gloo on CPU.

    :param device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; with CUDA, rank ``LOCAL_RANK`` takes
        GPU ``LOCAL_RANK``
    :param timeout_minutes: how long a collective may wait (rank 0 evaluates and saves while the others wait)
    :return: the device this rank trains on
    :raises ValueError: if the launcher's variables are missing or CUDA is asked for but absent
    """
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"Distributed training needs the launcher's variables {missing}: start with `torchrun`.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = th.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    if use_cuda and not th.cuda.is_available():
        raise ValueError(f"`--device {device}` asks for CUDA but none is available: use `--device cpu` (gloo).")
    if use_cuda:
        th.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        _owned_group[0] = True
    return th.device("cuda", local_rank) if use_cuda else th.device("cpu")


def cleanup_distributed() -> None:
    """Leave the process group that :func:`setup_distributed` joined (a group initialised elsewhere is left alone)."""
    if _owned_group[0] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group[0] = False


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def rank_seed(seed: int | None, n_envs: int) -> int | None:
    """
    The seed of this rank: ``seed + rank * n_envs``, so that no two environments of the run share a seed
    (``make_text_vec_env`` seeds environment ``i`` with ``seed + i``).
    """
    return None if seed is None else seed + rank() * n_envs


def _device_of(module: th.nn.Module) -> th.device:
    return next(module.parameters()).device


def _all_reduce_sum(values: Iterable[float], device: th.device) -> np.ndarray:
    tensor = th.tensor(list(values), dtype=th.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.cpu().numpy()


@th.no_grad()
def broadcast_module(module: th.nn.Module, src: int = 0) -> None:
    """
    Copy rank ``src``'s parameters and buffers into every rank, in place (one broadcast per tensor: a collective, all
    ranks call it).
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src)


@th.no_grad()
def check_in_sync(module: th.nn.Module, atol: float = 0.0) -> None:
    """
    Check that every rank holds the same parameters (a float64 sum per tensor, compared with two all-reduces: a
    collective, all ranks call it). A no-op in a single process.

    :param module: the replicated module
    :param atol: the largest difference of the per-tensor sums accepted (default 0: bitwise-equal sums)
    :raises RuntimeError: if the ranks' weights differ
    """
    if world_size() <= 1:
        return
    params = list(module.parameters())
    sums = th.stack([p.detach().double().sum() for p in params])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = ((high - low).abs() > atol).nonzero().flatten().tolist()
    if differ:
        names = [name for i, (name, _) in enumerate(module.named_parameters()) if i in differ]
        raise RuntimeError(f"The ranks' weights differ in {len(differ)} tensors, e.g. {names[:3]}: the ranks drifted apart.")


class GradientAverager:
    """
    Average the gradients of ``params`` over all ranks at the end of every backward pass that reaches them.

    One hook per parameter (``register_post_accumulate_grad_hook``); the first to fire in a backward queues a callback
    that runs once the backward is complete and all-reduces all the gradients in flat buckets. A parameter without a
    gradient in a backward gets zeros (the ranks must reduce the same tensors). Every backward through ``params`` is
    a collective: all ranks must run the same number of them.

    ``n_reductions`` counts the backwards averaged and ``seconds`` the wall-clock time spent in their all-reduces.

    :param params: the parameters; those with ``requires_grad`` are averaged
    :param bucket_elements: at most this many elements per all-reduce (default :data:`BUCKET_ELEMENTS`)
    :raises ValueError: if no parameter requires a gradient
    """

    def __init__(self, params: Iterable[th.nn.Parameter], bucket_elements: int = BUCKET_ELEMENTS):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradientAverager: no trainable parameters to average.")
        self.bucket_elements = bucket_elements
        self._queued = False
        self.n_reductions = 0
        self.seconds = 0.0  # spent in the all-reduces
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, param: th.Tensor) -> None:
        if not self._queued:
            self._queued = True
            th.autograd.Variable._execution_engine.queue_callback(self._all_reduce)  # at the end of this backward

    def _buckets(self) -> list[list[th.Tensor]]:
        buckets: list[list[th.Tensor]] = []
        size = 0
        key = None
        for p in self.params:
            if p.grad is None:
                p.grad = th.zeros_like(p)
            grad_key = (p.grad.dtype, p.grad.device)
            if not buckets or grad_key != key or size + p.grad.numel() > self.bucket_elements:
                buckets.append([])
                size, key = 0, grad_key
            buckets[-1].append(p.grad)
            size += p.grad.numel()
        return buckets

    @th.no_grad()
    def _all_reduce(self) -> None:
        self._queued = False
        n = world_size()
        if n <= 1:
            return
        start = time.perf_counter()
        pending = []
        for bucket in self._buckets():
            flat = _flatten_dense_tensors(bucket)
            pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
        for bucket, flat, work in pending:
            work.wait()
            flat.div_(n)
            for grad, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(averaged)
        self.n_reductions += 1
        self.seconds += time.perf_counter() - start

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def split_minibatches(batches: list[list[np.ndarray]], n_batches: int) -> list[np.ndarray]:
    """
    Split minibatches until there are ``n_batches`` of them: the largest is cut in two at the episode boundary
    nearest its middle, or in the middle of its only episode.

    :param batches: the minibatches, each a list of episodes (arrays of flat step indices)
    :param n_batches: how many minibatches to return (at least ``len(batches)``, at most the number of steps)
    :return: the flat step indices of each minibatch
    :raises ValueError: if ``n_batches`` cannot be reached
    """
    batches = [list(batch) for batch in batches]
    n_steps = sum(len(episode) for batch in batches for episode in batch)
    if not len(batches) <= n_batches <= n_steps:
        raise ValueError(f"Cannot make {n_batches} minibatches from {len(batches)} minibatches of {n_steps} steps.")
    while len(batches) < n_batches:
        i = max(range(len(batches)), key=lambda j: sum(len(e) for e in batches[j]))
        batch = batches.pop(i)
        if len(batch) > 1:
            sizes = np.cumsum([len(e) for e in batch])
            cut = int(np.argmin(np.abs(sizes[:-1] - sizes[-1] / 2))) + 1
            halves = [batch[:cut], batch[cut:]]
        else:
            episode = batch[0]
            halves = [[episode[: len(episode) // 2]], [episode[len(episode) // 2 :]]]
        batches[i:i] = halves
    return [np.concatenate(batch) for batch in batches]


class DistributedEpisodeRolloutBuffer(EpisodeRolloutBuffer):
    """
    An :class:`~sb3_textrl.common.buffers.EpisodeRolloutBuffer` that yields the same number of minibatches on every rank.

    Episodes are packed as in the parent class (whole episodes, random order, at most ``batch_size`` steps); the ranks
    then agree on the largest count (an all-reduce, once per ``get()``), and a rank with fewer minibatches splits its
    largest ones (see :func:`split_minibatches`). Without a process group it is the parent class.
    """

    def get(self, batch_size: int | None = None) -> Generator[DictRolloutBufferSamples, None, None]:
        if world_size() <= 1:
            yield from super().get(batch_size)
            return
        assert self.full, ""
        if not self.generator_ready:
            self._flatten()
        episodes = self.episode_indices()
        batch_size = self.buffer_size * self.n_envs if batch_size is None else batch_size
        batches: list[list[np.ndarray]] = []
        batch: list[np.ndarray] = []
        size = 0
        for e in np.random.permutation(len(episodes)):  # the parent's greedy packing
            episode = episodes[e]
            if batch and size + len(episode) > batch_size:
                batches.append(batch)
                batch, size = [], 0
            batch.append(episode)
            size += len(episode)
        if batch:
            batches.append(batch)
        count = th.tensor([len(batches)], dtype=th.int64, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        for indices in split_minibatches(batches, int(count.item())):
            yield self._get_samples(indices)


class DistributedCallback(BaseCallback):
    """
    Keep the ranks of a data-parallel run in step: the KL controller, the rollout history and stopping.

    At the end of each rollout (place it after the :class:`~sb3_textrl.common.callbacks.KLPenaltyCallback` and the
    :class:`~sb3_textrl.common.callbacks.RolloutHistoryCallback`), it sums the KL and the episode counts over the ranks, puts
    the controller back to its state at the start of the rollout and updates it with the global mean KL per episode
    and the global number of episodes: ``kl_coef`` stays identical on all ranks, as in one process running all the
    episodes. The history's last entry gets the global KL, score and episode count.

    :meth:`request_stop` (e.g. from a SIGINT handler, on any rank) stops all ranks together at the same step: the ranks
    compare their stop flags (one all-reduce of one number) every ``stop_check_every`` steps of a rollout, counted from
    its start, so they agree on where to stop; ``stop_callback.request_stop()`` is then called on rank 0 (an
    :class:`~sb3_textrl.common.training_checkpoints.AtomicCheckpointCallback` placed after this callback, which keeps
    the last rollout boundary to resume from), and ``stopped`` is set.

    :param kl_callback: the run's KL penalty callback
    :param history: the run's rollout history callback
    :param stop_callback: told to stop when the ranks agree to (rank 0's checkpoint callback)
    :param stop_check_every: compare the stop flags every this many steps (default 1: a stop takes one step; a larger
        value saves collectives when steps are very short)
    :param verbose: verbosity level
    """

    def __init__(
        self,
        kl_callback: KLPenaltyCallback | None = None,
        history: RolloutHistoryCallback | None = None,
        stop_callback: BaseCallback | None = None,
        stop_check_every: int = 1,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        self.kl_callback = kl_callback
        self.history = history
        self.stop_callback = stop_callback
        self.stop_requested = False
        self.stopped = False
        self._controller_state: dict | None = None
        self.stop_check_every = stop_check_every
        self._rollout_step = 0
        self._episodes = EpisodeScores()

    def request_stop(self) -> None:
        """Ask all ranks to stop (safe in a signal handler)."""
        self.stop_requested = True

    def _on_rollout_start(self) -> None:
        self._rollout_step = 0
        if self.kl_callback is not None:
            self._controller_state = copy.deepcopy(vars(self.kl_callback.controller))

    def _on_step(self) -> bool:
        self._episodes.collect(self.locals["infos"], self.locals["dones"])
        self._rollout_step += 1
        if (self._rollout_step - 1) % self.stop_check_every:
            return True
        (stop,) = _all_reduce_sum([float(self.stop_requested)], self.model.device)
        if stop > 0:
            self.stopped = True
            if self.stop_callback is not None:
                self.stop_callback.request_stop()  # type: ignore[attr-defined]
            return False
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        n_episodes = int(buffer.episode_starts[1:].sum() + np.sum(self.locals["dones"]))
        last_kl = self.kl_callback.last_kl if self.kl_callback is not None else 0.0
        scores = self._episodes.scores
        kl_sum, episodes, score_sum, n_scores = _all_reduce_sum(
            [last_kl * max(1, n_episodes), n_episodes, float(np.sum(scores)), len(scores)], self.model.device
        )
        self._episodes.clear()
        global_kl = float(kl_sum / max(1.0, episodes))
        if self.kl_callback is not None and self._controller_state is not None:
            controller = self.kl_callback.controller
            controller.__dict__.update(self._controller_state)  # undo the rank-local update
            controller.update(global_kl, int(episodes))
            self.kl_callback.last_kl = global_kl
        if self.history is not None and self.history.history:
            entry = self.history.history[-1]
            entry["score"] = float(score_sum / n_scores) if n_scores else float("nan")
            entry["episodes"] = float(n_scores)
            if self.kl_callback is not None:
                entry["kl"], entry["kl_coef"] = global_kl, self.kl_callback.kl_coef


def reseed_replica(model: BaseAlgorithm, seed: int) -> None:
    """
    Give a rank other than 0 its own random streams after loading rank 0's checkpoint (which restored rank 0's):
    reseed Python, NumPy, torch and the environments with ``seed``, and restart the episodes in flight.

    :param model: the loaded algorithm
    :param seed: this rank's seed (see :func:`rank_seed`)
    """
    set_random_seed(seed)
    env = model.get_env()
    if env is not None:
        env.seed(seed)
        model._last_obs = env.reset()  # type: ignore[assignment]
        model._last_episode_starts = np.ones((env.num_envs,), dtype=bool)


def prepare_model(model: BaseAlgorithm, fsdp: bool = False) -> GradientAverager | ShardedPolicy | None:
    """
    Make ``model`` (built or loaded identically on every rank) a replica of a data-parallel run: broadcast rank 0's
    weights, average gradients across ranks in every backward, and give the rollout buffer equal minibatch counts.

    A no-op (``None``) without a process group of more than one rank. A collective: all ranks call it at the same point.

    :param model: the algorithm, built or loaded identically on every rank
    :param fsdp: shard the gradients and the optimizer state across the ranks with FSDP2 (:mod:`sb3_textrl.distributed.fsdp`)
        instead of keeping a full replica of them on each rank
    :return: the :class:`GradientAverager` (``.remove()`` undoes the hooks), or with ``fsdp`` the
        :class:`~sb3_textrl.distributed.fsdp.ShardedPolicy` (its ``full_state_dict()`` gathers the weights to save)
    :raises ValueError: for ``target_kl`` (its early stop differs between ranks), a rollout buffer whose minibatch
        count may differ between ranks, or with ``fsdp`` a policy FSDP mode refuses
        (:func:`~sb3_textrl.distributed.fsdp.check_fsdp_policy`)
    """
    if world_size() <= 1:
        return None
    if getattr(model, "target_kl", None) is not None:
        raise ValueError(
            f"`target_kl={model.target_kl}` stops an epoch early on some ranks only, which deadlocks distributed "
            "training: use target_kl=None (the KL penalty and clip_range bound the update)."
        )
    buffer = getattr(model, "rollout_buffer", None)
    if type(buffer) is EpisodeRolloutBuffer:
        buffer.__class__ = DistributedEpisodeRolloutBuffer  # same state, equal minibatch counts (the saved class is kept)
    elif type(buffer) not in (RolloutBuffer, DictRolloutBuffer, DistributedEpisodeRolloutBuffer):
        raise ValueError(
            f"The rollout buffer {type(buffer).__name__} may yield different numbers of minibatches on different ranks "
            "(each is a collective): use RolloutBuffer, DictRolloutBuffer or EpisodeRolloutBuffer."
        )
    policy = model.policy
    if fsdp:
        check_fsdp_policy(policy)  # before any collective
    broadcast_module(policy)
    if hasattr(policy, "reset_kv_cache"):
        policy.reset_kv_cache()  # the weights changed in place
    if fsdp:
        return ShardedPolicy(policy)
    return GradientAverager(policy.parameters())
