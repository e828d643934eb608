"""The main job's settings have one source, :class:`sb3_textrl.config.TrainConfig`: the CLI's flags and defaults come
from its fields, the resume check from their metadata, and ``examples/hyperparams/ppo.yml`` must set the same values as
the main job passes to PPO, the environments and the KL callback (``grpo.yml``, ``rloo.yml`` and ``reinforce.yml`` as
``--algo`` passes to theirs)."""

import argparse
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

from sb3_textrl import cli, config, main_job
from sb3_textrl.common.callbacks import KLPenaltyCallback
from sb3_textrl.config import (
    GROUP_ALGOS,
    RESUME_FIXED_ARGS,
    TrainConfig,
    add_arguments,
    check_resume_args,
)
from sb3_textrl.envs.prompts import read_prompts
from sb3_textrl.envs.text_generation import TextGenerationEnv
from sb3_textrl.main_job import make_kl_callback
from sb3_textrl.policies import CausalLMActorCriticPolicy

HYPERPARAMS = Path(__file__).resolve().parents[1] / "examples" / "hyperparams"
PPO_YML = HYPERPARAMS / "ppo.yml"
TEXT_ENV = "sb3_textrl/TextGeneration-v0"
# keys of the YAML's main-job section that are PPO keywords (compared with what make_model passes to PPO)
YAML_PPO_KEYS = {
    "policy", "n_steps", "batch_size", "n_epochs", "learning_rate", "gamma", "gae_lambda", "clip_range", "vf_coef",
    "ent_coef", "max_grad_norm", "rollout_buffer_class", "policy_kwargs",
}  # fmt: skip
# keys that are not settings of TrainConfig: how the zoo builds what make_text_vec_env builds
YAML_STRUCTURAL_KEYS = {"env_wrapper", "vec_env_wrapper"}
# the flags of `sb3-textrl train`, in order: those from before TrainConfig generated them, plus --algo, --group-size
# and GRPO's --clip-range-high, --scale-rewards, --loss-type and --beta
FLAGS = [
    "--model", "--prompts", "--eval-prompts", "--reward", "--reward-kwargs", "--algo", "--total-timesteps",
    "--max-new-tokens", "--missing-eos-penalty", "--n-envs", "--group-size", "--whole-episodes", "--n-steps",
    "--batch-size", "--n-epochs", "--learning-rate",
    "--kl-coef", "--kl-target", "--kl-horizon", "--kl-estimator", "--gamma", "--gae-lambda", "--clip-range",
    "--clip-range-high", "--scale-rewards", "--loss-type", "--beta", "--vf-coef", "--ent-coef", "--max-grad-norm",
    "--eval-samples", "--eval-seed", "--eval-every", "--seed", "--device", "--output-dir", "--checkpoint-every",
    "--keep-checkpoints",
    "--resume", "--fsdp", "--activation-checkpointing", "--no-progress-bar", "--verbose",
]  # fmt: skip
GROUP_MEMBER = "sb3_textrl.common.group_vec_env.GroupMemberWrapper"
GROUPED_VEC_ENV = "sb3_textrl.common.group_vec_env.GroupedVecEnv"
BATCHED_REWARD = "sb3_textrl.common.vec_env.BatchedRewardVecEnv"
WHOLE_EPISODES = "sb3_textrl.common.whole_episodes.WholeEpisodeVecEnv"


