"""Criteria that read gradients after a backward pass.

  lora         the paper's LoRA-guided criterion: only LoRA weights and LoRA gradients.
  mask-taylor  |dL/dm| for a multiplicative gate m = 1 on each unit's output (the gates the mask
               hooks already multiply by): the exact first-order estimate of removing the unit;
               only H + I scalars of gradient per layer, never a gradient of a frozen weight.
  taylor       LLM-Pruner's first-order element criterion ("vanilla"): sum over the unit's weights
               of |W' * dL/dW|. The only criterion that turns on base-weight gradients (memory!).

The lora criterion, for a peft Linear with frozen W [out, in], A [r, in], B [out, r], scaling s:
    merged weight      W' = W + s * B @ A
    estimated grad     G^ = s * (G_B @ A + B @ G_A - G_B @ G_A)      [out, in]
G^ is the change of W' when A and B take one plain gradient step of size 1 (the paper's argument:
(B - G_B)(A - G_A) - BA = -(G_B A + B G_A) + G_B G_A); s enters because W' moves by s times the
product. The sign is irrelevant after squaring / absolute value. Element importance:
    squared  (paper, default):        I = (W' * G^)^2
    abs-norm (reference code option): I = |W' * G^| / ||W' * G^||_F   (per module)
Group importance sums I over every weight the unit owns (core/arch.py). Biases carry no LoRA and are
not scored. `--lora-projections rows` sums only over q/k/v/gate/up, where a unit owns output rows:
at B = 0, G^ = s^2 G A^T A mixes the input columns of G, so in o_proj and down_proj a unit would be
scored with other units' gradients (measured, with the command: benchmarks/smollm2-criteria/README.md).
"""
from __future__ import annotations

import torch

from ..arch import ROW_PROJECTIONS, LayerSpec, layer_modules
from ..lora import base_linear, base_weight, lora_parts, merge, merged_weight
from ..units import add_scores, module_unit_sums
from .base import Criterion

IMPORTANCE = ("squared", "abs-norm")
LORA_PROJECTIONS = ("all", "rows")


@torch.no_grad()
def lora_element_importance(mod, mode: str = "squared") -> torch.Tensor:
    """(W' * G^)^2 (or the abs-norm variant) of one LoRA Linear, [out, in] fp32."""
    p = lora_parts(mod)
    if p.A.grad is None or p.B.grad is None:
        raise RuntimeError("LoRA weights have no gradient: call backward before scoring")
    A, B, s = p.A.float(), p.B.float(), p.scaling
    gA, gB = p.A.grad.float(), p.B.grad.float()
    # Two rank-r products and in-place passes over [out, in] (s folded into the small factors):
    #   G^ = s (G_B A + B G_A - G_B G_A) = [s G_B, s (B - G_B)] @ [A; G_A]
    prod = merge(base_weight(mod), A, B, s)
    g_hat = torch.mm(torch.cat([gB, B - gB], 1).mul_(s), torch.cat([A, gA], 0))
    prod.mul_(g_hat)
    del g_hat
    if mode == "squared":
        return prod.pow_(2)
    if mode == "abs-norm":
        prod = prod.abs_()
        return prod.div_(prod.norm().clamp_min(1e-30))
    raise ValueError(f"unknown importance mode {mode!r}")


class LoraCriterion(Criterion):
    name = "lora"
    needs_backward = True

    def __init__(self, importance: str = "squared", projections: str = "all"):
        if projections not in LORA_PROJECTIONS:
            raise ValueError(f"unknown projections {projections!r}")
        if importance not in IMPORTANCE:
            raise ValueError(f"unknown importance mode {importance!r}")
        self.importance, self.projections = importance, projections

    def layer_scores(self, model, layer: LayerSpec) -> dict[str, torch.Tensor]:
        acc = None  # one module at a time: a single [out, in] score tensor alive
        for name, mod in layer_modules(model, layer.index).items():
            if self.projections == "rows" and name not in ROW_PROJECTIONS:
                continue
            acc = add_scores(acc, module_unit_sums(layer, name, lora_element_importance(mod, self.importance)))
        return acc


