"""Per-unit sums of element scores: the rows and columns each unit owns (core/arch.PROJECTIONS).

A criterion scores one projection at a time ([out, in] element scores, a single such tensor alive)
and folds the per-unit sums into {"heads": [H], "kv": [KV], "ffn": [I]} for the layer.
"""
from __future__ import annotations

import torch

from .arch import PROJ, UNIT_KINDS, LayerSpec


def zero_scores(spec: LayerSpec, like: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return {u: torch.zeros(spec.count(u), **kw) for u in UNIT_KINDS}


def module_unit_sums(spec: LayerSpec, name: str, elem: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-unit sums of ONE projection's element scores [out, in] (zeros for the unit kinds it does
    not touch): a unit's rows for row-side projections, its columns for column-side ones."""
    if name not in PROJ:
        raise KeyError(f"not a prunable projection: {name}")
    p = PROJ[name]
    out = zero_scores(spec, elem)
    n, w = spec.count(p.unit), spec.width(p.unit)
    if p.side == "rows":
        out[p.unit] += elem.sum(1) if w == 1 else elem.reshape(n, w, -1).sum((1, 2))
    else:
        out[p.unit] += elem.sum(0) if w == 1 else elem.reshape(-1, n, w).sum((0, 2))
    return out


def add_scores(acc: dict | None, new: dict) -> dict:
    if acc is None:
        return new
    for k, v in new.items():
        acc[k] += v
    return acc


def unit_sums(spec: LayerSpec, elem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum element scores [out, in] of several projections (name -> scores) into per-unit scores."""
    acc = None
    for name, e in elem.items():
        acc = add_scores(acc, module_unit_sums(spec, name, e))
    return acc


def owned_mask(unit_mask: torch.Tensor, spec: LayerSpec, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kept rows [out] or None, kept columns [in] or None) of projection `name` when its owning units
    are kept as in `unit_mask` (bool [count(unit)])."""
    p = PROJ[name]
    full = unit_mask.repeat_interleave(spec.width(p.unit))
    return (full, None) if p.side == "rows" else (None, full)
