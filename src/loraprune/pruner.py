"""The loop glue: after each backward, score units, smooth with an EMA, and on the schedule's
update steps shrink the masks toward the current ratio."""
from __future__ import annotations

import logging

import torch

from .arch import ModelSpec
from .masks import MaskSet
from .schedule import is_update_step, ramp_bounds, ratio_at

log = logging.getLogger(__name__)


class NonFiniteScores(RuntimeError):
    pass


class Pruner:
    def __init__(self, spec: ModelSpec, masks: MaskSet, criterion, *, ratio: float, targets: list[str],
                 total_steps: int, prune_every: int = 5, warmup_frac: float = 0.1,
                 cooldown_frac: float = 0.2, ema: float = 0.9, round_to: int = 1):
        self.spec, self.masks, self.criterion = spec, masks, criterion
        self.ratio, self.targets, self.round_to = ratio, targets, round_to
        self.total_steps, self.prune_every = total_steps, prune_every
        self.warmup_frac, self.cooldown_frac, self.ema = warmup_frac, cooldown_frac, ema
        self.scores: dict[int, dict[str, torch.Tensor]] = {}
        self.current_ratio = 0.0
        self.history: list[dict] = []

    def observe(self, model, reduce=None, poison: bool = False) -> None:
        """Fold this step's scores into the moving average (first observation initialises it).
        `reduce` (data parallel) averages the scores across ranks in place so masks agree.
        `poison` (test-only fault injection, loraprune.faults) makes them NaN."""
        for i in self.masks.prunable:
            new = self.criterion.layer_scores(model, self.spec.layers[i])
            if poison:
                new = {k: torch.full_like(v, float("nan")) for k, v in new.items()}
            if reduce is not None:
                reduce(list(new.values()))
            for key, val in new.items():
                if not torch.isfinite(val).all():
                    raise NonFiniteScores(f"layer {i} {key} importance is not finite")
            old = self.scores.get(i)
            if old is None:
                self.scores[i] = {k: v.detach().float().clone() for k, v in new.items()}
            else:
                for k, v in new.items():
                    old[k].mul_(self.ema).add_(v.detach().float(), alpha=1.0 - self.ema)

    def needs_scores(self, step: int) -> bool:
        """Whether the scores of this step can still matter (they cannot after the final update)."""
        _, end = ramp_bounds(self.total_steps, self.warmup_frac, self.cooldown_frac)
        return step <= end

    def maybe_update(self, step: int) -> bool:
        if not is_update_step(step, self.total_steps, self.prune_every, self.warmup_frac,
                              self.cooldown_frac):
            return False
        self.apply_ratio(ratio_at(step, self.total_steps, self.ratio, self.warmup_frac,
                                  self.cooldown_frac), step)
        return True

    def apply_ratio(self, r: float, step: int) -> None:
        if not self.scores:
            raise RuntimeError("no importance scores yet: observe() must run before masks update")
        for i in self.masks.prunable:
            self.masks.update_layer(i, r, self.ratio, self.scores[i], self.targets, self.round_to)
        self.current_ratio = r
        kept = [self.masks.kept_counts(i) for i in self.masks.prunable]
        self.history.append({"step": step, "ratio": r,
                             "heads_kept": sum(k["heads"] for k in kept),
                             "ffn_kept": sum(k["ffn"] for k in kept)})
        log.info("step %d: ratio %.4f", step, r)

    def finalize(self, step: int) -> None:
        """Make sure the final ratio is reached even if the run ended before the ramp did."""
        if self.current_ratio < self.ratio:
            self.apply_ratio(self.ratio, step)

    def state_dict(self) -> dict:
        return {"scores": {str(i): v for i, v in self.scores.items()}, "current_ratio": self.current_ratio,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.scores = {int(i): v for i, v in state["scores"].items()}
        self.current_ratio = state["current_ratio"]
        self.history = list(state["history"])
