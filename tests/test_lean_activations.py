"""Lean activations: the LM's gated MLPs and RMSNorms keep only their inputs for backward, with the stock results."""

import copy

import pytest
import torch as th
from test_activation_checkpointing import hessian_vector_product
from test_prefix_sharing import SYSTEM_PROMPT, _env, _steps  # the same envs and random episodes
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from sb3_textrl.lm.lean_activations import _GatedMLP, _RMSNorm, enable_lean_activations
from sb3_textrl.policies import LMPolicy


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True])
def test_gated_mlp_gradients(bias, frozen):
    g = th.Generator().manual_seed(0)

    def tensor(*shape, requires_grad=True):
        return th.randn(*shape, generator=g, dtype=th.float64, requires_grad=requires_grad)

    x = tensor(2, 3, 5)
    # a frozen up projection (requires_grad=False) gets no gradient; the others still do
    w_gate, w_up, w_down = tensor(4, 5), tensor(4, 5, requires_grad=not frozen), tensor(5, 4)
    b_gate, b_up, b_down = (tensor(n) if bias else None for n in (4, 4, 5))
    inputs = (x, w_gate, b_gate, w_up, b_up, w_down, b_down)
    linear = th.nn.functional.linear
    expected = linear(th.nn.functional.silu(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up), w_down, b_down)
    th.testing.assert_close(_GatedMLP.apply(*inputs), expected)
    assert th.autograd.gradcheck(_GatedMLP.apply, inputs)
    assert th.autograd.gradgradcheck(_GatedMLP.apply, inputs)  # TRPO's Hessian-vector products
    _GatedMLP.apply(*inputs).sum().backward()
    assert (w_up.grad is None) == frozen


def test_rms_norm_gradients():
    g = th.Generator().manual_seed(0)
    x = th.randn(2, 3, 6, generator=g, dtype=th.float64, requires_grad=True)
    weight = th.randn(6, generator=g, dtype=th.float64, requires_grad=True)
    expected = weight * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    th.testing.assert_close(_RMSNorm.apply(x, weight, 1e-6), expected)
    assert th.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (x, weight))
    assert th.autograd.gradgradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (x, weight))


@pytest.mark.parametrize("bias", [True, False])
def test_gated_mlp_recomputes_its_norm_output(bias):
    # given the RMSNorm that made x, the MLP keeps the norm's input instead of x and recomputes x in backward
    g = th.Generator().manual_seed(0)

    def tensor(*shape):
        return th.randn(*shape, generator=g, dtype=th.float64, requires_grad=True)

    h, norm_weight = tensor(2, 3, 5), tensor(5)
    weights = (tensor(4, 5), tensor(4) if bias else None, tensor(4, 5), tensor(4) if bias else None, tensor(5, 4))
    weights += (tensor(5) if bias else None,)

    def norm_mlp(h, norm_weight, *weights):
        return _GatedMLP.apply(_RMSNorm.apply(h, norm_weight, 1e-6), *weights, h, norm_weight, 1e-6)

    def stock(h, norm_weight, *weights):
        return _GatedMLP.apply(_RMSNorm.apply(h, norm_weight, 1e-6), *weights)

    inputs = (h, norm_weight, *weights)
    th.testing.assert_close(norm_mlp(*inputs), stock(*inputs))
    assert th.autograd.gradcheck(norm_mlp, inputs)
    assert th.autograd.gradgradcheck(norm_mlp, inputs)


def _saved_bytes(fn, params):
    """Bytes of the distinct tensors autograd keeps for backward, parameters left out."""
    seen = {p.untyped_storage().data_ptr() for p in params}
    total = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total.append(t.untyped_storage().nbytes())
        return t

    with th.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(total), out


def test_layers_keep_only_their_inputs(tiny_llama_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    mlp, norm = lm.model.layers[0].mlp, lm.model.layers[0].post_attention_layernorm
    tokens, hidden, intermediate = 2 * 7, lm.config.hidden_size, lm.config.intermediate_size
    x = th.randn(2, 7, hidden, requires_grad=True)
    params = list(lm.parameters())
    stock_mlp, expected_mlp = _saved_bytes(lambda: mlp(x), params)
    stock_norm, expected_norm = _saved_bytes(lambda: norm(x), params)
    assert enable_lean_activations(lm) == 3 * lm.config.num_hidden_layers + 1  # 2 norms and an MLP per layer, final norm
    lean_mlp, out_mlp = _saved_bytes(lambda: mlp(x), params)
    lean_norm, out_norm = _saved_bytes(lambda: norm(x), params)
    # stock MLP: x, gate, silu(gate), up, their product; lean: x, gate, up
    assert stock_mlp - lean_mlp == 2 * tokens * intermediate * 4
    assert lean_mlp == (tokens * hidden + 2 * tokens * intermediate) * 4
    assert lean_norm == tokens * hidden * 4  # x only
    assert stock_norm - lean_norm >= tokens * hidden * 4  # the normalised input is no longer kept
    th.testing.assert_close(out_mlp, expected_mlp)
    th.testing.assert_close(out_norm, expected_norm)
    # norm then MLP, as in a decoder layer: the MLP recomputes the norm's output from the norm's input
    lean_both, _ = _saved_bytes(lambda: mlp(norm(x)), params)
    assert lean_both == (tokens * hidden + 2 * tokens * intermediate) * 4  # the norm input x, gate and up
    # unless the output changed in between: then the MLP keeps it
    changed, out_changed = _saved_bytes(lambda: mlp(norm(x).mul_(2)), params)
    assert changed == lean_both + tokens * hidden * 4
    with th.no_grad():
        expected_changed = type(mlp).forward(mlp, type(norm).forward(norm, x) * 2)
    th.testing.assert_close(out_changed, expected_changed)


def test_lm_outputs_and_gradients_equal_stock(tiny_llama_path, monkeypatch):
    stock = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    lean = copy.deepcopy(stock)
    enable_lean_activations(lean)
    calls = []
    apply = _GatedMLP.apply
    monkeypatch.setattr(_GatedMLP, "apply", lambda *a: calls.append(1) or apply(*a))
    ids = th.randint(3, 300, (2, 9))
    outputs = []
    for lm in (stock, lean):
        logits = lm(input_ids=ids).logits
        (logits.log_softmax(-1)[..., 5].sum() + logits.square().mean()).backward()
        outputs.append((logits, [p.grad for p in lm.parameters()]))
    assert len(calls) == stock.config.num_hidden_layers  # the lean copy ran its own functions, the stock one did not
    th.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outputs[1][1], outputs[0][1], strict=True):
        th.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with th.no_grad():  # rollouts and reference passes: the stock forward
        lean(input_ids=ids)
    assert len(calls) == stock.config.num_hidden_layers


