"""
Training passes that keep fewer activations for the backward pass: the LM's gated MLPs and RMSNorms run as autograd
functions that save their inputs only and recompute the cheap elementwise parts in backward.

Of the ~1.6 MB per token that SmolLM2-135M's stock layers keep for backward (float32), each gated MLP
(``down_proj(silu(gate_proj(x)) * up_proj(x))``, Shazeer 2020, "GLU Variants Improve Transformer") keeps four
``(tokens, intermediate_size)`` tensors: ``gate``, ``silu(gate)``, ``up`` and their product. Its function here keeps
``gate`` and ``up`` and recomputes the product (two elementwise kernels) for ``down_proj``'s weight gradient: ~23 % of
the activations. Each RMSNorm (Zhang & Sennrich 2019) keeps its input and its normalised input; here its input only
(~9 %). Measured on a minibatch of the main job's episodes (2 packed rows of 180 tokens): 569 -> 386 MB kept for
backward. No matrix product is recomputed (unlike activation checkpointing, see :mod:`sb3_textrl.checkpointing`), so
the update's time barely moves; the results equal the stock layers' up to float rounding, and the backward passes are
differentiable again (TRPO's Hessian-vector products).

A layer is switched over only where its stock forward, probed once on random inputs with its own weights, gives this
module's result: Llama-style ``LlamaMLP``/``LlamaRMSNorm`` and their copies (Mistral, Qwen2, SmolLM2, ...). Others
(GPT-2's MLP, Gemma's ``1 + weight`` norm) keep their stock forward. Calls without gradients (rollouts, reference
passes), under autocast, on LoRA- or FSDP-wrapped projections, or with inputs of another dtype than the weights run
the stock forward too.
"""

from __future__ import annotations

import torch as th
from torch import nn


class _GatedMLPDown(th.autograd.Function):
    """
    ``down(silu(gate) * up) = (silu(gate) * up) @ weight.T + bias``, saving ``gate`` and ``up`` only.

    Gradients (``h = silu(gate) * up``, ``s = sigmoid(gate)``, ``g`` the output's gradient): ``dh = g @ weight``,
    ``dweight = g.T @ h``, ``dbias = sum g``, ``dup = dh * silu(gate)``,
    ``dgate = dh * up * s * (1 + gate * (1 - s))``: one fused ``silu_backward`` kernel, or differentiable ops when a
    double backward (``create_graph=True``, TRPO's Hessian-vector products) records the backward.
    """

    @staticmethod
    def forward(ctx, gate: th.Tensor, up: th.Tensor, weight: th.Tensor, bias: th.Tensor | None):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return th.nn.functional.linear(th.nn.functional.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: th.Tensor):
        gate, up, weight = ctx.saved_tensors
        grad_h = grad_out @ weight
        silu = th.nn.functional.silu(gate)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            h = (silu * up).reshape(-1, up.shape[-1])
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ h
            del h
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        grad_up = grad_h * silu
        if th.is_grad_enabled():  # a double backward (create_graph=True) differentiates this: differentiable ops
            sigmoid = th.sigmoid(gate)
            grad_gate = grad_h * up * (sigmoid * (1 + gate * (1 - sigmoid)))
        else:  # one fused kernel (it has no derivative of its own)
            grad_gate = th.ops.aten.silu_backward(grad_h.mul_(up), gate)
        return grad_gate, grad_up, grad_weight, grad_bias


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
        xhat, _ = _normalise(x, eps)
        return weight * xhat.to(x.dtype)

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


def _lean_call(module: nn.Module, x: th.Tensor, *weights: th.Tensor) -> bool:
    # the stock forward where nothing trains through it, under autocast, or with parameters another wrapper owns
    return (
        th.is_grad_enabled()
        and (x.requires_grad or any(w.requires_grad for w in weights))
        and not th.is_autocast_enabled(x.device.type)
        and all(type(w.data) is th.Tensor and w.dtype == x.dtype for w in weights)
    )


class _LeanMLP:
    """Instance ``forward`` of a gated MLP: :class:`_GatedMLPDown` when it trains, else the stock forward."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: th.Tensor) -> th.Tensor:
        m = self.module
        linears = (m.gate_proj, m.up_proj, m.down_proj)
        if not all(type(p) is nn.Linear for p in linears) or not _lean_call(m, x, *(p.weight for p in linears)):
            return type(m).forward(m, x)
        return _GatedMLPDown.apply(m.gate_proj(x), m.up_proj(x), m.down_proj.weight, m.down_proj.bias)


class _LeanRMSNorm:
    """Instance ``forward`` of an RMSNorm: :class:`_RMSNorm` when it trains, else the stock forward."""

    def __init__(self, module: nn.Module, eps: float):
        self.module, self.eps = module, eps

    def __call__(self, x: th.Tensor) -> th.Tensor:
        m = self.module
        if not _lean_call(m, x, m.weight):
            return type(m).forward(m, x)
        return _RMSNorm.apply(x, m.weight, self.eps)


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
    linears = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(p) is nn.Linear and _probeable(p.weight) for p in linears):
        return False
    x = _probe_input(module, linears[0].in_features)
    with th.no_grad():
        stock = type(module).forward(module, x)
        lean = _GatedMLPDown.apply(linears[0](x), linears[1](x), linears[2].weight, linears[2].bias)
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

    :param lm: a Hugging Face model (or any module)
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