class MaskTaylorCriterion(Criterion):
    """|dL/dm| per unit, m the float gates of `MaskSet` (o_proj input per head, down_proj input per
    FFN channel). The gate gradient is sum over tokens and head_dim of x * dL/d(o_proj input), i.e.
    the first-order loss change of removing the unit: L(m=0) - L(m=1) ~ -dL/dm.

    KV group score. A KV head has no gate of its own: it only acts through its query heads, so the
    first-order change of removing the group is -sum_{kept h in g} dL/dm_h, whose magnitude
    |sum g_h| can be smaller than sum |g_h| when the heads' effects cancel. We return
        kv[g] = |sum_{kept h in g} g_h| - sum_{kept h in g} |g_h|      (<= 0)
    so that the value `MaskSet` gives a group with all its kept heads (head scores + kv score) is
    exactly |sum g_h|, the first-order estimate for removing the whole group. (The EMA is linear,
    so this holds for the smoothed scores too.)"""

    name = "mask-taylor"
    needs_backward = True

    def __init__(self, masks=None):
        self.masks = masks

    def setup(self, model, spec, masks) -> None:
        self.masks = masks
        for i in masks.prunable:
            masks.head_gates[i].requires_grad_(True)
            masks.ffn_gates[i].requires_grad_(True)

    def teardown(self, model) -> None:
        for g in self.masks.gate_parameters():
            g.grad = None
            g.requires_grad_(False)

    def layer_scores(self, model, layer: LayerSpec) -> dict[str, torch.Tensor]:
        hg, fg = self.masks.head_gates[layer.index], self.masks.ffn_gates[layer.index]
        if hg.grad is None or fg.grad is None:
            raise RuntimeError("mask gates have no gradient: call setup() and backward before scoring")
        gh, gf = hg.grad.detach().float(), fg.grad.detach().float()       # [H], [I]
        hg.grad, fg.grad = None, None  # gates are no optimizer params: nobody else clears them
        kept = hg.detach().float().view(layer.num_kv_heads, layer.n_rep)  # [KV, n_rep]
        per = gh.view(layer.num_kv_heads, layer.n_rep) * kept
        kv = per.sum(1).abs() - per.abs().sum(1)                           # [KV]
        return {"heads": gh.abs(), "kv": kv, "ffn": gf.abs()}


class TaylorCriterion(Criterion):
    """sum over a unit's weights of |W' * dL/dW| (LLM-Pruner, first-order element importance).
    dL/dW of the frozen base weight equals dL/dW' (W' = W + s B A is linear in W). Needs
    requires_grad on the base weights of the seven projections of every pruned layer: one fp32
    (or bf16) gradient the size of those weights is held after each backward. Cleared here after
    scoring because the optimizer only knows LoRA weights."""

    name = "taylor"
    needs_backward = True

    def __init__(self):
        self._weights: list[torch.nn.Parameter] = []

    def setup(self, model, spec, masks) -> None:
        self._weights = []
        for i in masks.prunable:
            for mod in layer_modules(model, i).values():
                w = base_linear(mod).weight
                w.requires_grad_(True)
                self._weights.append(w)

    def teardown(self, model) -> None:
        for w in self._weights:
            w.grad = None
            w.requires_grad_(False)

    def layer_scores(self, model, layer: LayerSpec) -> dict[str, torch.Tensor]:
        out = None
        for name, mod in layer_modules(model, layer.index).items():
            w = base_linear(mod).weight
            if w.grad is None:
                raise RuntimeError("base weights have no gradient: the taylor criterion needs setup() "
                                   "(requires_grad on frozen weights) and a backward pass")
            with torch.no_grad():
                elem = (merged_weight(mod) * w.grad.float()).abs_()
            w.grad = None
            out = add_scores(out, module_unit_sums(layer, name, elem))
        return out
