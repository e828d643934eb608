"""Import paths of modules that moved into subpackages keep working: ``import sb3_textrl.buffers`` gives
:mod:`sb3_textrl.common.buffers` itself (the same module object), so code, pickles and RL Zoo YAML files that name an
old path (``rollout_buffer_class: sb3_textrl.buffers.EpisodeRolloutBuffer``) load unchanged. Importing this
module (the package does, first) puts its finder on ``sys.meta_path``."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__all__ = ["MOVED_MODULES"]

#: old module path -> where it lives now
MOVED_MODULES = {
    "sb3_textrl.buffers": "sb3_textrl.common.buffers",
    "sb3_textrl.callbacks": "sb3_textrl.common.callbacks",
    "sb3_textrl.checkpoints": "sb3_textrl.common.training_checkpoints",
    "sb3_textrl.eval_callback": "sb3_textrl.common.callbacks",
    "sb3_textrl.evaluation": "sb3_textrl.common.evaluation",
    "sb3_textrl.kl": "sb3_textrl.common.kl",
    "sb3_textrl.plotting": "sb3_textrl.common.plotting",
    "sb3_textrl.spaces": "sb3_textrl.common.spaces",
    "sb3_textrl.validation": "sb3_textrl.common.validation",
    "sb3_textrl.vec_env": "sb3_textrl.common.vec_env",
    "sb3_textrl.fsdp": "sb3_textrl.distributed.fsdp",
    "sb3_textrl.checkpointing": "sb3_textrl.lm.activation_checkpointing",
    "sb3_textrl.kv_cache": "sb3_textrl.lm.kv_cache",
    "sb3_textrl.lean_activations": "sb3_textrl.lm.lean_activations",
    "sb3_textrl.loading": "sb3_textrl.lm.loading",
    "sb3_textrl.log_probs": "sb3_textrl.lm.log_probs",
    "sb3_textrl.optim": "sb3_textrl.lm.optim",
    "sb3_textrl.packing": "sb3_textrl.lm.packing",
    "sb3_textrl.prefix_sharing": "sb3_textrl.lm.prefix_sharing",
    "sb3_textrl.prepacked": "sb3_textrl.lm.weight_prepacking",
    "sb3_textrl.token_masks": "sb3_textrl.lm.tokens",
}


class _MovedModuleLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new path (imported once, shared by both names)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(MOVED_MODULES[fullname]))


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
