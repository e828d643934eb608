"""The settings of the main job, ``sb3-textrl train``, in one place: :class:`TrainConfig`. The command line's flags are
generated from its fields (:func:`add_arguments`), the resume check reads their metadata (:data:`RESUME_FIXED_ARGS`),
and ``tests/test_config.py`` keeps the RL Zoo file ``examples/hyperparams/ppo.yml`` equal to the defaults.
:mod:`sb3_textrl.main_job` builds the main job from a config, with the algorithm ``--algo`` names (PPO by default;
A2C, REINFORCE, GRPO or RLOO) and, for GRPO and RLOO, environments in groups of ``--group-size`` completions per prompt.

Each field is one ``--flag`` (the name with ``-`` for ``_``). Its ``metadata`` holds the flag's ``"help"``,
``"fixed_on_resume": True`` when a resumed run must keep the checkpointed value (:data:`RESUME_FIXED_ARGS`),
``"resume_default"``, the value of a setting added later that a checkpoint without it ran with, and ``argparse``
options the type cannot give (``"type"``, ``"choices"``, ``"nargs"``, ``"metavar"``). The type gives the rest: ``bool``
fields are ``store_true`` flags (default ``False``) or ``--flag/--no-flag`` pairs (default ``True``),
``Literal[...]`` gives the choices, ``int`` and ``float`` the ``type``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from sb3_textrl import distributed
from sb3_textrl.common.group_vec_env import check_group_size
from sb3_textrl.common.validation import check_rollout_size
from sb3_textrl.envs.prompts import packaged_prompts

__all__ = [
    "GROUP_ALGOS",
    "RESUME_FIXED_ARGS",
    "TrainConfig",
    "add_arguments",
    "check_resume_args",
    "resume_fixed_fields",
]

# field metadata keys passed on to ``ArgumentParser.add_argument`` as they are
_ARGPARSE_KEYS = ("type", "choices", "nargs", "metavar")

#: the values of ``--algo`` that play the environments in groups of ``--group-size`` (one round per rollout)
GROUP_ALGOS = ("grpo", "rloo")
#: the completions per prompt of GRPO and RLOO when ``group_size`` is not given
DEFAULT_GROUP_SIZE = 4
#: the main job's training budget in generated tokens (env steps) per algorithm, when ``total_timesteps`` is not given:
#: RLOO about 100 rounds of 16 completions (about 375 tokens a round), the others 40 rollouts of 16 envs x 24 steps
#: (docs/learning.md: the benchmark that chose them)
DEFAULT_TOTAL_TIMESTEPS = {"rloo": 37_500, "grpo": 15_360, "ppo": 15_360, "a2c": 15_360, "reinforce": 15_360}


@dataclass
class TrainConfig:
    """
    Every setting of the main job, ``sb3-textrl train``: RLOO('LMPolicy') (or the algorithm ``algo`` names) on
    ``sb3_textrl/TextGeneration-v0`` with a KL penalty to the reference model. The defaults are the command line's;
    each field's ``metadata["help"]`` is its flag's help and says which algorithms use it (the others are not given
    it). ``TrainConfig()`` is the main job as ``sb3-textrl train`` runs it with no arguments.

    :raises ValueError: (on construction) if a number is out of range, the rollout cannot hold a minibatch, ``algo``
        and ``group_size`` do not fit (:meth:`_check_groups`), or ``fsdp=True`` is asked for outside ``torchrun`` or
        together with ``resume`` / ``checkpoint_every``; the message names the ``--flag``
    """

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "LM alias, .gguf file or save_pretrained directory"})
    prompts: str = field(default=packaged_prompts("prompts_train.txt"), metadata={"help": "training prompts, one per line"})
    eval_prompts: str = field(
        default=packaged_prompts("prompts_eval.txt"), metadata={"help": "held-out prompts, one per line"}
    )
    reward: str = field(
        default="vader",
        metadata={"help": "reward function name (see sb3_textrl.rewards.REWARD_REGISTRY)", "fixed_on_resume": True},
    )
    reward_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "JSON object of the named reward's arguments, e.g. "
            '\'{"references": "examples/prompts_with_references.jsonl"}\'',
            "type": json.loads,
            "fixed_on_resume": True,
        },
    )
    algo: Literal["ppo", "a2c", "reinforce", "grpo", "rloo"] = field(
        default="rloo",
        metadata={
            "help": "the RL algorithm; grpo and rloo compare the completions of each prompt (--group-size); rloo is the "
            "default (docs/learning.md: the benchmark that chose it)",
            "fixed_on_resume": True,
        },
    )
    total_timesteps: int | None = field(
        default=None,
        metadata={
            "help": "training budget in generated tokens (env steps); default: the main job's for --algo, 37,500 for rloo "
            "(about 100 rounds of 16 completions), 15,360 for the others (40 rollouts of 16 x 24 steps)"
        },
    )
    max_new_tokens: int = field(default=24, metadata={"help": "completion length limit (tokens)", "fixed_on_resume": True})
    missing_eos_penalty: float = field(
        default=0.0,
        metadata={
            "help": "taken off the reward of a completion cut at --max-new-tokens without EOS (reward units; 0: none)",
            "fixed_on_resume": True,
            "resume_default": 0.0,  # checkpoints from before this flag had no penalty
        },
    )
    n_envs: int = field(
        default=16, metadata={"help": "parallel environments (completions per rollout step)", "fixed_on_resume": True}
    )
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "grpo, rloo: completions per prompt (>= 2, dividing --n-envs): each rollout plays n_envs / G prompts "
            "G times each; default: 4 with grpo and rloo, none with the other algorithms (independent episodes)",
            "metavar": "G",
            "fixed_on_resume": True,
        },
    )
    whole_episodes: bool = field(
        default=True,
        metadata={
            "help": "ppo, a2c, reinforce: play the envs in rounds of --max-new-tokens steps, so that every rollout holds "
            "whole episodes (an env whose completion has ended waits, at no cost, for the round's end; --n-steps must be "
            "a multiple of --max-new-tokens); --no-whole-episodes: each env starts its next episode at once, and a "
            "rollout's end cuts the episodes then running (grpo, rloo: always whole, in groups)",
            "fixed_on_resume": True,
            "resume_default": False,
        },
    )
    n_steps: int | None = field(
        default=None,
        metadata={
            "help": "steps per environment per rollout (default: --max-new-tokens; grpo, rloo: at least that, one round)",
            "fixed_on_resume": True,
        },
    )
    batch_size: int = field(
        default=192,
        metadata={
            "help": "minibatch size in steps (whole episodes): ppo, grpo; reinforce, rloo: gradient accumulation "
            "(one update per rollout); not a2c",
            "fixed_on_resume": True,
        },
    )
    n_epochs: int = field(default=2, metadata={"help": "epochs per rollout (ppo, grpo)", "fixed_on_resume": True})
    learning_rate: float = field(default=2e-5, metadata={"help": "Adam learning rate"})
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "KL penalty coefficient on the rewards, every algorithm (0 disables it)", "fixed_on_resume": True},
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "target KL per completion (nats): adapt the coefficient (Ziegler et al. 2019), starting at --kl-coef",
            "fixed_on_resume": True,
        },
    )
    kl_horizon: int = field(
        default=10_000, metadata={"help": "horizon (episodes) of the adaptive KL controller", "fixed_on_resume": True}
    )
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "per-token KL estimator", "fixed_on_resume": True}
    )
    gamma: float = field(default=1.0, metadata={"help": "discount factor (ppo, a2c, reinforce)", "fixed_on_resume": True})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda (ppo, a2c)", "fixed_on_resume": True})
    clip_range: float = field(
        default=0.2, metadata={"help": "clip range (ppo; grpo: its lower side)", "fixed_on_resume": True}
    )
    clip_range_high: float | None = field(
        default=None,
        metadata={
            "help": "grpo: upper clip range (DAPO's clip-higher, e.g. 0.28); default: --clip-range",
            "fixed_on_resume": True,
        },
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata={"help": "grpo: divide the advantages by the std of the group, batch or none", "fixed_on_resume": True},
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = field(
        default="grpo", metadata={"help": "grpo: how the per-token loss is averaged", "fixed_on_resume": True}
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "grpo, rloo: coefficient of the k3 KL to the reference model in the loss (0: none); on top of --kl-coef",
            "fixed_on_resume": True,
        },
    )
    vf_coef: float = field(
        default=0.1, metadata={"help": "value loss coefficient (ppo, a2c, reinforce)", "fixed_on_resume": True}
    )
    ent_coef: float = field(default=0.0, metadata={"help": "entropy bonus coefficient", "fixed_on_resume": True})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient norm clipping", "fixed_on_resume": True})
    eval_samples: int = field(
        default=8,
        metadata={"help": "sampled completions per held-out prompt, plus one greedy", "fixed_on_resume": True},
    )
    eval_seed: int = field(
        default=0,
        metadata={
            "help": "seed of the held-out evaluations' common random numbers: every evaluation draws the same numbers, "
            "so a change comes from the model, not from sampling",
            "fixed_on_resume": True,
        },
    )
    eval_every: int = field(
        default=50,
        metadata={
            "help": "also evaluate the held-out prompts every N rollouts during training, as before and after (eval/ keys, "
            "OUTPUT_DIR/eval/samples.md and eval_curves.png, from the before point on); 0 disables"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed", "fixed_on_resume": True})
    device: str = field(default="auto", metadata={"help": "torch device: auto, cpu, cuda"})
    output_dir: str = field(
        default="runs/main", metadata={"help": "folder for model.zip, pretrained/, curves.png, results.json"}
    )
    checkpoint_every: int | None = field(
        default=None,
        metadata={
            "help": "write a resumable checkpoint to OUTPUT_DIR/checkpoints every N rollouts (0: only on SIGINT; "
            "default: 0, or the interrupted run's value with --resume)"
        },
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "how many of the newest checkpoints to keep"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the run in --output-dir from its latest checkpoint (same arguments; --total-timesteps may grow)"
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "under torchrun: shard the gradients and the Adam state across the ranks (FSDP2) instead of keeping a "
            "replica of them on each rank; turns prefix sharing off and writes no checkpoints (docs/distributed.md)"
        },
    )
    activation_checkpointing: int = field(
        default=0,
        metadata={
            "help": "recompute every N-th decoder layer in the backward pass instead of keeping its activations (less memory, "
            "slower updates); 0: off",
            "metavar": "N",
            "fixed_on_resume": True,
        },
    )
    no_progress_bar: bool = field(default=False, metadata={"help": "hide SB3's progress bar"})
    verbose: int = field(default=0, metadata={"help": "SB3 verbosity (1 prints the logger's tables)"})

    def __post_init__(self) -> None:
        """Fill in the defaults that depend on ``algo``, then refuse bad settings before any model is loaded; the errors
        name the ``--flag``."""
        if self.group_size is None and self.algo in GROUP_ALGOS:
            self.group_size = DEFAULT_GROUP_SIZE
        if self.total_timesteps is None:
            self.total_timesteps = DEFAULT_TOTAL_TIMESTEPS[self.algo]
        positive = {
            "--total-timesteps": self.total_timesteps,
            "--max-new-tokens": self.max_new_tokens,
            "--n-epochs": self.n_epochs,
            "--eval-samples": self.eval_samples,
            "--keep-checkpoints": self.keep_checkpoints,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        if self.eval_seed < 0:
            raise ValueError(f"`--eval-seed` must be an integer >= 0, got {self.eval_seed}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`--learning-rate` must be > 0, got {self.learning_rate}.")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError(
                f"`--checkpoint-every` (rollouts) must be >= 0, got {self.checkpoint_every}; 0 saves only on SIGINT."
            )
        if self.eval_every < 0:
            raise ValueError(f"`--eval-every` (rollouts) must be >= 0, got {self.eval_every}; 0 disables it.")
        if not self.beta >= 0:
            raise ValueError(f"`--beta` (the KL coefficient in the loss) must be >= 0, got {self.beta}; 0 turns it off.")
        if not 0 <= self.missing_eos_penalty < float("inf"):
            raise ValueError(
                f"`--missing-eos-penalty` (reward units) must be a finite number >= 0, got {self.missing_eos_penalty}; "
                "0 turns it off."
            )
        if self.activation_checkpointing < 0:
            raise ValueError(
                f"`--activation-checkpointing` (every N-th decoder layer) must be >= 0, got {self.activation_checkpointing}; "
                "0 turns it off."
            )
        if self.fsdp:
            if not distributed.launched_distributed():
                raise ValueError(
                    "`--fsdp` shards the training state across ranks: launch with `torchrun --nproc_per_node N`, N > 1."
                )
            if self.resume or self.checkpoint_every:
                flag = "--resume" if self.resume else "--checkpoint-every"
                raise ValueError(
                    f"`{flag}` with `--fsdp`: FSDP mode writes no checkpoints (each rank holds a shard of the Adam state): "
                    "drop the flag, or train without --fsdp."
                )
        self._check_groups()
        self._check_whole_episodes()
        batch_size = None if self.algo == "a2c" else self.batch_size  # A2C takes the whole rollout at once
        check_rollout_size(self.rollout_steps, self.n_envs, batch_size, names=("--n-steps", "--n-envs", "--batch-size"))

    def _check_groups(self) -> None:
        """GRPO and RLOO need a ``--group-size`` (default 4) >= 2 dividing ``--n-envs``, a rollout of one whole round and one
        process."""
        if self.algo not in GROUP_ALGOS:
            if self.group_size:  # None and 0 both mean no groups
                raise ValueError(
                    f"`--group-size` ({self.group_size}) is for --algo grpo or rloo, which compare the completions of a "
                    f"prompt; --algo {self.algo} plays independent episodes: drop --group-size, or use --algo grpo."
                )
            return
        check_group_size(self.group_size, self.n_envs, names=("--group-size", "--n-envs"))
        if self.n_steps is not None and self.n_steps < self.max_new_tokens:
            raise ValueError(
                f"`--n-steps` ({self.n_steps}) must be at least `--max-new-tokens` ({self.max_new_tokens}) for --algo "
                f"{self.algo}: a rollout is one round, a whole completion per env. Leave --n-steps out (it defaults to "
                "--max-new-tokens)."
            )
        if distributed.launched_distributed():
            raise ValueError(
                f"`--algo {self.algo}` under torchrun: data-parallel training needs the same number of minibatches on "
                "every rank, which the group rollout buffers do not give; run GRPO and RLOO in one process, or pass "
                "--algo ppo."
            )

    def _check_whole_episodes(self) -> None:
        """With ``--whole-episodes`` (PPO, A2C, REINFORCE; groups are whole anyway) a rollout holds whole rounds."""
        if self.whole_episodes and self.algo not in GROUP_ALGOS and self.rollout_steps % self.max_new_tokens:
            raise ValueError(
                f"`--n-steps` ({self.n_steps}) must be a multiple of `--max-new-tokens` ({self.max_new_tokens}) with "
                "--whole-episodes (the default): a rollout holds whole rounds of max_new_tokens steps. Leave --n-steps "
                "out (it defaults to --max-new-tokens), or pass --no-whole-episodes."
            )

    @property
    def plays_whole_episodes(self) -> bool:
        """Whether the envs play in rounds of whole episodes without groups (``--whole-episodes``, not GRPO or RLOO)."""
        return self.whole_episodes and self.algo not in GROUP_ALGOS

    @property
    def rollout_steps(self) -> int:
        """The algorithm's ``n_steps``: ``n_steps`` if given, else ``max_new_tokens`` (a rollout = one completion per env)."""
        return self.n_steps or self.max_new_tokens

    @property
    def evaluate_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`~sb3_textrl.common.evaluation.evaluate_prompts` for the held-out evaluation."""
        return dict(
            reward_fn=self.reward,
            reward_kwargs=self.reward_kwargs,
            max_new_tokens=self.max_new_tokens,
            n_samples=self.eval_samples,
            seed=self.eval_seed,
        )

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> TrainConfig:
        """
        The settings parsed by a parser with :func:`add_arguments` (other attributes, such as ``command``, are left out).

        :raises ValueError: as the constructor
        """
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def resume_fixed_fields() -> tuple[str, ...]:
    """The names of the fields marked ``"fixed_on_resume"``, in field order: a resumed run must keep their values."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("fixed_on_resume", False))


