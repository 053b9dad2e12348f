"""Importance criteria by what they read (gradients, weights, activations), behind one contract
(criteria/base.py for units, criteria/element.py for element patterns), built by name here."""
from __future__ import annotations

from .activation import ActivationCriterion
from .base import Criterion
from .gradient import IMPORTANCE, LORA_PROJECTIONS, LoraCriterion, MaskTaylorCriterion, TaylorCriterion
from .weight import MagnitudeCriterion, RandomCriterion

UNIT_CRITERIA = {"lora": LoraCriterion, "mask-taylor": MaskTaylorCriterion, "taylor": TaylorCriterion,
                 "magnitude": MagnitudeCriterion, "activation": ActivationCriterion, "random": RandomCriterion}

__all__ = ["Criterion", "UNIT_CRITERIA", "IMPORTANCE", "LORA_PROJECTIONS", "build_criterion"]


def build_criterion(name: str, importance: str = "squared", masks=None, seed: int = 0,
                    lora_projections: str = "all") -> Criterion:
    if name == "lora":
        return LoraCriterion(importance, lora_projections)
    if name == "mask-taylor":
        return MaskTaylorCriterion(masks)
    if name == "random":
        return RandomCriterion(seed)
    if name not in UNIT_CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(UNIT_CRITERIA)}")
    return UNIT_CRITERIA[name]()
