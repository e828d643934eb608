"""Data-parallel training (``sb3_textrl.distributed``): 2 ranks on CPU with gloo, spawned with torch.multiprocessing."""

from __future__ import annotations

import os
import socket
import traceback

import numpy as np
import pytest
import torch as th
import torch.distributed as dist
import torch.multiprocessing as mp
from gymnasium import spaces

from sb3_textrl import distributed
from sb3_textrl.distributed import DistributedEpisodeRolloutBuffer, GradientAverager, split_minibatches

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path, *args) -> None:
    """Run ``worker(rank, tmp_path, *args)`` in 2 processes joined like torchrun would join them."""
    port = _free_port()
    mp.spawn(_entry, args=(worker, str(tmp_path), port, args), nprocs=WORLD_SIZE, join=True)
    errors = [p for p in sorted(os.listdir(tmp_path)) if p.startswith("error-")]
    assert not errors, "\n".join(open(os.path.join(tmp_path, p)).read() for p in errors)


def _entry(rank: int, worker, tmp_path: str, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    th.set_num_threads(1)
    try:
        worker(rank, tmp_path, *args)
    except BaseException:
        with open(os.path.join(tmp_path, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        distributed.cleanup_distributed()


def test_split_minibatches():
    episodes = [np.arange(0, 4), np.arange(4, 5), np.arange(5, 8)]
    batches = split_minibatches([episodes], 3)
    assert len(batches) == 3 and all(len(b) > 0 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    # one long episode is cut in the middle
    assert [len(b) for b in split_minibatches([[np.arange(6)]], 2)] == [3, 3]
    with pytest.raises(ValueError, match="Cannot make"):
        split_minibatches([[np.arange(2)]], 3)


def _check_buffer(rank: int, tmp_path: str) -> None:
    """Episodes of other lengths on each rank: equal minibatch counts, and every backward averages the gradients."""
    n_steps, n_envs = 8, 2
    obs_space = spaces.Dict({"input_ids": spaces.Box(0, 9, (4,), np.int64)})
    buffer = DistributedEpisodeRolloutBuffer(n_steps, obs_space, spaces.Discrete(10), n_envs=n_envs)
    buffer.reset()
    # rank 0: 2 episodes of 8 steps (2 minibatches); rank 1: 8 episodes of 2 steps, as when EOS comes early (4 minibatches)
    starts = np.zeros((n_steps, n_envs), dtype=np.float32)
    if rank == 1:
        starts[::2] = 1
    for t in range(n_steps):
        obs = {"input_ids": np.zeros((n_envs, 4))}
        buffer.add(obs, np.zeros((n_envs, 1)), np.zeros(n_envs), starts[t], th.zeros(n_envs), th.zeros(n_envs))
    buffer.compute_returns_and_advantage(th.zeros(n_envs), np.zeros(n_envs))
    module = th.nn.Linear(3, 1)
    distributed.broadcast_module(module)
    averager = GradientAverager(module.parameters())
    counts, n_samples = [], 0
    for _ in range(2):  # epochs
        counts.append(0)
        for batch in buffer.get(batch_size=4):
            counts[-1] += 1
            n_samples += len(batch.actions)
            module.zero_grad()
            module(th.full((1, 3), float(rank + 1))).sum().backward()  # a collective: deadlocks if the counts differ
            # the mean over the ranks of d(w . x)/dw = x, with x = 1 and 2
            assert th.allclose(module.weight.grad, th.full((1, 3), 1.5)), module.weight.grad
    averager.remove()
    assert averager.n_reductions == sum(counts) and n_samples == 2 * n_steps * n_envs
    np.save(os.path.join(tmp_path, f"counts-{rank}.npy"), np.array(counts))


def _check_stop(rank: int, tmp_path: str, model_path: str) -> None:
    """A stop requested on rank 1 alone (as SIGINT would) stops both ranks at the same step; rank 0 checkpoints."""
    from sb3_textrl import cli

    on_rollout_start = distributed.DistributedCallback._on_rollout_start

    def stop_on_rank_1(self):
        on_rollout_start(self)
        if rank == 1 and self.num_timesteps >= 32:
            self.request_stop()

    distributed.DistributedCallback._on_rollout_start = stop_on_rank_1
    argv = ["train", "--model", model_path, "--algo", "ppo", "--total-timesteps", "320", "--n-envs", "2", "--n-steps", "8"]
    argv += ["--batch-size", "8", "--max-new-tokens", "4", "--eval-samples", "1", "--no-progress-bar"]
    try:
        with pytest.raises(cli.TrainingInterrupted) as stop:
            cli.train(cli.build_parser().parse_args([*argv, "--output-dir", os.path.join(tmp_path, "stopped")]))
    finally:
        distributed.DistributedCallback._on_rollout_start = on_rollout_start
    np.save(os.path.join(tmp_path, f"stopped-{rank}.npy"), np.array(stop.value.num_timesteps))


def _worker(rank: int, tmp_path: str, model_path: str) -> None:
    from sb3_textrl import cli

    distributed.setup_distributed("cpu")
    _check_buffer(rank, tmp_path)
    _check_stop(rank, tmp_path, model_path)

    check_in_sync, on_rollout_end = distributed.check_in_sync, distributed.DistributedCallback._on_rollout_end
    kl_coefs = []

    def save_then_check(module):  # every rank's final weights, for the test to compare
        th.save({k: v.clone() for k, v in module.state_dict().items()}, os.path.join(tmp_path, f"weights-{rank}.pt"))
        check_in_sync(module)

    def record_kl_coef(self):
        on_rollout_end(self)
        kl_coefs.append(self.kl_callback.kl_coef)
        np.save(os.path.join(tmp_path, f"actions-{rank}.npy"), self.model.rollout_buffer.actions)

    distributed.check_in_sync = save_then_check
    distributed.DistributedCallback._on_rollout_end = record_kl_coef
    argv = ["train", "--model", model_path, "--algo", "ppo", "--total-timesteps", "32", "--n-envs", "2", "--n-steps", "8"]
    argv += ["--batch-size", "8", "--max-new-tokens", "4", "--eval-samples", "1", "--learning-rate", "1e-3"]
    argv += ["--kl-target", "0.01", "--kl-horizon", "10", "--no-progress-bar", "--output-dir", os.path.join(tmp_path, "run")]
    assert cli.main(argv) == 0
    np.save(os.path.join(tmp_path, f"kl_coefs-{rank}.npy"), np.array(kl_coefs))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_llama_path):
    """One 2-rank run (spawned once for the module): the buffer check, then ``sb3-textrl train`` for 2 PPO iterations."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    _spawn(_worker, tmp_path, tiny_llama_path)
    return tmp_path


def test_equal_minibatch_counts_and_averaged_gradients(two_rank_run):
    counts = [np.load(two_rank_run / f"counts-{rank}.npy") for rank in range(WORLD_SIZE)]
    np.testing.assert_array_equal(counts[0], [4, 4])  # rank 0 split its 2 episodes into 4 minibatches
    np.testing.assert_array_equal(counts[1], [4, 4])


def test_two_ranks_train_identically(two_rank_run, tiny_llama_path):
    from stable_baselines3 import PPO
    from transformers import AutoModelForCausalLM

    tmp_path = two_rank_run
    weights = [th.load(tmp_path / f"weights-{rank}.pt") for rank in range(WORLD_SIZE)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert th.equal(weights[0][name], weights[1][name]), name
    start = AutoModelForCausalLM.from_pretrained(tiny_llama_path).state_dict()
    changed = [k for k, v in start.items() if not th.equal(v, weights[0]["lm." + k])]
    assert changed, "training did not change the LM"
    # rank 0 saved (and evaluated: eval/); the model loads in one process, with the trained weights
    assert sorted(os.listdir(tmp_path / "run")) == ["curves.png", "eval", "model.zip", "pretrained", "results.json"]
    model = PPO.load(tmp_path / "run" / "model.zip", device="cpu")
    for name, value in model.policy.state_dict().items():
        assert th.equal(value, weights[0][name]), name
    assert not dist.is_initialized()


def test_stop_on_one_rank_stops_all(two_rank_run):
    assert int(np.load(two_rank_run / "stopped-0.npy")) == 32  # the last rollout boundary
    assert int(np.load(two_rank_run / "stopped-1.npy")) >= 32
    assert os.listdir(two_rank_run / "stopped" / "checkpoints") == ["rl_model_32_steps.zip"]


def test_kl_coef_identical_across_ranks(two_rank_run):
    kl_coefs = [np.load(two_rank_run / f"kl_coefs-{rank}.npy") for rank in range(WORLD_SIZE)]
    assert len(kl_coefs[0]) == 2
    np.testing.assert_array_equal(kl_coefs[0], kl_coefs[1])
    assert kl_coefs[0][0] != 0.05  # the adaptive controller moved it


def test_ranks_sample_different_episodes(two_rank_run):
    actions = [np.load(two_rank_run / f"actions-{rank}.npy") for rank in range(WORLD_SIZE)]
    assert actions[0].shape == actions[1].shape and not np.array_equal(actions[0], actions[1])


# --- FSDP mode ----------------------------------------------------------------------------------------------------------


def _length_reward(prompts, completions):
    return [len(completion) / 10 for completion in completions]


def _ppo(model_path: str, seed: int, **policy_kwargs):
    from stable_baselines3 import PPO

    from sb3_textrl.common.buffers import EpisodeRolloutBuffer
    from sb3_textrl.common.vec_env import make_text_vec_env

    seed = distributed.rank_seed(seed, 2)
    env_kwargs = dict(model_name_or_path=model_path, prompts=["hi there", "hello you", "what is up"], max_new_tokens=4)
    env = make_text_vec_env(n_envs=2, seed=seed, env_kwargs=dict(env_kwargs, reward_fn=_length_reward))
    return PPO(
        "LMPolicy",
        env,
        n_steps=8,
        batch_size=8,
        learning_rate=1e-3,
        rollout_buffer_class=EpisodeRolloutBuffer,
        seed=seed,
        device="cpu",
        policy_kwargs={"prefix_sharing": False, **policy_kwargs},
    )


def _fsdp_worker(rank: int, tmp_path: str, model_path: str) -> None:
    from sb3_textrl import cli
    from sb3_textrl.distributed.fsdp import ShardedPolicy

    distributed.setup_distributed("cpu")
    with pytest.raises(ValueError, match="prefix_sharing=True"):  # refused before any collective
        distributed.prepare_model(_ppo(model_path, 0, prefix_sharing=True), fsdp=True)
    out = {}
    for fsdp in (True, False):  # the same seeds and data, sharded or replicated training state
        model = _ppo(model_path, 0)
        prepared = distributed.prepare_model(model, fsdp=fsdp)
        assert isinstance(prepared, ShardedPolicy) == fsdp
        model.learn(32)
        out[f"params-{fsdp}"] = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
        out[f"actions-{fsdp}"] = model.rollout_buffer.actions.copy()
        if fsdp:
            out["full"] = prepared.full_state_dict()
    model = _ppo(model_path, 0, activation_checkpointing=True)  # sharded layers, recomputed in backward
    distributed.prepare_model(model, fsdp=True)
    model.learn(32)
    out["params-checkpointed"] = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
    th.save(out, os.path.join(tmp_path, f"api-{rank}.pt"))

    check_in_sync = distributed.check_in_sync

    def save_then_check(module):  # the full weights each rank holds (state_dict() would reshard: parameters only)
        weights = {name: p.detach().clone() for name, p in module.named_parameters()}
        th.save(weights, os.path.join(tmp_path, f"weights-{rank}.pt"))
        check_in_sync(module)

    distributed.check_in_sync = save_then_check
    argv = ["train", "--model", model_path, "--algo", "ppo", "--total-timesteps", "32", "--n-envs", "2", "--n-steps", "8"]
    argv.append("--fsdp")
    argv += ["--batch-size", "8", "--max-new-tokens", "4", "--eval-samples", "1", "--learning-rate", "1e-3"]
    argv += ["--kl-target", "0.01", "--kl-horizon", "10", "--eval-every", "1", "--no-progress-bar"]
    assert cli.main([*argv, "--output-dir", os.path.join(tmp_path, "run")]) == 0


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_llama_path):
    """One 2-rank FSDP session: PPO.learn with FSDP and with gradient averaging, then ``sb3-textrl train --fsdp``."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    _spawn(_fsdp_worker, tmp_path, tiny_llama_path)
    return tmp_path


def test_fsdp_ranks_hold_equal_trained_weights(fsdp_run, tiny_llama_path):
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_llama_path).state_dict()
    for prefix in ("api", "weights"):  # PPO.learn, and the CLI run
        if prefix == "api":
            weights = [th.load(fsdp_run / f"api-{rank}.pt", weights_only=False)["params-True"] for rank in range(WORLD_SIZE)]
        else:
            weights = [th.load(fsdp_run / f"weights-{rank}.pt") for rank in range(WORLD_SIZE)]
        assert weights[0].keys() == weights[1].keys()
        for name in weights[0]:
            assert type(weights[0][name]) is th.Tensor, name  # the full parameters, not DTensor shards
            assert th.equal(weights[0][name], weights[1][name]), name
        changed = [k for k, v in start.items() if "lm." + k in weights[0] and not th.equal(v, weights[0]["lm." + k])]
        assert changed, f"{prefix}: training did not change the LM"


def test_fsdp_matches_gradient_averaging(fsdp_run):
    """Same seeds, same episodes: sharded and replicated training states give the same weights (up to rounding)."""
    runs = [th.load(fsdp_run / f"api-{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    for run in runs:
        np.testing.assert_array_equal(run["actions-True"], run["actions-False"])
        for name, value in run["params-False"].items():
            assert th.allclose(run["params-True"][name], value, rtol=0, atol=1e-6), name
    # the gathered state dict (rank 0 only) is a single-process policy's, tied LM head included
    full, replicated = runs[0]["full"], runs[0]["params-False"]
    assert runs[1]["full"] == {}
    assert "lm.lm_head.weight" in full and full.keys() >= replicated.keys()
    for name, value in replicated.items():
        assert th.allclose(full[name], value, rtol=0, atol=1e-6), name


def test_fsdp_with_activation_checkpointing_trains_identically(fsdp_run):
    for rank in range(WORLD_SIZE):
        run = th.load(fsdp_run / f"api-{rank}.pt", weights_only=False)
        assert run["params-checkpointed"].keys() == run["params-True"].keys()
        for name, weight in run["params-True"].items():
            th.testing.assert_close(run["params-checkpointed"][name], weight, atol=1e-6, rtol=1e-5)


def test_fsdp_saved_model_loads_in_one_process(fsdp_run):
    from stable_baselines3 import PPO
    from transformers import AutoModelForCausalLM

    weights = th.load(fsdp_run / "weights-0.pt")
    assert sorted(os.listdir(fsdp_run / "run")) == ["curves.png", "eval", "model.zip", "pretrained", "results.json"]
    model = PPO.load(fsdp_run / "run" / "model.zip", device="cpu")
    for name, value in model.policy.named_parameters():
        assert th.equal(value, weights[name]), name
    assert not model.policy.optimizer.state  # the sharded Adam moments are not saved
    exported = AutoModelForCausalLM.from_pretrained(fsdp_run / "run" / "pretrained").state_dict()
    for name, value in exported.items():
        assert th.equal(value, weights["lm." + name] if "lm." + name in weights else weights["lm.model.embed_tokens.weight"])
    assert not dist.is_initialized()


def test_fsdp_refusals(tiny_llama_path):
    from sb3_textrl import cli, config
    from sb3_textrl.distributed.fsdp import check_fsdp_policy

    model = _ppo(tiny_llama_path, 0, prefix_sharing=True)
    with pytest.raises(ValueError, match=r"prefix_sharing=True.*policy_kwargs=dict\(prefix_sharing=False\)"):
        check_fsdp_policy(model.policy)
    argv = ["train", "--model", tiny_llama_path, "--fsdp"]
    with pytest.raises(ValueError, match="torchrun"):
        config.TrainConfig.from_namespace(cli.build_parser().parse_args(argv))
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(ValueError, match=r"--checkpoint-every.*--fsdp"):
            config.TrainConfig.from_namespace(cli.build_parser().parse_args([*argv, "--checkpoint-every", "2"]))
    finally:
        del os.environ["WORLD_SIZE"]