def main_job_yaml(name: str = "ppo") -> dict:
    with open(HYPERPARAMS / f"{name}.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)[TEXT_ENV]


def main_job_ppo_kwargs(monkeypatch, job: TrainConfig | None = None) -> dict:
    """The keywords ``make_model(job, env)`` passes to its algorithm (default: ``PPO`` for ``TrainConfig(algo="ppo")``),
    with the policy as ``policy``."""
    job = job or TrainConfig(algo="ppo")
    calls = []
    # the algorithm classes are main_job's names PPO, A2C, REINFORCE, GRPO, RLOO
    monkeypatch.setattr(main_job, job.algo.upper(), lambda policy, env, **kwargs: calls.append(dict(policy=policy, **kwargs)))
    main_job.make_model(job, env=None)
    return calls[0]


def main_job_env_kwargs(monkeypatch, job: TrainConfig | None = None) -> dict:
    """The keywords ``make_env(job, prompts, seed)`` passes to ``make_text_vec_env`` (default: ``--algo ppo``)."""
    job = job or TrainConfig(algo="ppo")
    calls = []
    monkeypatch.setattr(main_job, "make_text_vec_env", lambda **kwargs: calls.append(kwargs))
    main_job.make_env(job, read_prompts(job.prompts, "--prompts"), seed=job.seed)
    return calls[0]


def kl_callback_state(callback: KLPenaltyCallback) -> tuple:
    return type(callback.controller), vars(callback.controller), callback.estimator


def test_the_main_job_is_rloo_in_groups_of_4():
    """``sb3-textrl train`` with no arguments: RLOO, 4 completions per prompt, about 100 rounds; the budget and the
    group size depend on ``--algo`` when they are not given."""
    assert TrainConfig() == TrainConfig(algo="rloo", group_size=4, total_timesteps=37_500)
    assert (TrainConfig(algo="grpo").group_size, TrainConfig(algo="grpo").total_timesteps) == (4, 15_360)
    assert (TrainConfig(algo="ppo").group_size, TrainConfig(algo="ppo").total_timesteps) == (None, 15_360)
    assert TrainConfig(algo="ppo", total_timesteps=96).total_timesteps == 96


def test_ppo_yml_is_the_ppo_job(monkeypatch):
    """Each value ppo.yml sets for TextGeneration-v0 is the one ``sb3-textrl train --algo ppo`` uses."""
    section = main_job_yaml()
    unknown = set(section) - YAML_PPO_KEYS - YAML_STRUCTURAL_KEYS - {"n_envs", "n_timesteps", "env_kwargs", "callback"}
    assert not unknown, f"ppo.yml sets {unknown}: map them to TrainConfig fields in this test"
    defaults = TrainConfig(algo="ppo")
    assert section["n_timesteps"] == defaults.total_timesteps

    ppo_kwargs = main_job_ppo_kwargs(monkeypatch)
    for key in YAML_PPO_KEYS & set(section):
        value = section[key]
        if key == "rollout_buffer_class":
            module, name = value.rsplit(".", 1)
            value = getattr(importlib.import_module(module), name)
        if key == "policy_kwargs":  # the zoo's "dict(...)" string, compared below
            continue
        assert value == ppo_kwargs[key], f"ppo.yml {key}: {value!r}, main job: {ppo_kwargs[key]!r}"
    assert set(ppo_kwargs) - {"policy_kwargs"} <= set(section), "a PPO keyword of the main job is missing in ppo.yml"
    # each policy keyword of the main job: the YAML's value, or the policy's default where the YAML sets none
    yaml_policy_kwargs = eval(section.get("policy_kwargs", "dict()"), {"__builtins__": {}, "dict": dict})  # as the zoo
    policy_defaults = inspect.signature(CausalLMActorCriticPolicy).parameters
    for name, value in ppo_kwargs["policy_kwargs"].items():
        assert yaml_policy_kwargs.get(name, policy_defaults[name].default) == value, f"policy_kwargs {name}"

    vec_env_kwargs = main_job_env_kwargs(monkeypatch)
    assert section["n_envs"] == vec_env_kwargs["n_envs"]
    # rounds of whole episodes, as make_text_vec_env(..., whole_episodes=True) builds them, or independent episodes
    round_wrappers = [BATCHED_REWARD, {WHOLE_EPISODES: {"round_steps": defaults.max_new_tokens}}]
    assert vec_env_kwargs["whole_episodes"] is defaults.whole_episodes
    assert section["vec_env_wrapper"] == (round_wrappers if defaults.whole_episodes else BATCHED_REWARD)
    assert section.get("env_wrapper") == (GROUP_MEMBER if defaults.whole_episodes else None)
    env_kwargs = dict(section["env_kwargs"])
    assert env_kwargs.pop("defer_scoring") is True  # make_text_vec_env defers the scoring to its wrapper
    env_defaults = {name: p.default for name, p in inspect.signature(TextGenerationEnv).parameters.items()}

    def spelt(kwargs: dict) -> dict:  # the keywords that do not leave the env its default
        return {k: v for k, v in kwargs.items() if v is not None and not (k in env_defaults and v == env_defaults[k])}

    assert spelt(env_kwargs) == spelt(vec_env_kwargs["env_kwargs"])

    [callback] = section["callback"]
    assert list(callback) == ["sb3_textrl.KLPenaltyCallback"]
    yaml_callback = KLPenaltyCallback(**callback["sb3_textrl.KLPenaltyCallback"])
    assert kl_callback_state(yaml_callback) == kl_callback_state(make_kl_callback(defaults))


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce"])
def test_algo_yml_is_the_cli_job(monkeypatch, algo):
    """``<algo>.yml`` sets what ``sb3-textrl train --algo <algo>`` passes (``--group-size`` as the YAML's groups) and
    its budget, and ppo.yml's LM, reward, prompts, KL callback and batched scoring."""
    section, main_job = main_job_yaml(algo), main_job_yaml()
    group_size = None
    if algo in GROUP_ALGOS:
        assert section.pop("env_wrapper") == GROUP_MEMBER
        batched, grouped = section.pop("vec_env_wrapper")
        assert batched == BATCHED_REWARD and list(grouped) == [GROUPED_VEC_ENV]  # GroupedVecEnv outermost
        group_size = grouped[GROUPED_VEC_ENV]["group_size"]
    else:  # the main job's rounds of whole episodes
        assert section.pop("vec_env_wrapper") == main_job["vec_env_wrapper"]
        assert section.pop("env_wrapper") == main_job["env_wrapper"]
    job = TrainConfig(algo=algo, group_size=group_size)
    assert main_job_env_kwargs(monkeypatch, job)["whole_episodes"] is (algo not in GROUP_ALGOS)
    assert section.pop("n_timesteps") == job.total_timesteps
    for key in ("n_envs", "env_kwargs", "callback"):
        assert section.pop(key) == main_job[key], key
    assert main_job_env_kwargs(monkeypatch, job)["group_size"] == group_size

    kwargs = main_job_ppo_kwargs(monkeypatch, job)
    assert kwargs.pop("policy_kwargs") == main_job_ppo_kwargs(monkeypatch)["policy_kwargs"]
    if "rollout_buffer_class" in section:
        module, name = section["rollout_buffer_class"].rsplit(".", 1)
        section["rollout_buffer_class"] = getattr(importlib.import_module(module), name)
    assert set(section) <= set(kwargs), f"{algo}.yml sets keywords the CLI job does not pass: {set(section) - set(kwargs)}"
    assert {key: section.get(key) for key in kwargs} == kwargs  # None: the algorithm's default, left out of the YAML


def test_parser_defaults_are_the_dataclass_defaults():
    args = cli.build_parser().parse_args(["train"])
    assert args.command == "train"
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # None: filled in for --algo
    assert {k: v for k, v in vars(args).items() if k != "command"} == defaults
    assert TrainConfig.from_namespace(args) == TrainConfig()


def test_flags():
    """Every field is a flag, spelled as before; types, choices, store_true flags and metavars come from the fields."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    assert [a.option_strings[0] for a in parser._actions[1:]] == FLAGS
    assert [a.dest for a in parser._actions[1:]] == [f.name for f in dataclasses.fields(TrainConfig)]
    argv = ["--reward-kwargs", '{"references": "x.jsonl"}', "--kl-estimator", "k3", "--n-steps", "12", "--kl-target", "0.5"]
    argv += ["--resume", "--no-progress-bar", "--activation-checkpointing", "2", "--no-whole-episodes"]
    args = parser.parse_args(argv)
    assert args.reward_kwargs == {"references": "x.jsonl"} and args.kl_estimator == "k3"
    assert args.n_steps == 12 and args.kl_target == 0.5 and args.resume and args.no_progress_bar and not args.fsdp
    assert args.whole_episodes is False and parser.parse_args([]).whole_episodes is True  # a --flag/--no-flag pair
    assert TrainConfig.from_namespace(parser.parse_args([*argv, "--algo", "ppo"])).activation_checkpointing == 2
    with pytest.raises(ValueError, match=r"`--n-steps` \(12\) must be a multiple of `--max-new-tokens` \(24\)"):
        TrainConfig(algo="ppo", n_steps=12)
    argv = [
        "--algo",
        "grpo",
        "--group-size",
        "4",
        "--scale-rewards",
        "none",
        "--loss-type",
        "dapo",
        "--clip-range-high",
        "0.28",
    ]
    args = parser.parse_args([*argv, "--beta", "0.04"])
    assert (args.algo, args.group_size, args.scale_rewards, args.loss_type) == ("grpo", 4, "none", "dapo")
    assert args.clip_range_high == 0.28 and args.beta == 0.04 and TrainConfig.from_namespace(args).group_size == 4
    for bad in (["--kl-estimator", "k2"], ["--algo", "dqn"], ["--scale-rewards", "std"], ["--loss-type", "bnpo"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "-h, --help" in parser.format_help() and "--activation-checkpointing N" in parser.format_help()
    assert "(default: smollm2-135m-instruct)" in parser.format_help()


def test_resume_fixed_args_come_from_the_metadata():
    fixed = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("fixed_on_resume"))
    assert RESUME_FIXED_ARGS == fixed == config.resume_fixed_fields()
    assert RESUME_FIXED_ARGS == (
        "reward", "reward_kwargs", "algo", "max_new_tokens", "missing_eos_penalty", "n_envs", "group_size", "whole_episodes",
        "n_steps",
        "batch_size", "n_epochs",
        "kl_coef", "kl_target", "kl_horizon", "kl_estimator", "gamma", "gae_lambda", "clip_range", "clip_range_high",
        "scale_rewards", "loss_type", "beta", "vf_coef", "ent_coef", "max_grad_norm", "eval_samples", "eval_seed", "seed",
        "activation_checkpointing",
    )  # fmt: skip

    current, prompts = TrainConfig(algo="ppo"), ["Write one sentence about rain."]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(current, f.name)
        other = "other" if isinstance(value, str) else {"x": 1} if f.name == "reward_kwargs" else (value or 0) + 1
        saved = dict(args={**dataclasses.asdict(current), f.name: other}, prompts=prompts, eval_prompts=prompts)
        if f.name in RESUME_FIXED_ARGS:
            flag = "--" + f.name.replace("_", "-")
            with pytest.raises(ValueError, match=re.escape(f"`{flag}` was {other!r} in the checkpointed run")):
                check_resume_args(current, saved, prompts, prompts)
        else:
            check_resume_args(current, saved, prompts, prompts)


def test_resume_of_a_checkpoint_from_before_whole_episodes():
    """A checkpoint without ``whole_episodes`` ran with cut episodes: it resumes with --no-whole-episodes only (GRPO and
    RLOO, whose groups are whole either way, resume as before)."""
    prompts = ["Write one sentence about rain."]

    def saved(job):
        args = {k: v for k, v in dataclasses.asdict(job).items() if k != "whole_episodes"}
        return dict(args=args, prompts=prompts, eval_prompts=prompts)

    ppo = TrainConfig(algo="ppo")
    with pytest.raises(ValueError, match="`--whole-episodes` was False in the checkpointed run, got True"):
        check_resume_args(ppo, saved(ppo), prompts, prompts)
    check_resume_args(TrainConfig(algo="ppo", whole_episodes=False), saved(ppo), prompts, prompts)
    grpo = TrainConfig(algo="grpo", group_size=4)
    check_resume_args(grpo, saved(grpo), prompts, prompts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total_timesteps=0), "`--total-timesteps` must be a positive integer, got 0"),
        (dict(learning_rate=0.0), "`--learning-rate` must be > 0"),
        (dict(checkpoint_every=-1), "`--checkpoint-every` .* must be >= 0"),
        (dict(eval_every=-1), "`--eval-every` .* must be >= 0"),
        (dict(batch_size=512), r"`--batch-size` \(512\) is larger than a rollout, `--n-steps \* --n-envs`"),
        (dict(fsdp=True), "torchrun"),
        (dict(beta=-0.1), "`--beta` .* must be >= 0"),
        (dict(missing_eos_penalty=-1.0), "`--missing-eos-penalty` .* must be a finite number >= 0"),
        (dict(missing_eos_penalty=float("nan")), "`--missing-eos-penalty` .* must be a finite number >= 0"),
        (dict(algo="grpo", n_envs=6), r"`--group-size` \(4\) must divide `--n-envs` \(6\).* --n-envs=8"),
        (dict(algo="rloo", group_size=1), "`--group-size` must be an integer >= 2.* got 1: e.g. --group-size=4"),
        (dict(algo="grpo", group_size=3), r"`--group-size` \(3\) must divide `--n-envs` \(16\).* --n-envs=15"),
        (dict(algo="grpo", group_size=4, n_steps=8), r"`--n-steps` \(8\) must be at least `--max-new-tokens` \(24\)"),
        (dict(algo="ppo", group_size=4), "`--group-size` .* is for --algo grpo or rloo.* drop --group-size"),
        (dict(algo="a2c", group_size=2), "`--group-size`"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "algo, group_size, expected",
    [
        ("ppo", 0, {"batch_size", "n_epochs", "gamma", "gae_lambda", "clip_range", "vf_coef", "rollout_buffer_class"}),
        ("a2c", None, {"gamma", "gae_lambda", "vf_coef", "use_rms_prop", "rollout_buffer_class"}),
        ("reinforce", None, {"batch_size", "gamma", "vf_coef", "rollout_buffer_class"}),
        ("grpo", 4, {"batch_size", "n_epochs", "clip_range", "clip_range_high", "scale_rewards", "loss_type", "beta"}),
        ("rloo", 2, {"batch_size", "beta"}),
    ],
)
def test_algorithm_kwargs(algo, group_size, expected):
    """Each algorithm gets only the settings it takes; n_steps is --max-new-tokens (one round for GRPO and RLOO)."""
    job = TrainConfig(algo=algo, group_size=group_size, n_envs=8, batch_size=64, clip_range_high=0.28, beta=0.04)
    kwargs = main_job.algorithm_kwargs(job)
    assert set(kwargs) == {"learning_rate", "n_steps", "ent_coef", "max_grad_norm"} | expected
    assert kwargs["n_steps"] == job.max_new_tokens == 24 and kwargs.get("batch_size", 64) == 64
    if algo == "grpo":
        assert (kwargs["clip_range_high"], kwargs["beta"], kwargs["scale_rewards"], kwargs["loss_type"]) == (
            0.28,
            0.04,
            "group",
            "grpo",
        )
    assert TrainConfig(algo=algo, group_size=group_size, n_steps=48).rollout_steps == 48  # longer rollouts are allowed
