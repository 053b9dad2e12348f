"""Criteria that read weights only: magnitude, and the seeded random control."""
from __future__ import annotations

import torch

from ..arch import LayerSpec, layer_modules
from ..lora import merged_weight
from ..units import add_scores, module_unit_sums
from .base import Criterion


class MagnitudeCriterion(Criterion):
    """||W'_unit||^2 summed over the rows/columns the unit owns, W' = W + s·B·A the merged weight.
    Squared (not the L2 norm itself) so the values add up: a KV group's value in MaskSet (its heads +
    its kv score) is then the squared norm of everything the group owns. The ranking of single units
    is the same as by L2 norm."""

    name = "magnitude"
    needs_backward = False

    def layer_scores(self, model, layer: LayerSpec) -> dict[str, torch.Tensor]:
        out = None
        for name, mod in layer_modules(model, layer.index).items():
            out = add_scores(out, module_unit_sums(layer, name, merged_weight(mod).pow_(2)))
        return out


class RandomCriterion(Criterion):
    """One fixed random ranking per (seed, layer): redrawing at every step would make the EMA
    converge to 0.5 for every unit and the ranking change from update to update."""

    name = "random"
    needs_backward = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def layer_scores(self, model, layer: LayerSpec) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer.index)
        return {"heads": torch.rand(layer.num_heads, generator=g),
                "kv": torch.zeros(layer.num_kv_heads),
                "ffn": torch.rand(layer.intermediate_size, generator=g)}
