"""
RL Baselines3 Zoo hooks for ``LMPolicy`` (https://github.com/DLR-RM/rl-baselines3-zoo).

Passing ``--gym-packages sb3_textrl.zoo`` to ``python -m rl_zoo3.train`` imports :mod:`sb3_textrl` (which registers the
``sb3_textrl/`` environments and the ``"LMPolicy"`` alias, all that ``--gym-packages sb3_textrl`` does) and then
:func:`install` adds what the zoo lacks for language models:

- The evaluation env (the ``EvalCallback`` of training, each ``--optimize`` trial's evaluation) gets the YAML's
  ``env_kwargs``, as the training env does; rl_zoo3 2.9.2 builds it from the command line's ``--env-kwargs`` only
  (without this hook: ``TypeError: ... missing 2 required positional arguments: 'model_name_or_path' and 'prompts'``).
  ``--eval-env-kwargs`` still overrides it.
- ``rollout_buffer_class`` and ``rollout_buffer_kwargs`` given as strings in the YAML are resolved, as the zoo already
  does for ``replay_buffer_class``: ``rollout_buffer_class: sb3_textrl.common.buffers.EpisodeRolloutBuffer``.
- ``--optimize`` samples LM fine-tuning hyperparameters (:func:`sample_ppo_lm_params`, :func:`sample_a2c_lm_params`)
  when the policy is ``LMPolicy``. The zoo's own samplers draw ``n_steps`` up to 4096, ``n_epochs`` up to 20 and
  learning rates up to 2e-3, and replace the YAML's whole ``policy_kwargs`` with ``net_arch``/``activation_fn`` (which
  ``LMPolicy`` ignores). The LM samplers leave ``n_steps``, ``batch_size``, ``gamma`` and ``policy_kwargs`` as the YAML
  sets them. Other policies (``MlpPolicy`` on ``LinearToy-v0``...) keep the zoo's samplers. GRPO, RLOO and REINFORCE,
  which the zoo has no sampler for, get :func:`sample_grpo_params` and :func:`sample_reinforce_params`.
- The zoo's ``ALGOS`` get ``grpo``, ``rloo`` and ``reinforce`` (:data:`ZOO_ALGOS`). rl_zoo3 2.9.2 checks ``--algo``
  against ``ALGOS`` before it imports ``--gym-packages``, so these run through this module's command line, which
  installs the hooks first and then runs the zoo's own (:func:`main`)::

      python -m sb3_textrl.zoo train --algo grpo --env sb3_textrl/TextGeneration-v0 --conf-file grpo.yml
      python -m sb3_textrl.zoo enjoy --algo grpo --env sb3_textrl/TextGeneration-v0 -f logs

- GRPO and RLOO train on groups: the YAML wraps each env in ``GroupMemberWrapper`` (``env_wrapper``) and the
  ``VecEnv`` in ``GroupedVecEnv`` (last in ``vec_env_wrapper``, with ``group_size``), as
  ``make_text_vec_env(..., group_size=G)`` does. The evaluation env (``EvalCallback``) and ``enjoy``'s env play
  independent episodes: they are built without those two wrappers (:func:`strip_group_wrappers`). PPO and REINFORCE
  train on rounds of whole episodes in the same way (``GroupMemberWrapper`` and ``WholeEpisodeVecEnv``, as
  ``make_text_vec_env(..., whole_episodes=True)``), also left out of the evaluation env.

Nothing changes for the zoo until ``install()`` runs; it runs once, on import, and is idempotent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import optuna
import rl_zoo3.enjoy
from rl_zoo3 import hyperparams_opt
from rl_zoo3.exp_manager import ExperimentManager
from rl_zoo3.utils import ALGOS, get_class_by_name, get_wrapper_class
from stable_baselines3.common.base_class import BaseAlgorithm

import sb3_textrl  # noqa: F401  (registers the environments and the "LMPolicy" alias)
from sb3_textrl.grpo import GRPO
from sb3_textrl.policies import CausalLMActorCriticPolicy
from sb3_textrl.reinforce import REINFORCE
from sb3_textrl.rloo import RLOO

__all__ = [
    "GROUP_WRAPPERS",
    "LM_POLICY_NAMES",
    "LM_SAMPLERS",
    "ZOO_ALGOS",
    "ZOO_ALGO_SAMPLERS",
    "Sampler",
    "convert_lm_params",
    "install",
    "is_lm_policy",
    "main",
    "resolve_rollout_buffer",
    "sample_a2c_lm_params",
    "sample_grpo_params",
    "sample_ppo_lm_params",
    "sample_reinforce_params",
    "strip_group_wrappers",
    "uses_lm_policy",
]

#: the algorithms :func:`install` adds to the zoo's ``ALGOS`` (``--algo``)
ZOO_ALGOS: dict[str, type[BaseAlgorithm]] = {"grpo": GRPO, "rloo": RLOO, "reinforce": REINFORCE}

#: the wrappers that make the envs play in rounds, of groups or of whole episodes (``env_wrapper`` and
#: ``vec_env_wrapper`` entries of a zoo YAML), left out of the evaluation env and of ``enjoy``'s env
GROUP_WRAPPERS = ("GroupMemberWrapper", "GroupedVecEnv", "WholeEpisodeVecEnv")

#: an Optuna sampler of the zoo: ``(trial, n_actions, n_envs, additional_args) -> hyperparameters``
Sampler = Callable[[optuna.Trial, int, int, dict], dict[str, Any]]

#: the ``policy`` entries of a zoo YAML that name ``LMPolicy`` (alone or as the last part of an import path)
LM_POLICY_NAMES = ("LMPolicy", "CausalLMActorCriticPolicy")

#: whether the zoo experiment of this process uses ``LMPolicy`` (one experiment per zoo process): the samplers installed
#: by :func:`install` draw with the LM samplers when it is ``True``, with the zoo's own otherwise. Set when the zoo reads
#: the experiment's hyperparameters (the patched ``ExperimentManager._preprocess_hyperparams``).
uses_lm_policy = False


def is_lm_policy(policy: Any) -> bool:
    """Whether a zoo ``policy`` entry (an alias, an import path or a class) names ``LMPolicy``."""
    if isinstance(policy, str):
        return policy.rsplit(".", 1)[-1] in LM_POLICY_NAMES
    return isinstance(policy, type) and issubclass(policy, CausalLMActorCriticPolicy)


def resolve_rollout_buffer(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """
    Resolve ``rollout_buffer_class`` (an import path) and ``rollout_buffer_kwargs`` (a Python ``dict(...)`` string) of
    a zoo hyperparameter dict, in place, as the zoo does for ``replay_buffer_class`` and ``replay_buffer_kwargs``.

    :param hyperparams: the hyperparameters of one environment, as read from the YAML
    :return: ``hyperparams``
    """
    if isinstance(hyperparams.get("rollout_buffer_class"), str):
        hyperparams["rollout_buffer_class"] = get_class_by_name(hyperparams["rollout_buffer_class"])
    if isinstance(hyperparams.get("rollout_buffer_kwargs"), str):
        hyperparams["rollout_buffer_kwargs"] = eval(hyperparams["rollout_buffer_kwargs"])
    return hyperparams


def _wrapper_entries(value: Any) -> list[Any]:
    """The entries of an ``env_wrapper``/``vec_env_wrapper`` value: none, one, or a list."""
    return [] if value is None else value if isinstance(value, list) else [value]


def _wrapper_name(entry: Any) -> str:
    """The class name of an ``env_wrapper``/``vec_env_wrapper`` entry: an import path, ``{path: kwargs}`` or a class."""
    if isinstance(entry, dict):
        entry = next(iter(entry))
    return entry.__name__ if isinstance(entry, type) else str(entry).rsplit(".", 1)[-1]


def strip_group_wrappers(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """
    A copy of a zoo hyperparameter dict whose ``env_wrapper`` and ``vec_env_wrapper`` leave out the group wrappers
    (:data:`GROUP_WRAPPERS`): the same envs, playing independent episodes (for evaluation and ``enjoy``).

    :param hyperparams: the hyperparameters of one environment, as read from the YAML (or the run's ``config.yml``)
    :return: the copy (``hyperparams`` itself is left as it is)
    """
    stripped = dict(hyperparams)
    for key in ("env_wrapper", "vec_env_wrapper"):
        entries = _wrapper_entries(stripped.get(key))
        kept = [entry for entry in entries if _wrapper_name(entry) not in GROUP_WRAPPERS]
        if len(kept) == len(entries):
            continue
        if kept:
            stripped[key] = kept
        else:
            del stripped[key]
    return stripped


def _uses_groups(hyperparams: dict[str, Any]) -> bool:
    entries = [*_wrapper_entries(hyperparams.get("env_wrapper")), *_wrapper_entries(hyperparams.get("vec_env_wrapper"))]
    return any(_wrapper_name(entry) in GROUP_WRAPPERS for entry in entries)


# the choices every sampler of this module draws from, shared so that the algorithms are searched alike
_ENT_COEFS, _MAX_GRAD_NORMS, _N_EPOCHS, _CLIP_RANGES = [0.0, 1e-3, 1e-2], [0.5, 1.0, 2.0], [1, 2, 4], [0.1, 0.2, 0.3]


def _sample_lm_common(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "ent_coef": trial.suggest_categorical("ent_coef", _ENT_COEFS),
        "vf_coef": trial.suggest_float("vf_coef", 0.05, 0.5, log=True),
        "gae_lambda": trial.suggest_categorical("gae_lambda", [0.9, 0.95, 1.0]),
        "max_grad_norm": trial.suggest_categorical("max_grad_norm", _MAX_GRAD_NORMS),
    }


def sample_ppo_lm_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Optuna sampler for PPO fine-tuning an LM: ``learning_rate`` in [1e-6, 1e-4] (log), ``n_epochs`` in {1, 2, 4},
    ``clip_range`` in {0.1, 0.2, 0.3}, ``ent_coef`` in {0, 1e-3, 1e-2}, ``vf_coef`` in [0.05, 0.5] (log),
    ``gae_lambda`` in {0.9, 0.95, 1} and ``max_grad_norm`` in {0.5, 1, 2}.

    The parameters carry SB3's names, so a trial's ``params`` are the hyperparameters (:func:`convert_lm_params` is the
    identity). ``n_steps``, ``batch_size``, ``gamma`` and ``policy_kwargs`` come from the YAML.
    """
    return {
        **_sample_lm_common(trial),
        "n_epochs": trial.suggest_categorical("n_epochs", _N_EPOCHS),
        "clip_range": trial.suggest_categorical("clip_range", _CLIP_RANGES),
    }


def sample_a2c_lm_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """Optuna sampler for A2C (and TRPO's shared arguments) fine-tuning an LM: :func:`sample_ppo_lm_params` without
    ``n_epochs`` and ``clip_range``."""
    return _sample_lm_common(trial)


def _learning_rate(trial: optuna.Trial) -> float:
    # LM fine-tuning steps are small; a small network (MlpPolicy on the toy tasks) takes the zoo's usual range
    low, high = (1e-6, 1e-4) if uses_lm_policy else (1e-5, 1e-2)
    return trial.suggest_float("learning_rate", low, high, log=True)


def _sample_regularisers(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "ent_coef": trial.suggest_categorical("ent_coef", _ENT_COEFS),
        "max_grad_norm": trial.suggest_categorical("max_grad_norm", _MAX_GRAD_NORMS),
    }


def sample_grpo_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Optuna sampler for GRPO (the zoo has none): ``learning_rate`` (log; in [1e-6, 1e-4] for ``LMPolicy``, [1e-5, 1e-2]
    otherwise), ``n_epochs`` in {1, 2, 4}, ``clip_range`` in {0.1, 0.2, 0.3}, ``scale_rewards`` in {group, batch,
    none}, ``loss_type`` in {grpo, dr_grpo, dapo}, ``ent_coef`` in {0, 1e-3, 1e-2} and ``max_grad_norm`` in
    {0.5, 1, 2}. ``n_steps``, ``batch_size``, ``beta`` and ``policy_kwargs`` come from the YAML.
    """
    return {
        "learning_rate": _learning_rate(trial),
        "n_epochs": trial.suggest_categorical("n_epochs", _N_EPOCHS),
        "clip_range": trial.suggest_categorical("clip_range", _CLIP_RANGES),
        "scale_rewards": trial.suggest_categorical("scale_rewards", ["group", "batch", "none"]),
        "loss_type": trial.suggest_categorical("loss_type", ["grpo", "dr_grpo", "dapo"]),
        **_sample_regularisers(trial),
    }


def sample_reinforce_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """Optuna sampler for RLOO and REINFORCE (the zoo has none): ``learning_rate`` as :func:`sample_grpo_params`,
    ``ent_coef`` in {0, 1e-3, 1e-2} and ``max_grad_norm`` in {0.5, 1, 2}."""
    return {"learning_rate": _learning_rate(trial), **_sample_regularisers(trial)}


#: the samplers :func:`install` gives ``--optimize`` for the algorithms the zoo does not ship
ZOO_ALGO_SAMPLERS: dict[str, Sampler] = {
    "grpo": sample_grpo_params,
    "rloo": sample_reinforce_params,
    "reinforce": sample_reinforce_params,
}


def convert_lm_params(params: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a trial sampled by an LM sampler (for ``--trial-id``): its params, unchanged."""
    return dict(params)


def _dispatch_sampler(stock: Sampler, lm: Sampler) -> Sampler:
    def sample(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
        return (lm if uses_lm_policy else stock)(trial, n_actions, n_envs, additional_args)

    return _patched(sample)


def _dispatch_converter(stock: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def convert(params: dict[str, Any]) -> dict[str, Any]:
        # the zoo's samplers all draw `one_minus_gamma`; the LM samplers never do
        return stock(params) if "one_minus_gamma" in params else convert_lm_params(params)

    return _patched(convert)


#: the LM sampler of each zoo algorithm that :func:`install` dispatches to
LM_SAMPLERS: dict[str, Sampler] = {"ppo": sample_ppo_lm_params, "a2c": sample_a2c_lm_params, "trpo": sample_a2c_lm_params}


def _patched(function: Callable) -> Callable:
    function._sb3_textrl_dispatch = True  # type: ignore[attr-defined]
    return function


def _install_preprocess() -> None:
    """Patch ``ExperimentManager._preprocess_hyperparams``: the LM flag, rollout-buffer strings, the eval env's kwargs
    and, for a YAML with group wrappers, the wrappers of the eval env."""
    original = ExperimentManager._preprocess_hyperparams
    if getattr(original, "_sb3_textrl_dispatch", False):
        return

    def _preprocess_hyperparams(self: ExperimentManager, hyperparams: dict[str, Any]):
        global uses_lm_policy
        uses_lm_policy = is_lm_policy(hyperparams.get("policy"))
        ungrouped = strip_group_wrappers(hyperparams) if _uses_groups(hyperparams) else None
        result = original(self, resolve_rollout_buffer(hyperparams))
        if self._eval_env_kwargs_args is None:
            # rl_zoo3 2.9.2 builds the eval env (EvalCallback, and every --optimize trial's evaluation) with the
            # --env-kwargs of the command line only, never the YAML's `env_kwargs`: use the training env's kwargs
            self.eval_env_kwargs = self.env_kwargs
        # the eval env plays independent episodes: EvalCallback steps every env until its episodes end
        self._sb3_textrl_eval_wrappers = None
        if ungrouped is not None:
            self._sb3_textrl_eval_wrappers = (get_wrapper_class(ungrouped), get_wrapper_class(ungrouped, "vec_env_wrapper"))
        return result

    ExperimentManager._preprocess_hyperparams = _patched(_preprocess_hyperparams)  # type: ignore[method-assign]


def _install_groups() -> None:
    """Add :data:`ZOO_ALGOS` to ``ALGOS``; build the eval env and ``enjoy``'s env without the group wrappers."""
    for name, algorithm in ZOO_ALGOS.items():
        ALGOS.setdefault(name, algorithm)
    create_envs = ExperimentManager.create_envs
    if not getattr(create_envs, "_sb3_textrl_dispatch", False):

        def _create_envs(self: ExperimentManager, n_envs: int, eval_env: bool = False, no_log: bool = False):
            ungrouped = getattr(self, "_sb3_textrl_eval_wrappers", None)
            if not eval_env or ungrouped is None:
                return create_envs(self, n_envs, eval_env=eval_env, no_log=no_log)
            grouped = self.env_wrapper, self.vec_env_wrapper
            self.env_wrapper, self.vec_env_wrapper = ungrouped
            try:
                return create_envs(self, n_envs, eval_env=eval_env, no_log=no_log)
            finally:
                self.env_wrapper, self.vec_env_wrapper = grouped

        ExperimentManager.create_envs = _patched(_create_envs)  # type: ignore[method-assign]
    create_test_env = rl_zoo3.enjoy.create_test_env
    if not getattr(create_test_env, "_sb3_textrl_dispatch", False):

        def _create_test_env(*args: Any, hyperparams: dict[str, Any] | None = None, **kwargs: Any):
            hyperparams = strip_group_wrappers(hyperparams) if hyperparams is not None else None
            return create_test_env(*args, hyperparams=hyperparams, **kwargs)

        rl_zoo3.enjoy.create_test_env = _patched(_create_test_env)


def install() -> None:
    """Patch the zoo (idempotent): resolve rollout-buffer strings, use the LM samplers for ``LMPolicy``, add GRPO, RLOO
    and REINFORCE to ``ALGOS`` (with samplers for ``--optimize``), and build the evaluation env (and ``enjoy``'s)
    without group wrappers."""
    for algo, lm_sampler in LM_SAMPLERS.items():
        stock = hyperparams_opt.HYPERPARAMS_SAMPLER[algo]
        if not getattr(stock, "_sb3_textrl_dispatch", False):
            hyperparams_opt.HYPERPARAMS_SAMPLER[algo] = _dispatch_sampler(stock, lm_sampler)
        stock_converter = hyperparams_opt.HYPERPARAMS_CONVERTER[algo]
        if not getattr(stock_converter, "_sb3_textrl_dispatch", False):
            hyperparams_opt.HYPERPARAMS_CONVERTER[algo] = _dispatch_converter(stock_converter)
    for algo, sampler in ZOO_ALGO_SAMPLERS.items():
        hyperparams_opt.HYPERPARAMS_SAMPLER.setdefault(algo, sampler)
        hyperparams_opt.HYPERPARAMS_CONVERTER.setdefault(algo, convert_lm_params)
    _install_preprocess()
    _install_groups()


def main(argv: list[str] | None = None) -> None:
    """
    ``python -m sb3_textrl.zoo {train,enjoy} [ARGS]``: the zoo's ``python -m rl_zoo3.train`` or ``rl_zoo3.enjoy``
    with the same arguments, after :func:`install`, so that ``--algo`` takes ``grpo``, ``rloo`` and ``reinforce`` too.

    :param argv: the script name and its arguments (default: ``sys.argv[1:]``)
    """
    install()
    import rl_zoo3.train  # imported here: `python -m sb3_textrl.zoo` alone needs neither

    argv = sys.argv[1:] if argv is None else list(argv)
    scripts = {"train": rl_zoo3.train.train, "enjoy": rl_zoo3.enjoy.enjoy}
    if not argv or argv[0] not in scripts:
        sys.exit(
            "usage: python -m sb3_textrl.zoo {train,enjoy} [ARGS]: rl_zoo3's train or enjoy with the sb3_textrl hooks "
            "(--algo also takes grpo, rloo and reinforce)"
        )
    sys.argv = [f"rl_zoo3.{argv[0]}", *argv[1:]]
    scripts[argv[0]]()


if __name__ == "__main__":  # `python -m sb3_textrl.zoo`: run the module's import copy, whose install() patched the zoo
    from sb3_textrl.zoo import main as _main

    _main()
else:
    install()
