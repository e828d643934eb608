"""Adam's state made up front: the steps that follow equal a fresh optimizer's, bit for bit."""

import pytest
import torch as th
from stable_baselines3 import PPO
from test_policy import make_env

from sb3_textrl.lm.optim import allocate_adam_state, release_unstepped_adam_state


def _params(seed: int = 0) -> list[th.nn.Parameter]:
    g = th.Generator().manual_seed(seed)
    params = [th.nn.Parameter(th.randn(4, 3, generator=g)), th.nn.Parameter(th.randn(5, generator=g))]
    params.append(th.nn.Parameter(th.randn(2, generator=g), requires_grad=False))  # frozen: no state
    return params


@pytest.mark.parametrize(
    "optimizer_class, kwargs",
    [
        (th.optim.Adam, {}),
        (th.optim.Adam, dict(fused=True, eps=1e-5)),
        (th.optim.Adam, dict(amsgrad=True, weight_decay=0.01)),
        (th.optim.AdamW, dict(weight_decay=0.1)),
        (th.optim.AdamW, dict(fused=True, amsgrad=True)),
    ],
)
def test_steps_equal_a_fresh_optimizer(optimizer_class, kwargs):
    early, fresh = _params(), _params()
    opt_early, opt_fresh = optimizer_class(early, lr=0.1, **kwargs), optimizer_class(fresh, lr=0.1, **kwargs)
    assert allocate_adam_state(opt_early)
    state = opt_early.state
    assert set(state) == set(early[:2])  # the frozen parameter gets none
    moments = {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if kwargs.get("amsgrad") else set())
    assert all(set(s) == moments | {"step"} and float(s["step"]) == 0 for s in state.values())
    assert all(not s[name].any() for s in state.values() for name in moments)
    g = th.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(early[:2], fresh[:2], strict=True):
            a.grad = th.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_early.step()
        opt_fresh.step()
    for a, b in zip(early, fresh, strict=True):
        assert th.equal(a, b)
    for a, b in zip(early[:2], fresh[:2], strict=True):
        for name, value in opt_fresh.state[b].items():
            assert th.equal(opt_early.state[a][name], value)
            assert (opt_early.state[a][name].dtype, opt_early.state[a][name].device) == (value.dtype, value.device)


def test_other_optimizers_and_used_state_are_left_alone():
    params = _params()
    assert not allocate_adam_state(th.optim.SGD(params, lr=0.1))
    adam = th.optim.Adam(params[:2], lr=0.1)
    for p in params[:2]:
        p.grad = th.ones_like(p)
    adam.step()
    before = {p: dict(s) for p, s in adam.state.items()}
    assert not allocate_adam_state(adam)  # it stepped: its state stays
    assert all(adam.state[p]["step"] is before[p]["step"] for p in before)
    assert not allocate_adam_state(th.optim.Adam([params[2]], lr=0.1))  # only frozen parameters: nothing to make


def test_policy_makes_the_state_when_training_starts(tiny_llama_path):
    model = PPO("LMPolicy", make_env(tiny_llama_path), n_steps=4, batch_size=4, n_epochs=1, device="cpu")
    optimizer = model.policy.optimizer
    assert not optimizer.state  # rollouts and inference alone do not need it
    model.policy.set_training_mode(False)
    assert not optimizer.state
    model.policy.set_training_mode(True)
    assert len(optimizer.state) == sum(p.requires_grad for p in model.policy.parameters())
    model.learn(4)  # and training goes on from it
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())


def test_unstepped_state_follows_the_weights(tiny_llama_path):
    model = PPO("LMPolicy", make_env(tiny_llama_path), n_steps=4, batch_size=4, n_epochs=1, device="cpu")
    policy, optimizer = model.policy, model.policy.optimizer
    policy.set_training_mode(True)
    assert optimizer.state
    policy.double()  # the weights change dtype; moments made for float32 would not fit them
    assert not optimizer.state
    policy.set_training_mode(True)
    assert all(s["exp_avg"].dtype == th.float64 for s in optimizer.state.values())
    for p in policy.parameters():
        p.grad = th.ones_like(p)
    optimizer.step()
    assert not release_unstepped_adam_state(optimizer)  # stepped: kept
    assert all(float(s["step"]) == 1 for s in optimizer.state.values())
