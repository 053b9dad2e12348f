"""Masked LoRA: a peft LoRA Linear that computes y = x @ ((W + s·B·A) ⊙ M)^T + b, so that training
sees exactly what the merged, element-pruned model will compute.

How: the stock peft `Linear` module stays in place (same parameters, names, hooks, adapter saving);
only its `forward` is overridden per instance (the mechanism accelerate's hooks use) by a function
that calls `MaskedMergedLinear`, reading peft's public attributes through core/lora.py.

Memory: `MaskedMergedLinear` saves only its input x (which a stock Linear saves anyway) and
recomputes W_eff = (W + (B @ A) * s) ⊙ M in backward, so nothing weight-sized is stored per
micro-batch. The price is compute: backward needs dL/dW_eff = gy^T x ([out, in], one full matmul
per projection, as in full fine-tuning) because (B·A) ⊙ M does not factor through the rank r.
Masked entries get no gradient: gA, gB come from dL/dW_eff ⊙ M.

Mixed precision: under autocast the two big matmuls run in the autocast dtype, W_eff itself is
always formed in the parameter dtype (fp32), so it is bit-identical to the exported weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .arch import layer_modules
from .lora import lora_parts, merge


def merged_masked_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """(W + (B @ A) * s) with the pruned entries set to +0: the exported weight [out, in], the same
    bits as the export's merge (core/lora.merge)."""
    return merge(weight, A, B, scaling).masked_fill_(~keep, 0)


class MaskedMergedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, keep, scaling, dtype):
        # params: an autograd.Function takes every input positionally (backward returns one grad each)
        with torch.autocast(x.device.type, enabled=False):
            w = merged_masked_weight(weight, A, B, keep, scaling)
            y = F.linear(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, weight, A, B, keep)
        ctx.scaling, ctx.dtype, ctx.has_bias = scaling, dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, A, B, keep = ctx.saved_tensors
        s, dt = ctx.scaling, ctx.dtype
        with torch.autocast(x.device.type, enabled=False):
            gy2 = gy.reshape(-1, gy.shape[-1]).to(dt)                      # [T, out]
            gx = None
            if ctx.needs_input_grad[0]:
                w = merged_masked_weight(weight, A, B, keep, s)
                gx = (gy2 @ w.to(dt)).reshape(*x.shape[:-1], w.shape[1]).to(x.dtype)
            g_w = (gy2.t() @ x.reshape(-1, x.shape[-1]).to(dt)).to(weight.dtype)  # dL/dW_eff [out, in]
            g_ba = g_w.masked_fill_(~keep, 0).mul_(s)                       # dL/d(B @ A)
            gA = B.t() @ g_ba if ctx.needs_input_grad[3] else None         # [r, in]
            gB = g_ba @ A.t() if ctx.needs_input_grad[4] else None         # [out, r]
            gb = gy2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb, gA, gB, None, None, None


def masked_forward(mod, keep: torch.Tensor, emasks=None):
    """The forward that replaces `mod.forward` (a peft LoRA Linear); `emasks.bypass` (the dense
    teacher) makes it the plain base layer."""
    lora_parts(mod, exact=True)  # fail early, at attach time

    def forward(x, *args, **kwargs):
        if args or kwargs.get("adapter_names") is not None:
            raise UserError("element-masked LoRA layers take no extra forward arguments")
        if emasks is not None and emasks.bypass:
            return mod.base_layer(x)
        p = lora_parts(mod, exact=True)
        weight, bias, A, B, s = p.weight, p.bias, p.A, p.B, p.scaling
        if mod.disable_adapters or mod.merged:
            A, B = A.new_zeros(A.shape), B.new_zeros(B.shape)  # base weight only, still masked
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return MaskedMergedLinear.apply(x, weight, bias, A, B, keep, s, dtype)

    return forward


def attach(model, emasks) -> None:
    """Make every projection covered by `emasks` (an ElementMasks) compute the masked merged weight."""
    for (i, name), keep in emasks.keep.items():
        mod = layer_modules(model, i)[name]
        if not hasattr(mod, "lora_A"):
            raise UserError(f"layer {i} {name} is not a LoRA layer; element patterns need LoRA on "
                            "q,k,v,o,gate,up,down")
        mod.forward = masked_forward(mod, keep, emasks)

