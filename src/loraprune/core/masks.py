"""The mask set: which units of each layer are kept. It is the hand-off between finding masks
(pruning) and making the model small (export), and it serialises to plain JSON.

Masking is exact and cheap: a forward pre-hook multiplies the input of o_proj by the head mask
(expanded over head_dim) and the input of down_proj by the channel mask. Removing those columns of
o/down (and the matching rows of q/k/v/gate/up) then gives the same output, so
masked forward == sliced forward. The hooks work on stock nn.Linear and on peft LoRA wrappers alike.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .arch import PROJECTIONS, LayerSpec, ModelSpec, layer_modules
from .selection import choose_heads, n_removed, top_kept

FORMAT_VERSION = 1


def ffn_keep(ratio: float, n: int, round_to: int = 1) -> int:
    keep = n - n_removed(ratio, n)
    if round_to > 1 and keep < n:
        keep = max(round_to, int(math.floor(keep / round_to + 0.5)) * round_to)
        keep = min(keep, n)
    return keep


def head_shapes(spec: LayerSpec) -> list[tuple[int, int]]:
    """Every (kept KV heads, query heads per KV head) a stock GQA attention can have."""
    return [(a, b) for a in range(1, spec.num_kv_heads + 1) for b in range(1, spec.n_rep + 1)]


def final_head_shapes(spec: LayerSpec, ratio: float) -> list[tuple[int, int]]:
    """The shapes with the feasible kept-head count nearest to the target (ties: keep more)."""
    target = spec.num_heads - n_removed(ratio, spec.num_heads)
    counts = sorted({a * b for a, b in head_shapes(spec)}, key=lambda c: (abs(c - target), -c))
    best = counts[0]
    return [(a, b) for a, b in head_shapes(spec) if a * b == best]


@dataclass
class LayerMask:
    heads: torch.Tensor  # bool [num_heads]
    kv: torch.Tensor     # bool [num_kv_heads]
    ffn: torch.Tensor    # bool [intermediate_size]

    def head_shape(self, spec: LayerSpec) -> tuple[int, int]:
        """(kept KV heads, kept query heads per kept KV head); the GQA rule makes the second uniform."""
        per = self.heads.view(spec.num_kv_heads, spec.n_rep).sum(1)
        kept = per[self.kv]
        return int(self.kv.sum()), int(kept[0]) if kept.numel() else 0


class MaskSet:
    def __init__(self, spec: ModelSpec, prunable: list[int] | None = None, uniform_heads: bool = False):
        self.spec = spec
        # --uniform: every layer must end with the same (KV heads, heads per KV head); when several
        # shapes keep the target count (e.g. 6 of 9 = 2x3 or 3x2), all layers take the first one.
        self.uniform_heads = uniform_heads
        self.prunable = list(range(spec.num_layers)) if prunable is None else sorted(prunable)
        self.layers = [LayerMask(torch.ones(s.num_heads, dtype=torch.bool),
                                 torch.ones(s.num_kv_heads, dtype=torch.bool),
                                 torch.ones(s.intermediate_size, dtype=torch.bool)) for s in spec.layers]
        # Float gates the hooks multiply by; same storage is updated in place when masks change.
        self.head_gates = [torch.ones(s.num_heads) for s in spec.layers]
        self.ffn_gates = [torch.ones(s.intermediate_size) for s in spec.layers]
        self._handles: list = []

    # ---- counting -------------------------------------------------------------------------
    def kept_counts(self, i: int) -> dict:
        m = self.layers[i]
        return {"heads": int(m.heads.sum()), "kv_heads": int(m.kv.sum()), "ffn": int(m.ffn.sum())}

    def unit_mask(self, i: int, unit: str) -> torch.Tensor:
        """bool keep mask of one unit kind (heads, kv or ffn) of layer i."""
        m = self.layers[i]
        return {"heads": m.heads, "kv": m.kv, "ffn": m.ffn}[unit]

    def params_removed(self) -> int:
        """Parameters removed by slicing: every removed unit's rows / columns of hidden_size weights
        in the projections it owns, plus its bias entries on the row side when the model has those
        biases (o/down biases are on the output side and stay)."""
        total = 0
        for i, s in enumerate(self.spec.layers):
            for p in PROJECTIONS:
                removed = int((~self.unit_mask(i, p.unit)).sum()) * s.width(p.unit)
                total += removed * self.spec.hidden_size
                if p.side == "rows" and self.spec.has_bias(p):
                    total += removed
        return total

    # ---- updating -------------------------------------------------------------------------
    def update_layer(self, i: int, ratio: float, final_ratio: float, scores: dict, targets: list[str],
                     round_to: int = 1) -> None:
        """Shrink layer i to `ratio`, keeping the highest-scoring units among those still kept.

        scores: {"heads": [H], "kv": [KV], "ffn": [I]} (higher = more important).
        Masks only ever shrink. Intermediate head shapes are restricted to those from which a
        final shape (for final_ratio) is still reachable, so the final ratio is always met.
        """
        spec, m = self.spec.layers[i], self.layers[i]
        if "ffn" in targets:
            keep = min(ffn_keep(ratio, spec.intermediate_size, round_to), int(m.ffn.sum()))
            m.ffn = top_kept(scores["ffn"], m.ffn, keep)
        if "heads" in targets:
            self._update_heads(spec, m, ratio, final_ratio, scores)
        self.sync_gates(i)

    @torch.no_grad()
    def sync_gates(self, i: int) -> None:
        # in place: the hooks hold these tensors (and mask-taylor makes them autograd leaves)
        self.head_gates[i].copy_(self.layers[i].heads.float())
        self.ffn_gates[i].copy_(self.layers[i].ffn.float())

    def _update_heads(self, spec: LayerSpec, m: LayerMask, ratio: float, final_ratio: float,
                      scores: dict) -> None:
        a0, b0 = m.head_shape(spec)
        finals = final_head_shapes(spec, final_ratio)
        if self.uniform_heads:
            finals = finals[:1]
        target = spec.num_heads - n_removed(ratio, spec.num_heads)
        cands = [(a, b) for a, b in head_shapes(spec) if a <= a0 and b <= b0
                 and any(a >= af and b >= bf for af, bf in finals)]
        if ratio >= final_ratio:
            cands = [c for c in cands if c in finals] or cands
        best_count = min({a * b for a, b in cands}, key=lambda c: (abs(c - target), -c))
        m.heads, m.kv = choose_heads(spec, m, [c for c in cands if c[0] * c[1] == best_count], scores)

    def keep_layer(self, i: int, scores: dict, heads: int | None = None, ffn: int | None = None) -> None:
        """Shrink layer i to exactly `ffn` FFN channels and `heads` query heads (a GQA-feasible count
        reachable from the current shape), keeping the highest-scoring units; None leaves a kind as
        it is. Used by global allocation (core/allocation.py), which chooses the counts."""
        spec, m = self.spec.layers[i], self.layers[i]
        if ffn is not None:
            m.ffn = top_kept(scores["ffn"], m.ffn, min(ffn, int(m.ffn.sum())))
        if heads is not None:
            a0, b0 = m.head_shape(spec)
            cands = [(a, b) for a, b in head_shapes(spec) if a <= a0 and b <= b0 and a * b == heads]
            if not cands:
                raise ValueError(f"layer {i}: {heads} heads is no GQA shape reachable from {a0}x{b0}")
            m.heads, m.kv = choose_heads(spec, m, cands, scores)
        self.sync_gates(i)

    # ---- hooks ----------------------------------------------------------------------------
    def gate(self, i: int, unit: str) -> torch.Tensor:
        return self.head_gates[i] if unit == "heads" else self.ffn_gates[i]

    def attach(self, model) -> None:
        """Register the masking pre-hooks on the column-side projections (o_proj per head, down_proj
        per FFN channel) of every prunable layer: their input is multiplied by the unit's gate."""
        self.detach()
        for i in self.prunable:
            mods = layer_modules(model, i)
            for p in PROJECTIONS:
                if p.side != "cols":
                    continue
                hook = _gate_hook(self.gate(i, p.unit), self.spec.layers[i].width(p.unit))
                self._handles.append(mods[p.name].register_forward_pre_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def gate_parameters(self) -> list[torch.Tensor]:
        return self.head_gates + self.ffn_gates

    @contextmanager
    def opened(self):
        """Inside: every gate is 1 (the model computes as if nothing were masked); restored on exit.
        In place under no_grad, so the hooks keep their tensors (the dense teacher of distillation)."""
        saved = [g.detach().clone() for g in self.gate_parameters()]
        with torch.no_grad():
            for g in self.gate_parameters():
                g.fill_(1.0)
        try:
            yield
        finally:
            with torch.no_grad():
                for g, v in zip(self.gate_parameters(), saved):
                    g.copy_(v)

    def load_layers(self, other: "MaskSet") -> None:
        """Take the kept units of `other` (same spec), updating the gates the hooks hold in place."""
        for i in range(self.spec.num_layers):
            self.layers[i] = other.layers[i]
            self.sync_gates(i)

    def checksum_tensors(self) -> list[torch.Tensor]:
        return [t for m in self.layers for t in (m.heads, m.kv, m.ffn)]

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        layers = []
        for s, m in zip(self.spec.layers, self.layers):
            layers.append({
                "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
                "intermediate_size": s.intermediate_size, "head_dim": s.head_dim,
                "heads_kept": m.heads.nonzero().flatten().tolist(),
                "kv_heads_kept": m.kv.nonzero().flatten().tolist(),
                "ffn_kept": m.ffn.nonzero().flatten().tolist(),
            })
        return {"format": "loraprune-masks", "version": FORMAT_VERSION, "model_type": self.spec.model_type,
                "hidden_size": self.spec.hidden_size, "prunable_layers": self.prunable, "layers": layers}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def from_dict(cls, data: dict, spec: ModelSpec) -> "MaskSet":
        if data.get("format") != "loraprune-masks" or len(data.get("layers", [])) != spec.num_layers:
            raise UserError("masks file does not match this model (format or layer count differ)")
        ms = cls(spec, data.get("prunable_layers"))
        for i, (s, rec) in enumerate(zip(spec.layers, data["layers"])):
            if (rec["num_heads"], rec["num_kv_heads"], rec["intermediate_size"]) != (
                    s.num_heads, s.num_kv_heads, s.intermediate_size):
                raise UserError(f"masks file layer {i} shape differs from the model")
            m = ms.layers[i]
            m.heads = _bool(s.num_heads, rec["heads_kept"])
            m.kv = _bool(s.num_kv_heads, rec["kv_heads_kept"])
            m.ffn = _bool(s.intermediate_size, rec["ffn_kept"])
            ms.sync_gates(i)
        return ms

    @classmethod
    def load(cls, path: Path, spec: ModelSpec) -> "MaskSet":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read masks file {path}: {err}") from None
        return cls.from_dict(data, spec)


def _gate_hook(gate: torch.Tensor, width: int):
    """x [..., in] * the gate of each unit repeated over its `width` input columns."""
    if width == 1:
        def hook(_mod, args):
            x = args[0]
            return (x * gate.to(x.dtype),) + tuple(args[1:])
    else:
        def hook(_mod, args):
            x = args[0]
            return (x * gate.to(x.dtype).repeat_interleave(width),) + tuple(args[1:])
    return hook


def _bool(n: int, idx: list[int]) -> torch.Tensor:
    t = torch.zeros(n, dtype=torch.bool)
    t[torch.tensor(idx, dtype=torch.long)] = True
    return t


def step_gradients(model, masks: MaskSet) -> list[torch.Tensor]:
    """Every gradient a backward pass left: the model's parameters (LoRA; base weights while the
    taylor baseline scores) and the mask gates (mask-taylor)."""
    return ([p.grad for p in model.parameters() if p.grad is not None]
            + [g.grad for g in masks.gate_parameters() if g.grad is not None])


def clear_grads(model, masks: MaskSet) -> None:
    """Drop what step_gradients returns."""
    model.zero_grad(set_to_none=True)
    for g in masks.gate_parameters():
        g.grad = None
