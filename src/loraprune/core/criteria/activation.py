"""Criteria that read activations: per-feature input norms recorded by forward pre-hooks.

`InputSquares` accumulates sum_t x_tj^2 (fp32, [in]) of each watched projection's input over the
tokens seen since it was last read. Its hooks are registered after the unit-mask hooks, so they see
the gated input (a masked unit's o/down input columns are zero). Forward only: no gradient is read.
The structured `activation` criterion and the element `wanda` scorer (criteria/element.py) share it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..arch import LayerSpec, layer_modules
from ..lora import merged_weight
from ..units import add_scores, module_unit_sums
from .base import Criterion


class InputSquares:
    _paused = 0  # > 0 inside paused(): no instance records (the dense teacher's forward)

    @classmethod
    @contextmanager
    def paused(cls):
        cls._paused += 1
        try:
            yield
        finally:
            cls._paused -= 1

    def __init__(self):
        self.sq: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list = []

    def watch(self, model, keys) -> None:
        self.close()
        for key in keys:
            mod = layer_modules(model, key[0])[key[1]]
            self._handles.append(mod.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key):
        def hook(_mod, args):
            if InputSquares._paused:
                return
            x = args[0].detach()
            sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)  # [in]
            prev = self.sq.get(key)
            self.sq[key] = sq if prev is None else prev.add_(sq)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.sq = [], {}


class ActivationCriterion(Criterion):
    """Wanda-style: element score |W'_oj| * ||X_j||_2, summed over the unit's weights, X the input of
    the projection over all tokens seen since the last call."""

    name = "activation"
    needs_backward = False

    def __init__(self):
        self.inputs = InputSquares()

    def setup(self, model, spec, masks) -> None:
        self.inputs.watch(model, [(i, name) for i in masks.prunable for name in layer_modules(model, i)])

    def teardown(self, model) -> None:
        self.inputs.close()

    def layer_scores(self, model, layer: LayerSpec) -> dict[str, torch.Tensor]:
        out = None
        for name, mod in layer_modules(model, layer.index).items():
            sq = self.inputs.sq.pop((layer.index, name), None)
            if sq is None:
                raise RuntimeError("no activations recorded: the activation criterion needs setup() "
                                   "and a forward pass before scoring")
            with torch.no_grad():
                elem = merged_weight(mod).abs_().mul_(sq.sqrt().to(torch.float32)[None, :])
            out = add_scores(out, module_unit_sums(layer, name, elem))
        return out
