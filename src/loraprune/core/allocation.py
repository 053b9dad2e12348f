"""Non-uniform allocation across layers (`--allocation global`).

Uniform allocation (the paper's) removes the same fraction of every pruned layer's units. Global
allocation removes the same NUMBER of units in total -- exactly as many heads and FFN channels as
uniform allocation would at this ratio (so both export the same parameter count: every head, and
every channel, costs the same parameters in every layer) -- but chooses them across layers:

* Scores are made comparable between layers by dividing each unit's score by the mean score of the
  layer's kept units of that kind ("relative importance": 1.0 is an average unit of its layer). Raw
  importance scales differ between layers by orders of magnitude with the LoRA and gradient scales
  there, which says little about how much removing a unit costs.
* FFN channels: the lowest relative scores over all pruned layers go, until the budget is met.
* Heads: a layer can only keep a feasible GQA count (a KV heads x b query heads each), so layers
  step down through their feasible counts; each step costs the relative scores of the heads it
  drops, and the cheapest step per head goes first until the budget is met (it may end a step short).
* Floor: every layer keeps at least `min_keep` of its units of each kind (and at least one).
Already-removed units stay removed and count toward the budget (masks only shrink).
"""
from __future__ import annotations

import heapq
import math

import torch

from .masks import MaskSet, ffn_keep, final_head_shapes, head_shapes


def relative(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """scores / mean over the kept units (1.0 = an average kept unit of this layer)."""
    s = scores.float()
    mean = float(s[kept].mean()) if kept.any() else 0.0
    return s / mean if mean > 0 and math.isfinite(mean) else s


def floor_count(n: int, min_keep: float) -> int:
    return max(1, math.ceil(min_keep * n))


def ffn_counts(masks: MaskSet, scores: dict, ratio: float, min_keep: float, round_to: int = 1) -> dict[int, int]:
    """Kept FFN channels per prunable layer under global allocation at `ratio`."""
    layers = masks.prunable
    budget = sum(s.intermediate_size - ffn_keep(ratio, s.intermediate_size, round_to)
                 for s in (masks.spec.layers[i] for i in layers))
    kept = {i: int(masks.layers[i].ffn.sum()) for i in layers}
    removed = sum(masks.spec.layers[i].intermediate_size - kept[i] for i in layers)
    cand = []  # (relative score, layer, channel) of every kept channel
    for i in layers:
        m = masks.layers[i].ffn
        rel = relative(scores[i]["ffn"], m)
        cand += [(float(rel[c]), i, c) for c in m.nonzero().flatten().tolist()]
    cand.sort()
    floors = {i: max(floor_count(masks.spec.layers[i].intermediate_size, min_keep), round_to) for i in layers}
    for _, i, _ in cand:
        if removed >= budget:
            break
        if kept[i] > floors[i]:
            kept[i] -= 1
            removed += 1
    if round_to > 1:  # whole multiples per layer (the total then matches to rounding)
        kept = {i: min(int(masks.layers[i].ffn.sum()), max(round_to, round(k / round_to) * round_to))
                for i, k in kept.items()}
    return kept


def _uniform_heads_kept(spec, ratio: float) -> int:
    a, b = final_head_shapes(spec, ratio)[0]
    return a * b


def head_counts(masks: MaskSet, scores: dict, ratio: float, min_keep: float) -> dict[int, int]:
    """Kept query heads per prunable layer (feasible GQA counts) under global allocation."""
    layers = masks.prunable
    spec = masks.spec
    budget = sum(spec.layers[i].num_heads - _uniform_heads_kept(spec.layers[i], ratio) for i in layers)
    kept = {i: int(masks.layers[i].heads.sum()) for i in layers}
    removed = sum(spec.layers[i].num_heads - kept[i] for i in layers)
    order, steps = {}, []
    for i in layers:
        m, s = masks.layers[i], spec.layers[i]
        rel = relative(scores[i]["heads"], m.heads)[m.heads]
        order[i] = torch.sort(rel).values.tolist()        # kept heads, least important first
        a0, b0 = m.head_shape(s)
        floor = floor_count(s.num_heads, min_keep)
        counts = sorted({a * b for a, b in head_shapes(s) if a <= a0 and b <= b0 and a * b >= floor}, reverse=True)
        order[i] = (order[i], counts)
        _push(steps, i, kept[i], order[i])
    while removed < budget and steps:
        _, i, new = heapq.heappop(steps)
        if new != _next(kept[i], order[i][1]) or kept[i] - new > budget - removed:
            continue  # stale, or this step would overshoot: the layer stays where it is
        removed += kept[i] - new
        kept[i] = new
        _push(steps, i, kept[i], order[i])
    return kept


def _next(count: int, counts: list[int]) -> int | None:
    smaller = [c for c in counts if c < count]
    return smaller[0] if smaller else None


def _push(steps: list, i: int, count: int, order) -> None:
    """Queue layer i's next step down (cost per head dropped, layer, new count)."""
    rel, counts = order
    new = _next(count, counts)
    if new is None:
        return
    dropped = len(rel) - count                               # heads already dropped by earlier steps
    cost = sum(rel[dropped:dropped + count - new]) / (count - new)
    heapq.heappush(steps, (cost, i, new))
