"""Slicing: remove the masked units' rows and columns from a (merged) state dict.

Kept units stay in their original order, so the kept query heads of kept KV head g form one
contiguous block and stock GQA (KV head j serves query heads j*n_rep' ... (j+1)*n_rep'-1) pairs
them correctly. o_proj / down_proj biases (output side) are untouched. Which slice belongs to which
unit is core/arch.PROJECTIONS.
"""
from __future__ import annotations

import torch

from ..core.arch import PROJECTIONS
from ..core.masks import MaskSet
from ..errors import UserError


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of `units` blocks of `size` rows each: [u0*size ... u0*size+size-1, u1*size ...]."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def layer_indices(masks: MaskSet, i: int) -> dict[str, torch.Tensor]:
    """Kept row/column indices of layer i per unit kind: heads (query-head rows), kv (KV-head rows),
    ffn (channels)."""
    s, m = masks.spec.layers[i], masks.layers[i]
    per_kv = m.heads.view(s.num_kv_heads, s.n_rep).sum(1)
    # The GQA rule: query heads only in kept groups, every kept group the same count.
    if per_kv[~m.kv].any() or len(set(per_kv[m.kv].tolist())) > 1 or not m.heads.any():
        raise UserError(f"masks of layer {i} break the GQA rule (kept query heads per kept KV head: "
                        f"{per_kv.tolist()}, KV heads kept: {m.kv.int().tolist()})")
    if m.ffn.sum() == 0:
        raise UserError(f"masks of layer {i} keep no FFN channel")
    return {u: _rows(masks.unit_mask(i, u).nonzero().flatten(), s.width(u)) for u in ("heads", "kv", "ffn")}


def slice_layer(sd: dict, prefix: str, idx: dict[str, torch.Tensor]) -> None:
    """Slice the seven projections of one decoder layer in the state dict (in place of the dict):
    rows (weight and bias) of row-side projections, columns (weight) of column-side ones."""
    for p in PROJECTIONS:
        keep = idx[p.unit]
        if p.side == "rows":
            for part in ("weight", "bias"):
                key = f"{prefix}.{p.path}.{part}"
                if key in sd:
                    sd[key] = sd[key].index_select(0, keep).contiguous()
        else:
            key = f"{prefix}.{p.path}.weight"
            sd[key] = sd[key].index_select(1, keep).contiguous()
