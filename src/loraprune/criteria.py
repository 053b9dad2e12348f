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

Projections (`--lora-projections`): `all` (paper) sums over the seven projections. `rows` sums only
over q/k/v/gate/up, where a unit owns output ROWS. Reason: at B = 0, G^ = s^2 G A^T A mixes the
input columns of G, so in o_proj and down_proj, whose units own input COLUMNS, a unit is scored with
other units' gradients (measured on SmolLM2: rank correlation with the true-gradient importance ~0.8
for q/k/gate/up, ~0.2 for o_proj, ~0 for down_proj; benchmarks/smollm2-criteria/estimate_quality.py).
"""
from __future__ import annotations

import torch

from .arch import LayerSpec, layer_modules
from .config import LORA_PROJECTIONS


def module_unit_sums(spec: LayerSpec, name: str, elem: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-unit sums of ONE projection's element scores [out, in] (zeros for units it does not touch),
    so that a criterion can score a layer one module at a time and keep a single [out, in] alive."""
    H, KV, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    z = dict(dtype=elem.dtype, device=elem.device)
    out = {"heads": torch.zeros(H, **z), "kv": torch.zeros(KV, **z), "ffn": torch.zeros(spec.intermediate_size, **z)}
    if name == "q_proj":
        out["heads"] += elem.reshape(H, d, -1).sum((1, 2))                # q rows of head h
    elif name == "o_proj":
        out["heads"] += elem.reshape(-1, H, d).sum((0, 2))                # o columns of head h
    elif name in ("k_proj", "v_proj"):
        out["kv"] += elem.reshape(KV, d, -1).sum((1, 2))
    elif name in ("gate_proj", "up_proj"):
        out["ffn"] += elem.sum(1)
    elif name == "down_proj":
        out["ffn"] += elem.sum(0)
    else:
        raise KeyError(f"not a prunable projection: {name}")
    return out


def add_scores(acc: dict | None, new: dict) -> dict:
    if acc is None:
        return new
    for k, v in new.items():
        acc[k] += v
    return acc


def unit_sums(spec: LayerSpec, elem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum element scores [out, in] of the seven projections into per-unit scores."""
    acc = None
    for name, e in elem.items():
        acc = add_scores(acc, module_unit_sums(spec, name, e))
    return acc


def lora_parts(mod):
    """(W, A, B, s) of a peft LoRA Linear with one active adapter, through peft's public attributes."""
    name = mod.active_adapters[0]
    return mod.base_layer.weight, mod.lora_A[name].weight, mod.lora_B[name].weight, mod.scaling[name]


@torch.no_grad()
def lora_element_importance(mod, mode: str = "squared") -> torch.Tensor:
    W, A, B, s = lora_parts(mod)
    if A.grad is None or B.grad is None:
        raise RuntimeError("LoRA weights have no gradient: call backward before scoring")
    A, B = A.float(), B.float()
    gA, gB = A.grad.float(), B.grad.float()
    # Two rank-r products and three in-place passes over [out, in] (s folded into the small factors):
    #   W' = W + (s B) A;   G^ = s (G_B A + B G_A - G_B G_A) = [s G_B, s (B - G_B)] @ [A; G_A]
    merged = torch.mm(B * s, A).add_(W)
    g_hat = torch.mm(torch.cat([gB, B - gB], 1).mul_(s), torch.cat([A, gA], 0))
    prod = merged.mul_(g_hat)
    del g_hat
    if mode == "squared":
        return prod.pow_(2)
    if mode == "abs-norm":
        prod = prod.abs_()
        return prod.div_(prod.norm().clamp_min(1e-30))
    raise ValueError(f"unknown importance mode {mode!r}")


ROW_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # units own output rows


class LoraCriterion:
    name = "lora"
    needs_backward = True

    def __init__(self, importance: str = "squared", projections: str = "all"):
        if projections not in LORA_PROJECTIONS:
            raise ValueError(f"unknown projections {projections!r}")
        self.importance, self.projections = importance, projections

    def layer_scores(self, model, spec: LayerSpec) -> dict[str, torch.Tensor]:
        acc = None  # one module at a time: a single [out, in] score tensor alive
        for name, mod in layer_modules(model, spec.index).items():
            if self.projections == "rows" and name not in ROW_PROJECTIONS:
                continue
            acc = add_scores(acc, module_unit_sums(spec, name, lora_element_importance(mod, self.importance)))
        return acc


def build_criterion(name: str, importance: str = "squared", masks=None, seed: int = 0,
                    lora_projections: str = "all"):
    if name == "lora":
        return LoraCriterion(importance, lora_projections)
    from . import baselines  # criteria that compare against the paper's

    return baselines.build(name, masks=masks, seed=seed)
