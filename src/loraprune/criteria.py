"""Importance criteria. Contract: after a backward pass, `criterion.layer_scores(model, i)` returns
{"heads": [H], "kv": [KV], "ffn": [I]} float tensors for layer i (higher = keep).

`lora` (the paper's LoRA-guided criterion) uses only LoRA weights and LoRA gradients. For a peft
Linear with frozen W [out, in], A [r, in], B [out, r] and scaling s (= alpha / r):
    merged weight      W' = W + s * B @ A
    estimated grad     G^ = s * (G_B @ A + B @ G_A - G_B @ G_A)      [out, in]
G^ is the change of W' when A and B take one plain gradient step of size 1 (the paper's argument:
(B - G_B)(A - G_A) - BA = -(G_B A + B G_A) + G_B G_A); s enters because W' moves by s times the
product. The sign is irrelevant after squaring / absolute value. Element importance:
    squared  (paper, default):        I = (W' * G^)^2
    abs-norm (reference code option): I = |W' * G^| / ||W' * G^||_F   (per module)
Group importance sums I over every weight the unit owns (see arch.py). Biases carry no LoRA and
are not scored.
"""
from __future__ import annotations

import torch

from .arch import LayerSpec, layer_modules


def unit_sums(spec: LayerSpec, elem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum element scores [out, in] of the seven projections into per-unit scores."""
    H, KV, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    out = {}
    heads = elem["q_proj"].reshape(H, d, -1).sum((1, 2))                  # q rows of head h
    heads = heads + elem["o_proj"].reshape(-1, H, d).sum((0, 2))          # o columns of head h
    out["heads"] = heads
    out["kv"] = (elem["k_proj"].reshape(KV, d, -1).sum((1, 2))
                 + elem["v_proj"].reshape(KV, d, -1).sum((1, 2)))
    out["ffn"] = elem["gate_proj"].sum(1) + elem["up_proj"].sum(1) + elem["down_proj"].sum(0)
    return out


def lora_parts(mod):
    """(W, A, B, s) of a peft LoRA Linear with one active adapter, through peft's public attributes."""
    name = mod.active_adapters[0]
    return mod.base_layer.weight, mod.lora_A[name].weight, mod.lora_B[name].weight, mod.scaling[name]


@torch.no_grad()
def lora_element_importance(mod, mode: str = "squared") -> torch.Tensor:
    W, A, B, s = lora_parts(mod)
    if A.grad is None or B.grad is None:
        raise RuntimeError("LoRA weights have no gradient: call backward before scoring")
    W, A, B = W.float(), A.float(), B.float()
    gA, gB = A.grad.float(), B.grad.float()
    merged = W + s * (B @ A)
    g_hat = s * (gB @ A + B @ gA - gB @ gA)
    prod = merged * g_hat
    if mode == "squared":
        return prod.pow(2)
    if mode == "abs-norm":
        prod = prod.abs()
        return prod / prod.norm().clamp_min(1e-30)
    raise ValueError(f"unknown importance mode {mode!r}")


class LoraCriterion:
    name = "lora"
    needs_backward = True

    def __init__(self, importance: str = "squared"):
        self.importance = importance

    def layer_scores(self, model, spec: LayerSpec) -> dict[str, torch.Tensor]:
        mods = layer_modules(model, spec.index)
        elem = {n: lora_element_importance(m, self.importance) for n, m in mods.items()}
        return unit_sums(spec, elem)


def build_criterion(name: str, importance: str = "squared", masks=None, seed: int = 0):
    if name == "lora":
        return LoraCriterion(importance)
    from . import baselines  # criteria that compare against the paper's

    return baselines.build(name, masks=masks, seed=seed)