def test_deepcopy_runs_on_the_copy(tiny_llama_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    enable_lean_activations(lm)
    twin = copy.deepcopy(lm)
    with th.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
        twin.model.layers[0].post_attention_layernorm.weight.zero_()
    x = th.randn(1, 3, lm.config.hidden_size, requires_grad=True)
    assert twin.model.layers[0].mlp(x).abs().max() == 0  # the copy's forward reads the copy's weights
    assert twin.model.layers[0].post_attention_layernorm(x).abs().max() == 0
    assert lm.model.layers[0].mlp(x).abs().max() > 0


class _GemmaStyleNorm(LlamaRMSNorm):
    """``(1 + weight) * xhat``, as Gemma's norm: not what the lean function computes."""

    def forward(self, hidden_states):
        return (1 + self.weight) * super().forward(hidden_states) / self.weight


class _GeluMLP(LlamaMLP):
    def __init__(self, config):
        super().__init__(config)
        self.act_fn = th.nn.GELU()


def test_other_layers_keep_their_forward(tiny_llama_path, tiny_gpt2_path):
    assert enable_lean_activations(AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)) == 0  # GELU MLP, LayerNorm
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    others = th.nn.ModuleList([_GemmaStyleNorm(lm.config.hidden_size), _GeluMLP(lm.config)])
    assert enable_lean_activations(others) == 0
    assert not any("forward" in m.__dict__ for m in others.modules())


def test_stock_forward_for_lora_layers_and_autocast(tiny_llama_path, monkeypatch):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    enable_lean_activations(lm)
    mlp = lm.model.layers[0].mlp
    calls = []
    apply = _GatedMLP.apply
    monkeypatch.setattr(_GatedMLP, "apply", lambda *a: calls.append(1) or apply(*a))
    x = th.randn(1, 3, lm.config.hidden_size, requires_grad=True)
    with th.autocast("cpu", dtype=th.bfloat16):
        assert mlp(x).dtype == th.bfloat16  # autocast's own products, not the float32 function
    mlp.down_proj = type("LoraLinear", (th.nn.Linear,), {})(lm.config.intermediate_size, lm.config.hidden_size)
    mlp(x)
    assert not calls


def test_projection_hooks_run(tiny_llama_path, monkeypatch):
    """A hook on a projection (a user's activation probe) still runs in training passes: that MLP runs stock."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    enable_lean_activations(lm)
    mlp = lm.model.layers[0].mlp
    calls, seen = [], []
    apply = _GatedMLP.apply
    monkeypatch.setattr(_GatedMLP, "apply", lambda *a: calls.append(1) or apply(*a))
    x = th.randn(1, 3, lm.config.hidden_size, requires_grad=True)
    expected = mlp(x)
    assert calls == [1]
    handle = mlp.gate_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    th.testing.assert_close(mlp(x), expected)
    assert calls == [1] and seen == [(1, 3, lm.config.intermediate_size)]
    handle.remove()
    mlp(x)
    assert calls == [1, 1]


@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT, None], ids=["system_prompt", "plain"])
def test_policy_training_pass_equals_stock(tiny_lm_path, system_prompt):
    env = _env(tiny_lm_path, system_prompt)
    obs, actions = _steps(env, 4)
    results = []
    for lean in (False, True):
        policy = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, lean_activations=lean)
        with th.no_grad():
            th.nn.init.normal_(policy.value_head.weight, std=1.0, generator=th.Generator().manual_seed(0))
        policy.set_training_mode(True)
        switched = [m for m in policy.lm.modules() if "forward" in m.__dict__]
        values, log_prob, entropy = policy.evaluate_actions(obs, actions)
        (values.sum() + log_prob.sum() + entropy.sum()).backward()
        grads = [p.grad for p in policy.parameters() if p.requires_grad]
        results.append((values, log_prob, entropy, grads, bool(switched)))
    assert results[1][4] == ("llama" in str(tiny_lm_path).lower()) and not results[0][4]
    for a, b in zip(results[0][:3], results[1][:3], strict=True):
        th.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][3], results[1][3], strict=True):
        th.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_policy_double_backward_equals_stock(tiny_llama_path):
    """TRPO's Hessian-vector products (a backward through a backward) are the same with lean activations."""
    env = _env(tiny_llama_path, SYSTEM_PROMPT)
    obs, actions = _steps(env, 2)
    products = []
    for lean in (False, True):
        kwargs = dict(lean_activations=lean, model_kwargs=dict(attn_implementation="eager"))
        policy = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, **kwargs)
        policy.set_training_mode(True)
        products.append(hessian_vector_product(policy, obs, actions))
    for a, b in zip(*products, strict=True):
        th.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
