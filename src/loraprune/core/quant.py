"""A quantized frozen base (`--base-quant int8|nf4`), through the stock stack only.

transformers' `BitsAndBytesConfig` loads the base with bitsandbytes' Linear8bitLt / Linear4bit
layers (its CPU backend does 8-bit and 4-bit forward and input-gradient backward), and peft wraps
them with its own LoRA layers. Nothing here quantizes or multiplies by hand:

* Every criterion that reads W reads the dequantized weight of ONE module at a time (`dequantize`,
  through peft's `dequantize_bnb_weight`: int8 W = CB * SCB / 127 per row, nf4 through
  bitsandbytes' `dequantize_4bit`), so W + s·B·A (core/lora.py) is the weight the layer computes.
* The export merges LoRA into the dequantized weights in float and slices them (export/merge.py);
  `--save-quant` re-quantizes the compact model with the same library.
* The base weights have no gradients (they are integer tensors), so the `taylor` criterion is refused,
  and so are element patterns (their masked forward multiplies the float weight itself).

int8 on CPU: in train mode bitsandbytes dequantizes and runs an fp32 matmul (the exported float model
computes exactly this); in eval mode it also rounds the activations to 8 bits, so perplexities the
run measures on the int8 base carry about 0.5% logit noise. nf4 computes in fp32 (bf16 where
--dtype bf16; slow on CPUs without bf16 units).
"""
from __future__ import annotations

import gc
import math

import torch

QUANT_WEIGHTS = ("Int8Params", "Params4bit")


def bnb_config(quant: str, dtype: str = "fp32"):
    """The BitsAndBytesConfig of --base-quant / --save-quant `quant` (int8 or nf4)."""
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    raise ValueError(f"unknown quantization {quant!r}")


def is_quantized(weight) -> bool:
    return type(weight).__name__ in QUANT_WEIGHTS


def dequantize(linear) -> torch.Tensor:
    """The float32 weight [out, in] a bitsandbytes Linear computes with. (peft's
    dequantize_module_weight is not used: on CPU it breaks an int8 layer that has run a forward.)"""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(linear.weight, state=getattr(linear, "state", None)).float()


def numel(p) -> int:
    """Weights a parameter stands for (a 4-bit parameter packs two per byte)."""
    qs = getattr(p, "quant_state", None)
    return math.prod(qs.shape) if qs is not None else p.numel()


def n_params(model, skip_lora: bool = False) -> int:
    return sum(numel(p) for n, p in model.named_parameters() if not (skip_lora and ".lora_" in n))


# bitsandbytes' 4-bit block: one scale per 64 consecutive weights of a row
NF4_BLOCK = 64


def portable_kernels(model) -> None:
    """Keep every bitsandbytes 4-bit layer on the kernel every CPU runs.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2) repacks a Linear4bit's weight on its first
    eval-mode forward without gradients, for a faster kernel: that rounds the block scales to bf16
    (results then depend on the CPU) and fails outright when the layer's input width is not a
    multiple of the 64-weight block ("shape '[64, 1]' is invalid for input of size 96"). Its own
    per-layer switch `support_avx512bf16_for_cpu` turns the repacking off."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def nf4_unfit_layers(model) -> list[str]:
    """Linear layers whose width bitsandbytes' AVX512-BF16 CPU kernel cannot take (see
    portable_kernels): input not a multiple of 64 or output not a multiple of 32. A --save-quant nf4
    export must have none, since whoever loads it may not turn that kernel off."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"
            and (m.in_features % NF4_BLOCK or m.out_features % 32)]


def release_checkpoint_pages(model) -> None:
    """After a quantized load the float parameters (embeddings, norms, lm_head) still alias the
    memory-mapped checkpoint, which keeps the whole float file resident (counted in RSS): copy them
    into ordinary memory so the mapping can go."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.data = p.data.clone()
    gc.collect()
