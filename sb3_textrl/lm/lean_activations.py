"""
Training passes that keep fewer activations for the backward pass: the LM's gated MLPs and RMSNorms run as autograd
functions that save their inputs only and recompute the cheap elementwise parts in backward.

Papers: gated MLPs https://arxiv.org/abs/2002.05202, RMSNorm https://arxiv.org/abs/1910.07467

Each stock gated MLP (``down_proj(silu(gate_proj(x)) * up_proj(x))``, Shazeer 2020, "GLU Variants Improve
Transformer") keeps four ``(tokens, intermediate_size)`` tensors for backward: ``gate``, ``silu(gate)``, ``up`` and
their product. Its function here keeps ``gate`` and ``up`` (in one buffer) and recomputes the product (two elementwise
kernels) for ``down_proj``'s weight gradient. Each RMSNorm (Zhang & Sennrich 2019) keeps its input and its normalised
input; here its input only. Where the post-attention norm made the MLP's input, the MLP does not keep that either: it
recomputes it in backward from the norm's input, which the norm keeps anyway. No matrix product is recomputed (unlike
activation checkpointing, see :mod:`sb3_textrl.lm.activation_checkpointing`); the results equal the stock layers' up
to float rounding, and the backward passes are differentiable again (TRPO's Hessian-vector products).
``benchmarks/update.py`` measures the memory kept for backward.

A layer is switched over only where its stock forward, probed once on random inputs with its own weights, gives this
module's result: Llama-style ``LlamaMLP``/``LlamaRMSNorm`` and their copies (Mistral, Qwen2, SmolLM2, ...). Others
(GPT-2's MLP, Gemma's ``1 + weight`` norm) keep their stock forward. Calls without gradients (rollouts, reference
passes), under autocast, on LoRA- or FSDP-wrapped projections, on projections with hooks of their own (the MLP's
function never calls its projections), or with inputs of another dtype than the weights run the stock forward too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["enable_lean_activations"]


class _GatedMLP(th.autograd.Function):
    """
    ``down(silu(gate(x)) * up(x))``, each projection ``x @ weight.T + bias``, saving ``x`` and one
    ``(tokens, 2 * intermediate)`` buffer that holds ``gate(x)`` and ``up(x)`` side by side.

    Gradients (``h = silu(gate) * up``, ``s = sigmoid(gate)``, ``g`` the output's gradient): ``dh = g @ w_down``,
    ``dw_down = g.T @ h``, ``dup = dh * silu(gate)``, ``dgate = dh * up * s * (1 + gate * (1 - s))`` (one fused
    ``silu_backward`` kernel), ``dw_gate = dgate.T @ x``, ``dw_up = dup.T @ x``, ``dx = dgate @ w_gate + dup @ w_up``;
    each bias's is the sum of its output's gradient over tokens. ``dgate`` and ``dup`` share one buffer too. Held in
    one block each, the freed activations leave holes large enough for the next layers' weight gradients, so glibc's
    heap grows less than with ``gate`` and ``up`` apart. When a double backward (``create_graph=True``, TRPO's
    Hessian-vector products) records the backward, it recomputes ``gate`` and ``up`` from ``x`` with differentiable ops
    instead.

    Given ``norm_input``, ``norm_weight`` and ``eps`` of the :class:`_RMSNorm` whose output ``x`` is, it keeps
    ``norm_input`` (which that norm keeps too) instead of ``x`` and recomputes ``x`` in backward; its gradient still
    flows to the norm through ``x`` (none is returned for the norm's own arguments).
    """

    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down, norm_input=None, norm_weight=None, eps=None):
        x2 = x.reshape(-1, x.shape[-1])
        inter = w_gate.shape[0]
        gate_up = x2.new_empty(len(x2), 2 * inter)
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        for weight, bias, out in ((w_gate, b_gate, gate), (w_up, b_up, up)):
            if bias is None:
                th.mm(x2, weight.t(), out=out)
            else:
                th.addmm(bias, x2, weight.t(), out=out)
        # x made by an RMSNorm is recomputed from the norm's input (which the norm keeps anyway), not kept
        ctx.recompute_x = norm_input is not None
        kept = (norm_input, norm_weight) if ctx.recompute_x else (x, None)
        ctx.save_for_backward(*kept, w_gate, b_gate, w_up, b_up, w_down, gate_up)
        ctx.has_down_bias, ctx.eps, ctx.x_shape = b_down is not None, eps, x.shape
        return th.nn.functional.linear(th.nn.functional.silu(gate) * up, w_down, b_down).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_weight, w_gate, b_gate, w_up, b_up, w_down, gate_up = ctx.saved_tensors
        if ctx.recompute_x:  # differentiable ops: a double backward differentiates through the norm
            x = _rms_norm(x, norm_weight, ctx.eps)
        x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_h = g2 @ w_down
        if th.is_grad_enabled():  # a double backward differentiates this: differentiable ops all through
            gate = th.nn.functional.linear(x2, w_gate, b_gate)
            up = th.nn.functional.linear(x2, w_up, b_up)
            silu, sigmoid = th.nn.functional.silu(gate), th.sigmoid(gate)
            grad_gate = grad_h * up * (sigmoid * (1 + gate * (1 - sigmoid)))
            grad_up = grad_h * silu
        else:
            inter = w_gate.shape[0]
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
            silu = th.nn.functional.silu(gate)
            grad_gate_up = th.empty_like(gate_up)
            grad_gate, grad_up = grad_gate_up[:, :inter], grad_gate_up[:, inter:]
            th.ops.aten.silu_backward.grad_input(grad_h * up, gate, grad_input=grad_gate)  # no derivative of its own
            th.mul(grad_h, silu, out=grad_up)
        h = silu * up
        del grad_h, silu
        needs = ctx.needs_input_grad
        grads = [None] * 10
        if needs[5]:
            grads[5] = g2.t() @ h
        del h
        if needs[6] and ctx.has_down_bias:
            grads[6] = g2.sum(0)
        for i, (grad, bias) in zip((1, 3), ((grad_gate, b_gate), (grad_up, b_up))):
            if needs[i]:
                grads[i] = grad.t() @ x2
            if needs[i + 1] and bias is not None:
                grads[i + 1] = grad.sum(0)
        if needs[0]:
            grads[0] = th.addmm(grad_gate @ w_gate, grad_up, w_up).view(ctx.x_shape)
        return tuple(grads)  # none for the norm's input and weight: theirs flows through x


class _RMSNorm(th.autograd.Function):
    """
    ``weight * (x / sqrt(mean(x**2) + eps))`` over the last dim, in float32 (or wider), saving ``x`` only.

    Gradients (``xhat = x / rms``, ``d = g * weight``): ``dweight = sum g * xhat``,
    ``dx = (d - xhat * mean(d * xhat)) / rms``. Written with differentiable ops (double backward works).
    """

    @staticmethod
    def forward(ctx, x: th.Tensor, weight: th.Tensor, eps: float):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, grad_out: th.Tensor):
        x, weight = ctx.saved_tensors
        # recomputed from x (one reduction), so that a double backward differentiates it too
        xhat, rstd = _normalise(x, ctx.eps)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        d = (grad_out * weight).to(rstd.dtype)
        grad_x = (d - xhat * (d * xhat).mean(-1, keepdim=True)) * rstd
        return grad_x.to(x.dtype), grad_weight, None


def _normalise(x: th.Tensor, eps: float) -> tuple[th.Tensor, th.Tensor]:
    """``x / rms`` and ``1 / rms``, in float32 or wider (as the stock norms compute them)."""
    x32 = x.to(th.promote_types(x.dtype, th.float32))
    rstd = th.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


def _rms_norm(x: th.Tensor, weight: th.Tensor, eps: float) -> th.Tensor:
    """:class:`_RMSNorm`'s output (the same ops, so a recomputation gives the same bits)."""
    return weight * _normalise(x, eps)[0].to(x.dtype)


def _lean_call(module: nn.Module, x: th.Tensor, *weights: th.Tensor) -> bool:
    # the stock forward where nothing trains through it, under autocast, or with parameters another wrapper owns
    return (
        th.is_grad_enabled()
        and (x.requires_grad or any(w.requires_grad for w in weights))
        and not th.is_autocast_enabled(x.device.type)
        and all(type(w.data) is th.Tensor and w.dtype == x.dtype for w in weights)
    )


def _plain_linear(module: nn.Module) -> bool:
    # an nn.Linear that computes nothing else: no subclass (LoRA), no forward replaced on the instance, no hooks of its
    # own (the function below never calls the projections, so their hooks would not run)
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return type(module) is nn.Linear and "forward" not in module.__dict__ and not any(getattr(module, h) for h in hooks)


def _gated_mlp(x: th.Tensor, linears: tuple[nn.Linear, nn.Linear, nn.Linear], *norm) -> th.Tensor:
    """:class:`_GatedMLP` on ``(gate_proj, up_proj, down_proj)``'s weights and biases, in its argument order (and
    ``norm``: the input, weight and eps of the RMSNorm that made ``x``, if one did)."""
    return _GatedMLP.apply(x, *(t for p in linears for t in (p.weight, p.bias)), *norm)


class _NormOutput(NamedTuple):
    """What made a training RMSNorm's output: enough to recompute it."""

    input: th.Tensor  # the norm's input (which the norm keeps for backward anyway)
    weight: th.Tensor  # the norm's weight
    eps: float  # the norm's epsilon
    version: int  # the output's version when made (an in-place change since makes the entry stale)


# a training RMSNorm's output -> what made it, so that the layer reading it can recompute it in backward from what the
# norm keeps anyway instead of keeping it too
_NORM_OUTPUTS = WeakTensorKeyDictionary()


def _norm_that_made(x: th.Tensor) -> tuple:
    """The input, weight and eps of the lean RMSNorm whose output ``x`` is (unchanged since), else ``()``."""
    entry = _NORM_OUTPUTS.get(x)
    if entry is None or entry.version != x._version:
        return ()
    return entry[:3]


class _LeanMLP:
    """Instance ``forward`` of a gated MLP: :class:`_GatedMLP` when it trains, else the stock forward."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: th.Tensor) -> th.Tensor:
        m = self.module
        linears = (m.gate_proj, m.up_proj, m.down_proj)
        if not all(_plain_linear(p) for p in linears) or not _lean_call(m, x, *(p.weight for p in linears)):
            return type(m).forward(m, x)
        return _gated_mlp(x, linears, *_norm_that_made(x))


class _LeanRMSNorm:
    """Instance ``forward`` of an RMSNorm: :class:`_RMSNorm` when it trains, else the stock forward."""

    def __init__(self, module: nn.Module, eps: float):
        self.module, self.eps = module, eps

    def __call__(self, x: th.Tensor) -> th.Tensor:
        m = self.module
        if not _lean_call(m, x, m.weight):
            return type(m).forward(m, x)
        y = _RMSNorm.apply(x, m.weight, self.eps)
        _NORM_OUTPUTS[y] = _NormOutput(x, m.weight, self.eps, y._version)
        return y


def _rms_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def _probeable(weight: th.Tensor) -> bool:
    return weight.dtype == th.float32 and weight.device.type != "meta" and type(weight.data) is th.Tensor


def _same(stock: th.Tensor, lean: th.Tensor) -> bool:
    return stock.shape == lean.shape and th.allclose(stock, lean, rtol=1e-4, atol=1e-5)


@th.no_grad()
def _probe_input(module: nn.Module, width: int) -> th.Tensor:
    weight = next(module.parameters())
    generator = th.Generator(device="cpu").manual_seed(0)
    return th.randn(2, 3, width, generator=generator).to(device=weight.device, dtype=weight.dtype)


def _mlp_matches(module: nn.Module) -> bool:
    linears = tuple(getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if not all(type(p) is nn.Linear and _probeable(p.weight) for p in linears):
        return False
    x = _probe_input(module, linears[0].in_features)
    with th.no_grad():
        stock = type(module).forward(module, x)
        lean = _gated_mlp(x, linears)
    return _same(stock, lean)


def _norm_matches(module: nn.Module) -> bool:
    eps, weight = _rms_eps(module), getattr(module, "weight", None)
    if eps is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not _probeable(weight):
        return False
    if set(dict(module.named_parameters())) != {"weight"}:
        return False
    x = _probe_input(module, weight.shape[0])
    with th.no_grad():
        return _same(type(module).forward(module, x), _RMSNorm.apply(x, weight, eps))


def enable_lean_activations(lm: nn.Module) -> int:
    """
    Run ``lm``'s gated MLPs and RMSNorms through this module's autograd functions whenever they train (see the module
    docstring): their stock forward is replaced on the instance by one that falls back to it in every other case.

    Call it once, on float32 weights, after any copy of ``lm`` that should keep the stock layers (the reference model).
    Layers whose ``forward`` is already replaced on the instance (by this function, or by a wrapper such as
    accelerate's hooks) are left alone, so a second call switches nothing over.

    :param lm: a Hugging Face model (or any module), changed in place
    :return: the number of layers switched over (0 where none matches: nothing changes)
    """
    switched = 0
    for module in lm.modules():
        if "forward" in module.__dict__:  # replaced already (by us, or by a wrapper such as accelerate's hooks)
            continue
        if "RMSNorm" in type(module).__name__ and _norm_matches(module):
            module.forward = _LeanRMSNorm(module, _rms_eps(module))
        elif hasattr(module, "gate_proj") and _mlp_matches(module):
            module.forward = _LeanMLP(module)
        else:
            continue
        switched += 1
    return switched