#: settings that must not change when a run is resumed (besides the prompts' content), from the fields' metadata
RESUME_FIXED_ARGS = resume_fixed_fields()


def check_resume_args(config: TrainConfig, saved: dict, train_prompts: list[str], eval_prompts: list[str]) -> None:
    """
    The resumed run must be the same run: the same prompts and settings named in :data:`RESUME_FIXED_ARGS`.

    :param config: the resumed run's settings
    :param saved: the checkpoint's extra state (``args``, ``prompts``, ``eval_prompts``)
    :param train_prompts: the resumed run's training prompts
    :param eval_prompts: the resumed run's held-out prompts
    :raises ValueError: naming the first flag or prompt file that differs from the checkpointed run's
    """
    fields = dataclasses.fields(TrainConfig)
    resume_defaults = {f.name: f.metadata["resume_default"] for f in fields if "resume_default" in f.metadata}
    for name in RESUME_FIXED_ARGS:
        if name not in saved["args"] and name not in resume_defaults:
            continue
        if name == "whole_episodes" and config.algo in GROUP_ALGOS:  # groups play whole episodes either way
            continue
        was = saved["args"].get(name, resume_defaults.get(name))
        if was != getattr(config, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"`--resume`: `{flag}` was {was!r} in the checkpointed run, got {getattr(config, name)!r}: "
                "resume with the same arguments (only --total-timesteps, --learning-rate, --model (if the LM moved), "
                "--device, --checkpoint-every, --keep-checkpoints and the output options may change)."
            )
    for flag, prompts, key in (("--prompts", train_prompts, "prompts"), ("--eval-prompts", eval_prompts, "eval_prompts")):
        if saved[key] != prompts:
            raise ValueError(
                f"`--resume`: the prompts of `{flag}` differ from the checkpointed run's: resume with the same prompt file."
            )


def _argument_options(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords for the field ``f`` of type ``hint`` (``X | None`` is read as ``X``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    options: dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
    if hint is bool:
        if not isinstance(f.default, bool):
            raise TypeError(f"`{f.name}`: a bool setting defaults to False (a store_true flag) or True, not {f.default!r}.")
        options["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
    elif typing.get_origin(hint) is Literal:
        options["choices"] = list(typing.get_args(hint))
    elif hint in (int, float):
        options["type"] = hint
    options.update({key: value for key, value in f.metadata.items() if key in _ARGPARSE_KEYS})
    return options


def add_arguments(parser: argparse.ArgumentParser, config_class: type[TrainConfig] = TrainConfig) -> None:
    """
    Add one ``--flag`` per field of ``config_class`` to ``parser`` (``--n-steps`` for ``n_steps``), with the field's
    default, help and type; ``config_class.from_namespace(parser.parse_args(...))`` then gives the settings.

    :param parser: the parser (or sub-parser) to add the flags to
    :param config_class: the dataclass whose fields become flags
    """
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        parser.add_argument("--" + f.name.replace("_", "-"), **_argument_options(f, hints[f.name]))
