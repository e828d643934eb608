"""The package's layout rules (read off the sources) and the old import paths that must keep working."""

from __future__ import annotations

import ast
import importlib
import pathlib
import pickle

import pytest

import sb3_textrl
from sb3_textrl._moved_modules import MOVED_MODULES

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sb3_textrl"
ENVS = ROOT / "envs"  # installed as sb3_textrl.envs


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a source file imports, at the top or inside a function (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending_imports(paths: list[pathlib.Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(name for name in imported_modules(path) if name == forbidden or name.startswith(forbidden))
        if bad:
            found[str(path)] = bad
    return found


def test_imported_modules_reads_nested_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom a.b import c\ndef f():\n    from stable_baselines3 import PPO\n")
    assert imported_modules(source) == {"os", "a.b", "a.b.c", "stable_baselines3", "stable_baselines3.PPO"}
    assert offending_imports([source], ("stable_baselines3",)) == {str(source): ["stable_baselines3", "stable_baselines3.PPO"]}


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        (PACKAGE / "lm", ("stable_baselines3", "sb3_contrib", "gymnasium", "sb3_textrl.common", "sb3_textrl.policies")),
        (PACKAGE / "rewards", ("sb3_textrl.envs", "sb3_textrl.common", "sb3_textrl.policies")),
        (ENVS, ("sb3_textrl.policies", "sb3_textrl.common.callbacks", "sb3_textrl.common.evaluation")),
        (PACKAGE / "common", ("sb3_textrl.reinforce", "sb3_textrl.grpo", "sb3_textrl.rloo", "sb3_textrl.distributed")),
    ],
    ids=["lm knows only torch and transformers", "rewards know no env", "envs know no policy", "common knows no algorithm"],
)
def test_import_rules(folder, forbidden):
    paths = sorted(folder.rglob("*.py"))
    assert paths
    assert offending_imports(paths, tuple(f"{name}." for name in forbidden) + forbidden) == {}


def test_nothing_imports_the_cli():
    paths = [path for path in [*PACKAGE.rglob("*.py"), *ENVS.rglob("*.py")] if path.name not in ("cli.py", "__main__.py")]
    assert offending_imports(paths, ("sb3_textrl.cli",)) == {}


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_old_import_paths_name_the_moved_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_paths_in_code_yaml_and_pickles():
    from sb3_textrl.buffers import EpisodeRolloutBuffer
    from sb3_textrl.vec_env import make_text_vec_env

    assert EpisodeRolloutBuffer is sb3_textrl.EpisodeRolloutBuffer
    assert make_text_vec_env is sb3_textrl.make_text_vec_env
    # the RL Zoo resolves `rollout_buffer_class: sb3_textrl.buffers.EpisodeRolloutBuffer` by module path and name
    module, _, name = "sb3_textrl.buffers.EpisodeRolloutBuffer".rpartition(".")
    assert getattr(importlib.import_module(module), name) is EpisodeRolloutBuffer
    # a model saved before the move pickled the class under its old module path
    old_pickle = pickle.dumps(EpisodeRolloutBuffer, protocol=0).replace(b"sb3_textrl.common.buffers", b"sb3_textrl.buffers")
    assert b"sb3_textrl.buffers\n" in old_pickle
    assert pickle.loads(old_pickle) is EpisodeRolloutBuffer


def test_top_level_exports():
    for name in sb3_textrl.__all__:
        assert getattr(sb3_textrl, name) is not None, name
    assert sb3_textrl.LMPolicy is sb3_textrl.CausalLMActorCriticPolicy
