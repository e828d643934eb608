"""Activation checkpointing: training passes recompute the decoder layers in backward and give the same results."""

import pytest
import torch as th
from test_prefix_sharing import SYSTEM_PROMPT, _env, _steps  # the same envs and random episodes
from transformers import LlamaForCausalLM

from sb3_textrl.lm import activation_checkpointing
from sb3_textrl.policies import LMPolicy


def _policy(env, checkpointing, **kwargs):
    space = env.observation_space
    policy = LMPolicy(space, env.action_space, lambda _: 1e-3, activation_checkpointing=checkpointing, **kwargs)
    with th.no_grad():
        th.nn.init.normal_(policy.value_head.weight, std=1.0, generator=th.Generator().manual_seed(0))
    policy.set_training_mode(True)
    return policy


def hessian_vector_product(policy, obs, actions):
    """The LM's Hessian of ``sum exp(log_prob)`` times a vector of ones, as TRPO computes its objective and KL: a backward
    through a backward."""
    params = [p for p in policy.lm.parameters() if p.requires_grad]
    log_prob = policy.get_distribution(obs).log_prob(actions)
    grads = th.autograd.grad(log_prob.exp().sum(), params, create_graph=True)
    vector = [th.ones_like(g) for g in grads]
    return th.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), params)


def _count_layer_forwards(policy):
    """Counts the forward calls of every decoder layer's MLP (a recomputation calls them again)."""
    calls = []
    for name, module in policy.lm.named_modules():
        if name.endswith("mlp"):
            forward = module.forward
            module.forward = lambda *a, _forward=forward, **k: calls.append(1) or _forward(*a, **k)
    return calls


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT, None], ids=["system_prompt", "plain"])
def test_checkpointed_training_pass_equals_plain(tiny_lm_path, system_prompt, packing):
    env = _env(tiny_lm_path, system_prompt)
    obs, actions = _steps(env, 4)
    results, n_forwards = [], []
    for checkpointed in (False, True):
        policy = _policy(env, checkpointed, packing=packing)
        calls = _count_layer_forwards(policy)
        values, log_prob, entropy = policy.evaluate_actions(obs, actions)
        n_forward = len(calls)
        (values.sum() + log_prob.sum() + entropy.sum()).backward()
        n_forwards.append((n_forward, len(calls)))
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        results.append((values, log_prob, entropy, grads, policy.reference_log_prob(obs, actions)))
    (plain_forward, plain_total), (checkpointed_forward, checkpointed_total) = n_forwards
    assert plain_total == plain_forward  # no recomputation without checkpointing
    assert checkpointed_total > checkpointed_forward  # the layers ran again in backward
    (v1, lp1, e1, g1, r1), (v2, lp2, e2, g2, r2) = results
    for a, b in [(v1, v2), (lp1, lp2), (e1, e2), (r1, r2), *zip(g1, g2, strict=True)]:
        th.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpointing_every_n_layers_and_off_in_rollouts(tiny_llama_path):
    env = _env(tiny_llama_path, SYSTEM_PROMPT)
    policy = _policy(env, 2)
    flags = [layer.gradient_checkpointing for layer in policy.lm.model.layers]
    assert flags == [i % 2 == 0 for i in range(len(flags))]
    assert all(layer.training for layer in policy.lm.model.layers)
    first = policy.lm.model.layers[0]
    assert not any(module.training for module in first.modules() if module is not first)  # dropout stays off
    policy.set_training_mode(False)  # rollouts: the layers neither checkpoint nor train
    assert not any(layer.training for layer in policy.lm.model.layers)
    assert not policy.reference_model.model.layers[0].gradient_checkpointing


def test_checkpointed_double_backward_equals_plain(tiny_llama_path):
    """TRPO's Hessian-vector products (a backward through a backward) are the same with checkpointing."""
    env = _env(tiny_llama_path, SYSTEM_PROMPT)
    obs, actions = _steps(env, 2)
    products = [
        hessian_vector_product(_policy(env, checkpointed, model_kwargs=dict(attn_implementation="eager")), obs, actions)
        for checkpointed in (False, True)
    ]
    for a, b in zip(*products, strict=True):
        th.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("value", [0, -1, 1.5, "yes"])
def test_activation_checkpointing_must_be_bool_or_positive_int(tiny_llama_path, value):
    env = _env(tiny_llama_path, None)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, activation_checkpointing=value)


def test_activation_checkpointing_refuses_transformers_without_read_only_caches(tiny_llama_path, monkeypatch):
    # transformers < 5: its layers drop any cache (the shared prefix) when checkpointed, so results would be wrong
    monkeypatch.setattr(activation_checkpointing, "GradientCheckpointingLayer", type("GradientCheckpointingLayer", (), {}))
    env = _env(tiny_llama_path, None)
    with pytest.raises(ValueError, match="transformers >= 5"):
        LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, activation_checkpointing=True)


def test_activation_checkpointing_refuses_models_without_it(tiny_llama_path, monkeypatch):
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    env = _env(tiny_llama_path, None)
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, activation_checkpointing=True)
