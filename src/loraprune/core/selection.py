"""Which units and weights to prune: pure functions of scores (no model, no state). Units: the
top-scoring channels, the best GQA head shape; weights: the element patterns (N:M, unstructured).

Selection is monotone: weights pruned at an earlier update are preferred when choosing the ones to
prune now (ties among them by score), so in a pure N:M or unstructured run the mask only shrinks.
"""
from __future__ import annotations

import math

import torch

from .patterns import Pattern


def n_removed(ratio: float, n: int) -> int:
    """Units removed for a ratio: round half up (Python's round() would round 4.5 to 4)."""
    return int(math.floor(ratio * n + 0.5))


def top_kept(scores: torch.Tensor, kept: torch.Tensor, keep: int) -> torch.Tensor:
    """bool mask of the `keep` highest-scoring units among those still kept."""
    s = scores.float().masked_fill(~kept, float("-inf"))
    new = torch.zeros_like(kept)
    new[torch.topk(s, keep).indices] = True
    return new


def choose_heads(spec, m, shapes: list[tuple[int, int]], scores: dict):
    """(heads [H], kv [KV]) bool masks of the best of the given (a KV heads, b heads each) shapes:
    the best b kept query heads of every KV group, then the a groups with the highest total value
    (their heads' scores + the group's kv score)."""
    hs = scores["heads"].float().masked_fill(~m.heads, float("-inf")).view(spec.num_kv_heads, spec.n_rep)
    kvs = scores["kv"].float()
    best = None
    for a, b in shapes:
        top = torch.topk(hs, b, dim=1)  # best b query heads in every KV group
        group_val = (top.values.sum(1) + kvs).masked_fill(~m.kv, float("-inf"))
        groups = torch.topk(group_val, a).indices
        total = float(group_val[groups].sum())
        if best is None or total > best[0]:
            best = (total, groups, top.indices)
    _, groups, idx = best
    heads = torch.zeros(spec.num_kv_heads, spec.n_rep, dtype=torch.bool)
    for g in groups.tolist():
        heads[g, idx[g]] = True
    kv = torch.zeros(spec.num_kv_heads, dtype=torch.bool)
    kv[groups] = True
    return heads.view(-1), kv


def lowest(score: torch.Tensor, k: int, prefer: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """Bool mask of the k lowest entries along `dim`; entries where `prefer` is True come first
    (among themselves and among the others by score; ties by position)."""
    idx = torch.argsort(score, dim=dim, stable=True)
    if prefer is not None:
        p = torch.gather(prefer, dim, idx)
        idx = torch.gather(idx, dim, torch.argsort((~p).to(torch.int8), dim=dim, stable=True))
    out = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    out.scatter_(dim, idx.narrow(dim, 0, k), True)
    return out


def k_lowest(x: torch.Tensor, k: int) -> torch.Tensor:
    """`lowest(x, k)` along the last dim without sorting (kthvalue; ties by position): O(n)."""
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k >= x.shape[-1]:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    t = x.kthvalue(k, dim=-1, keepdim=True).values
    lt, eq = x < t, x == t
    need = k - lt.sum(-1, keepdim=True)
    return lt | (eq & (eq.cumsum(-1) <= need))


def _lowest_flat(x: torch.Tensor, k: int, prefer: torch.Tensor | None) -> torch.Tensor:
    """`lowest(x, k, prefer)` for 1-D x, in O(n) (kthvalue) instead of a sort."""
    if prefer is None or not bool(prefer.any()):
        return k_lowest(x, k)
    n_pref = int(prefer.sum())
    if n_pref >= k:  # only previously pruned entries are chosen: the k lowest of them
        return k_lowest(x.masked_fill(~prefer, float("inf")), k) & prefer
    return prefer | (k_lowest(x.masked_fill(prefer, float("inf")), k - n_pref) & ~prefer)


def submatrix(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, rows).index_select(1, cols)


def index_of(mask: torch.Tensor | None, n: int, device="cpu") -> torch.Tensor:
    return torch.arange(n, device=device) if mask is None else mask.to(device).nonzero().flatten()


def prune_selection(scores: torch.Tensor, pattern: Pattern, frac: float, *, keep: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                    group: str = "module") -> torch.Tensor:
    """The new keep mask [out, in] of one projection at `frac` (0..1) of its final pattern.

    scores [out, in]: higher = more important. keep: the current mask (pruned entries are preferred
    to stay pruned). rows [out] / cols [in]: bool, the rows/columns structured pruning keeps (None:
    all); only the sub-matrix rows x cols is pruned. group: for unstructured, `module` ranks all
    weights of the projection together, `row` ranks each output row separately (Wanda).
    N:M at frac: round_half_up(frac * N) zeros in every block of M consecutive kept columns."""
    out_f, in_f = scores.shape
    dev = scores.device
    r, c = index_of(rows, out_f, dev), index_of(cols, in_f, dev)
    new = torch.ones(out_f, in_f, dtype=torch.bool, device=dev) if keep is None else keep.to(dev, copy=True)
    if r.numel() == 0 or c.numel() == 0:
        return new
    whole = rows is None and cols is None
    sub = scores.float() if whole else submatrix(scores.float(), r, c)      # [R, C]
    pruned_now = None if keep is None else ~(keep.to(dev) if whole else submatrix(keep.to(dev), r, c))
    if pruned_now is not None and not bool(pruned_now.any()):
        pruned_now = None
    R, C = sub.shape
    if pattern.kind == "nm":
        if C % pattern.m:
            raise ValueError(f"{C} kept input columns are not a multiple of M={pattern.m}")
        k = n_removed(frac, pattern.n)
        blocks = sub.reshape(R, C // pattern.m, pattern.m)
        pref = None if pruned_now is None else pruned_now.reshape(R, C // pattern.m, pattern.m)
        drop = lowest(blocks, k, pref, dim=-1).view(R, C)
    elif pattern.kind == "unstructured":
        level = frac * pattern.sparsity
        if group == "row":
            k = n_removed(level, C)
            drop = k_lowest(sub, k) if pruned_now is None else lowest(sub, k, pruned_now, dim=-1)
        elif group == "module":
            flat_pref = None if pruned_now is None else pruned_now.reshape(-1)
            drop = _lowest_flat(sub.reshape(-1), n_removed(level, R * C), flat_pref).view(R, C)
        else:
            raise ValueError(f"unknown group {group!r}")
    else:
        raise ValueError(f"pattern {pattern.text} has no element level")
    if whole:
        return ~drop
    new[r[:, None], c[None, :]] = ~drop
    return new
