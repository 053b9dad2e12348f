"""Criteria that LoRAPrune is compared against, behind the same contract as `criteria.LoraCriterion`:
`layer_scores(model, spec) -> {"heads": [H], "kv": [KV], "ffn": [I]}` (higher = keep), and an
optional `setup(model, spec, masks)` called once after LoRA wrapping and mask hooks, and an
optional `teardown(model)` called when no more scores are needed (it undoes what setup enabled).

  mask-taylor  |dL/dm| for a multiplicative gate m = 1 on each unit's output (the gates the mask
               hooks already multiply by). Exact first-order estimate of removing the unit; needs
               only the gradient of H + I scalars per layer, never a gradient of a frozen weight.
  taylor       LLM-Pruner's first-order element criterion ("vanilla"): sum over the unit's weights
               of |W' * dL/dW|. The only criterion that turns on base-weight gradients (memory!).
  magnitude    squared L2 norm of the weights a unit owns (ranking = L2 norm ranking).
  activation   Wanda-style sum over the unit's weights of |W'_oj| * ||X_j||, with ||X_j|| the L2
               norm of input feature j over the tokens seen since the last scoring (forward only).
  random       fixed seeded random scores per layer (one random ranking for the whole run).

W' is the merged weight W + s * B @ A of a peft LoRA Linear (W itself for a plain Linear): the
unit that is removed is the merged one, and in the iterative schedule LoRA has moved away from W.
At the start of fine-tuning (and so in the oneshot schedule) B = 0 and W' = W.
Biases are not scored (as in the LoRA criterion).
"""
from __future__ import annotations

import torch

from .arch import LayerSpec, layer_modules
from .criteria import add_scores, lora_parts, module_unit_sums


def _is_lora(mod) -> bool:
    return hasattr(mod, "base_layer") and bool(getattr(mod, "active_adapters", None))


def base_linear(mod):
    """The frozen nn.Linear under a peft wrapper (or the module itself)."""
    return mod.base_layer if hasattr(mod, "base_layer") else mod


@torch.no_grad()
def merged_weight(mod) -> torch.Tensor:
    """W' = W + s * B @ A in fp32, [out, in]; one temporary per module, freed by the caller."""
    if not _is_lora(mod):
        return mod.weight.detach().float()
    W, A, B, s = lora_parts(mod)
    return torch.mm(B.float() * s, A.float()).add_(W)


class MaskTaylorCriterion:
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

    def layer_scores(self, model, spec: LayerSpec) -> dict[str, torch.Tensor]:
        hg, fg = self.masks.head_gates[spec.index], self.masks.ffn_gates[spec.index]
        if hg.grad is None or fg.grad is None:
            raise RuntimeError("mask gates have no gradient: call setup() and backward before scoring")
        gh, gf = hg.grad.detach().float(), fg.grad.detach().float()       # [H], [I]
        hg.grad, fg.grad = None, None  # gates are no optimizer params: nobody else clears them
        kept = hg.detach().float().view(spec.num_kv_heads, spec.n_rep)    # [KV, n_rep]
        per = gh.view(spec.num_kv_heads, spec.n_rep) * kept
        kv = per.sum(1).abs() - per.abs().sum(1)                           # [KV]
        return {"heads": gh.abs(), "kv": kv, "ffn": gf.abs()}


class TaylorCriterion:
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

    def layer_scores(self, model, spec: LayerSpec) -> dict[str, torch.Tensor]:
        out = None
        for name, mod in layer_modules(model, spec.index).items():
            w = base_linear(mod).weight
            if w.grad is None:
                raise RuntimeError("base weights have no gradient: the taylor criterion needs setup() "
                                   "(requires_grad on frozen weights) and a backward pass")
            with torch.no_grad():
                elem = (merged_weight(mod) * w.grad.float()).abs_()
            w.grad = None
            out = add_scores(out, module_unit_sums(spec, name, elem))
        return out


class MagnitudeCriterion:
    """||W'_unit||^2 summed over the rows/columns the unit owns. Squared (not the L2 norm itself) so
    the values add up: a KV group's value in MaskSet (its heads + its kv score) is then the squared
    norm of everything the group owns. The ranking of single units is the same as by L2 norm."""

    name = "magnitude"
    needs_backward = False

    def layer_scores(self, model, spec: LayerSpec) -> dict[str, torch.Tensor]:
        out = None
        for name, mod in layer_modules(model, spec.index).items():
            out = add_scores(out, module_unit_sums(spec, name, merged_weight(mod).pow_(2)))
        return out


class ActivationCriterion:
    """Wanda-style: element score |W'_oj| * ||X_j||_2, X the input of the projection over all tokens
    seen since the last call (masked inputs included, so a masked unit's o/down columns score 0).
    Forward pre-hooks accumulate sum_t X_tj^2 in fp32 ([in] per projection); setup registers them
    after the mask hooks, so they see the masked input. Forward only: no gradient is read."""

    name = "activation"
    needs_backward = False

    def __init__(self):
        self._sq: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list = []

    def setup(self, model, spec, masks) -> None:
        self.teardown(model)
        for i in masks.prunable:
            for name, mod in layer_modules(model, i).items():
                self._handles.append(mod.register_forward_pre_hook(self._hook((i, name))))

    def _hook(self, key):
        def hook(_mod, args):
            x = args[0].detach()
            sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)  # [in]
            prev = self._sq.get(key)
            self._sq[key] = sq if prev is None else prev.add_(sq)
        return hook

    def teardown(self, model) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._sq = [], {}

    def layer_scores(self, model, spec: LayerSpec) -> dict[str, torch.Tensor]:
        out = None
        for name, mod in layer_modules(model, spec.index).items():
            sq = self._sq.pop((spec.index, name), None)
            if sq is None:
                raise RuntimeError("no activations recorded: the activation criterion needs setup() "
                                   "and a forward pass before scoring")
            with torch.no_grad():
                elem = merged_weight(mod).abs_().mul_(sq.sqrt().to(torch.float32)[None, :])
            out = add_scores(out, module_unit_sums(spec, name, elem))
        return out


class RandomCriterion:
    """One fixed random ranking per (seed, layer): redrawing at every step would make the EMA
    converge to 0.5 for every unit and the ranking change from update to update."""

    name = "random"
    needs_backward = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def layer_scores(self, model, spec: LayerSpec) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + spec.index)
        return {"heads": torch.rand(spec.num_heads, generator=g),
                "kv": torch.zeros(spec.num_kv_heads),
                "ffn": torch.rand(spec.intermediate_size, generator=g)}


BASELINES = ("mask-taylor", "taylor", "magnitude", "activation", "random")


def build(name: str, masks=None, seed: int = 0):
    if name == "mask-taylor":
        return MaskTaylorCriterion(masks)
    if name == "taylor":
        return TaylorCriterion()
    if name == "magnitude":
        return MagnitudeCriterion()
    if name == "activation":
        return ActivationCriterion()
    if name == "random":
        return RandomCriterion(seed)
    raise ValueError(f"unknown criterion {name!r}; choose one of lora, {', '.join(BASELINES)}")
