"""
Adam's state made before training starts rather than at the optimizer's first ``step()``.

Papers: Adam https://arxiv.org/abs/1412.6980, AdamW https://arxiv.org/abs/1711.05101

Adam (Kingma & Ba 2015) keeps two moments per trainable weight, as large as the weights themselves: for a
full fine-tune, the largest part of the training state that is not the weights. PyTorch makes them at the first
``step()``, in the middle of the first minibatch, when the heap is full of freed activations: on a CPU, glibc's
allocator puts the moments between those holes, and the heap grows for several iterations around them. Made up
front, they sit next to the weights, below the memory that rollouts and minibatches take and give back
(``benchmarks/update.py``: see docs/benchmarks.md, *Memory*).
"""

from __future__ import annotations

import torch as th

__all__ = ["ADAM_CLASSES", "allocate_adam_state", "release_unstepped_adam_state"]

#: the optimizers whose state this module makes (exact classes: a subclass may keep other state)
ADAM_CLASSES = (th.optim.Adam, th.optim.AdamW)


def allocate_adam_state(optimizer: th.optim.Optimizer) -> bool:
    """
    Give a fresh ``torch.optim.Adam`` or ``AdamW`` the state its first ``step()`` would make: ``step`` 0 and zero
    ``exp_avg`` and ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``) for every parameter that requires a
    gradient, each like its parameter (dtype, device, layout). The steps that follow are the same as without it.

    The state goes in through ``load_state_dict``, so PyTorch places ``step`` as its fused, capturable or plain kernels
    expect.

    :param optimizer: the optimizer; others than Adam and AdamW (subclasses included), and one that holds state
        already (it stepped, or was loaded), are left alone
    :return: whether the state was made (``False`` too where no parameter requires a gradient)
    """
    if type(optimizer) not in ADAM_CLASSES or optimizer.state:
        return False
    state, index = {}, 0
    for group in optimizer.param_groups:
        names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad") else ("exp_avg", "exp_avg_sq")
        for param in group["params"]:
            if param.requires_grad:
                state[index] = {"step": th.tensor(0.0)}
                state[index].update({name: th.zeros_like(param, memory_format=th.preserve_format) for name in names})
            index += 1
    if not state:
        return False
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return True


def release_unstepped_adam_state(optimizer: th.optim.Optimizer) -> bool:
    """
    Drop the state of an Adam or AdamW that has not stepped yet (every ``step`` 0, as :func:`allocate_adam_state` makes
    it): equivalent to none, and made again, like its parameters, at the next :func:`allocate_adam_state`. Call it
    after the parameters moved or changed dtype (``.to(device)``, ``.double()``), which the state does not follow.

    :param optimizer: the optimizer; others, and one that has stepped, are left alone
    :return: whether the state was dropped
    """
    if type(optimizer) not in ADAM_CLASSES or not optimizer.state:
        return False
    if any(float(state.get("step", 1)) != 0 for state in optimizer.state.values()):
        return False
    optimizer.state.clear()
    return True
