"""LoRA layers, read through peft's public attributes, in one place.

A peft LoRA Linear holds the frozen base layer (`base_layer`, weight W [out, in], bias b) and, per
adapter, `lora_A[name]` (A [r, in]), `lora_B[name]` (B [out, r]) and `scaling[name]` (s = alpha / r).
In eval mode it computes y = x @ (W + s·B·A)^T + b. loraprune uses exactly one active, plain adapter
(no DoRA, no lora_bias, no fan_in_fan_out).

The merged weight W' = W + (B @ A)·s is computed by `merge` only, in peft's own operation order, so
the exported weight is bit-identical to peft's `merge_and_unload` in fp32, and criteria, the masked
element forward and the export all see the same W'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from . import quant


def is_lora(mod) -> bool:
    return hasattr(mod, "base_layer") and hasattr(mod, "lora_A")


def base_linear(mod):
    """The frozen nn.Linear under a peft wrapper (or the module itself)."""
    return mod.base_layer if hasattr(mod, "base_layer") else mod


def base_weight(mod) -> torch.Tensor:
    """The frozen weight [out, in] as float32, detached: for a quantized base the dequantized weight
    (one temporary per module); for an fp32 base the parameter itself -- do not modify it."""
    linear = base_linear(mod)
    if quant.is_quantized(linear.weight):
        return quant.dequantize(linear)
    return linear.weight.detach().float()


@dataclass
class LoraParts:
    weight: torch.Tensor          # W [out, in] (the base layer's parameter)
    bias: torch.Tensor | None     # b [out]
    A: torch.Tensor               # [r, in]
    B: torch.Tensor               # [out, r]
    scaling: float                # s
    adapter: str


def lora_parts(mod, *, exact: bool = False) -> LoraParts:
    """The parts of a LoRA Linear with exactly one active, plain adapter. `exact=True` (element
    patterns: the LoRA path must equal the masked merged weight) also refuses LoRA dropout."""
    names = [n for n in mod.active_adapters if n in mod.lora_A]
    if len(names) != 1:
        raise UserError(f"loraprune needs exactly one active LoRA adapter per layer, found {len(names)}")
    name = names[0]
    if name in getattr(mod, "lora_variant", {}) or mod.use_dora.get(name):
        raise UserError(f"adapter {name!r} is a LoRA variant (e.g. DoRA); loraprune supports plain LoRA")
    if mod.lora_bias.get(name):
        raise UserError(f"adapter {name!r} has lora_bias=True; loraprune supports plain LoRA")
    if getattr(mod, "fan_in_fan_out", False):
        raise UserError("loraprune does not support fan_in_fan_out (Conv1D) LoRA layers")
    if exact and not isinstance(mod.lora_dropout[name], torch.nn.Identity):
        raise UserError("element patterns need --lora-dropout 0: with dropout the LoRA path cannot be masked "
                        "exactly like the merged weight")
    base = mod.base_layer
    return LoraParts(base.weight, base.bias, mod.lora_A[name].weight, mod.lora_B[name].weight,
                     mod.scaling[name], name)


def adds_lora(mod) -> bool:
    """Whether the module's forward adds a LoRA term now (not disabled, not already merged)."""
    return is_lora(mod) and not mod.disable_adapters and not mod.merged and bool(mod.active_adapters)


def merge(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """W + (B @ A) * s as a new tensor, in peft's operation order (bit-identical to W + get_delta_weight;
    addition is commutative in IEEE arithmetic, so adding W last changes nothing)."""
    return torch.mm(B, A).mul_(s).add_(W)


@torch.no_grad()
def merged_weight(mod) -> torch.Tensor:
    """W' [out, in] in float32 that `mod` computes in eval mode: W + (B @ A)·s for an active LoRA
    layer, W for a plain Linear (or a disabled / merged adapter). One temporary, freed by the caller."""
    if not adds_lora(mod):
        w = base_weight(mod)
        return w.clone() if w.data_ptr() == base_linear(mod).weight.data_ptr() else w
    p = lora_parts(mod)
    return merge(base_weight(mod), p.A.float(), p.B.float(), p.scaling)
