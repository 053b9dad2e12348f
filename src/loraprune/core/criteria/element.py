"""Element scorers: the criteria of element patterns (N:M, unstructured).

Contract: `scores(model, key) -> [out, in]` for projection key = (layer, name), higher = keep;
`observe(model, keys)` after every backward while scores matter; `sync(reduce)` before masks
update (data parallel: make every rank's scores equal); `after_update()` once masks changed;
`group` says how unstructured pruning ranks: per `module` or per output `row`.

  lora       EMA of the LoRA-guided element importance (criteria/gradient.lora_element_importance,
             (W'⊙Ĝ)² or the abs-norm variant). Ranking per module (unstructured) / per block (N:M).
  magnitude  |W'| of the merged weight W' = W + s·B·A (at the start of fine-tuning W' = W).
  wanda      |W'_oj| · ||X_j||_2 (Sun et al. 2023), X the input of the projection over the tokens
             seen since the last update (the calibration batches in the one-shot schedule);
             unstructured pruning ranks each output row separately, as Wanda does.
The structured form of wanda (scores summed over whole units) is the `activation` criterion, which
a wanda run uses for its units when it also prunes units (--ratio > 0); the report records it.
"""
from __future__ import annotations

import torch

from ..arch import key_name, layer_modules, parse_key
from ..lora import merged_weight
from .activation import InputSquares
from .gradient import lora_element_importance


class ElementScorer:
    name = ""
    needs_backward = False
    group = "module"
    unit_criterion = ""   # the structured criterion a run with --ratio > 0 uses for its units

    def setup(self, model, keys) -> None:
        """Once, after the masked forwards are attached."""

    def observe(self, model, keys, check=None) -> None:
        """After a backward pass (gradients averaged across ranks); `check(key, scores)` returns
        the scores or raises when they are not finite."""

    def sync(self, reduce) -> None:
        """Before an update: make per-rank statistics equal (data parallel)."""

    def after_update(self) -> None:
        """After the masks changed."""

    def scores(self, model, key) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def teardown(self, model) -> None:
        """No more scores are needed: drop what scoring costs."""


class LoraElementScorer(ElementScorer):
    name, needs_backward, unit_criterion = "lora", True, "lora"

    def __init__(self, importance: str = "squared", ema: float = 0.9):
        self.importance, self.ema = importance, ema
        self.avg: dict[tuple[int, str], torch.Tensor] = {}   # [out, in] fp32 per projection

    def observe(self, model, keys, check=None) -> None:
        for key in keys:
            new = lora_element_importance(layer_modules(model, key[0])[key[1]], self.importance)
            if check is not None:
                new = check(key, new)
            old = self.avg.get(key)
            if old is None:
                self.avg[key] = new.float()
            else:
                old.mul_(self.ema).add_(new, alpha=1.0 - self.ema)

    def scores(self, model, key) -> torch.Tensor:
        if key not in self.avg:
            raise RuntimeError("no LoRA element importance yet: observe() must run before masks update")
        return self.avg[key]

    def state_dict(self) -> dict:
        return {key_name(*k): v for k, v in self.avg.items()}

    def load_state_dict(self, state: dict) -> None:
        self.avg = {parse_key(k): v.float() for k, v in state.items()}

    def teardown(self, model) -> None:
        self.avg = {}


class MagnitudeElementScorer(ElementScorer):
    name, unit_criterion = "magnitude", "magnitude"

    def scores(self, model, key) -> torch.Tensor:
        return merged_weight(layer_modules(model, key[0])[key[1]]).abs_()


class WandaElementScorer(ElementScorer):
    name, group, unit_criterion = "wanda", "row", "activation"

    def __init__(self):
        self.inputs = InputSquares()

    def setup(self, model, keys) -> None:
        self.inputs.watch(model, keys)

    def sync(self, reduce) -> None:
        if reduce is not None:  # the same ||X|| on every rank
            reduce([v for _, v in sorted(self.inputs.sq.items())])

    def after_update(self) -> None:
        self.inputs.sq = {}  # the next update sees the tokens since this one

    def scores(self, model, key) -> torch.Tensor:
        sq = self.inputs.sq.get(key)
        if sq is None:
            raise RuntimeError("no activations recorded for wanda: run forward passes before scoring")
        return merged_weight(layer_modules(model, key[0])[key[1]]).abs_().mul_(sq.sqrt()[None, :])

    def state_dict(self) -> dict:
        return {key_name(*k): v for k, v in self.inputs.sq.items()}

    def load_state_dict(self, state: dict) -> None:
        self.inputs.sq = {parse_key(k): v for k, v in state.items()}

    def teardown(self, model) -> None:
        self.inputs.close()


ELEMENT_SCORERS = {"lora": LoraElementScorer, "magnitude": MagnitudeElementScorer, "wanda": WandaElementScorer}


def build_scorer(name: str, importance: str = "squared", ema: float = 0.9) -> ElementScorer:
    if name == "lora":
        return LoraElementScorer(importance, ema)
    if name not in ELEMENT_SCORERS:
        raise ValueError(f"unknown element criterion {name!r}; choose one of {', '.join(ELEMENT_SCORERS)}")
    return ELEMENT_SCORERS[name]()
