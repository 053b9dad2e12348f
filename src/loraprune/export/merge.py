"""Merging: the plain state dict of the model a peft LoRA model computes (LoRA added into the
weights), read through core/lora.py. The caller's model is never modified."""
from __future__ import annotations

import torch

from ..core.arch import unwrap
from ..core.lora import adds_lora, base_linear, is_lora, merged_weight
from ..core.quant import is_quantized
from ..errors import UserError


def merged_linear(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) that `module` computes: a plain Linear, or a peft LoRA
    Linear with its active, not yet merged adapter added (W + s*B@A), in the base weight's float
    dtype (fp32 for a quantized base: the dequantized weight). Read-only."""
    base = base_linear(module)
    bias = None if base.bias is None else base.bias.detach()
    if is_quantized(base.weight):
        return merged_weight(module), None if bias is None else bias.float()
    if not adds_lora(module):
        return base.weight.detach(), bias  # forward uses base_layer alone (merged adapters are already in it)
    return merged_weight(module).to(base.weight.dtype), bias


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict of the underlying transformers model with every LoRA module merged into plain
    `<name>.weight` / `<name>.bias` (names as in the model without peft)."""
    base = unwrap(model)
    lora = {name: mod for name, mod in base.named_modules() if is_lora(mod)}
    sd = {}
    for key, value in base.state_dict().items():
        if "modules_to_save" in key:
            raise UserError("the adapter has modules_to_save; export supports LoRA on Linear layers only")
        if not any(key.startswith(name + ".") for name in lora):
            sd[key] = value.detach().clone()  # a copy: the exported model must not alias the source
    for name, mod in lora.items():
        weight, bias = merged_linear(mod)
        sd[name + ".weight"] = weight.clone()
        if bias is not None:
            sd[name + ".bias"] = bias.clone()
    return sd
