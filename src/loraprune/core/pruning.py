"""One pruning contract for every granularity, and structured (unit) pruning behind it.

A `Pruning` finds masks while LoRA trains; the loop (run/loop.py) calls every active pruning in
order, units before elements (N:M blocks are formed over the columns the units keep):

    begin_step(model, step)            drop what scoring costs once scores can no longer matter
    observe(model, reduce, step)       after a backward (gradients averaged): fold the scores in
    maybe_update(model, step, reduce)  on the schedule's steps: shrink the masks; True if they changed
    calibrate(model, forward_backward, batches, reduce)   oneshot: score, then prune to the final ratio
    finalize(model, step)              the final ratio, exactly, also if the run ended early
    state_dict() / load_state_dict()   checkpoint state, under `state_key`
    progress() / describe(report) / write(out_dir, report) / handoff()   what the run reports and writes
    checksum_tensors()                 what `--debug-sync` compares across ranks

Masks are the hand-off between finding them and making the model small (export/): `handoff()`
returns the keyword arguments of export_compact this pruning provides.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import faults
from .masks import MaskSet
from .schedule import Ramp

log = logging.getLogger(__name__)


class NonFiniteScores(RuntimeError):
    pass


def check_finite(what: str, t: torch.Tensor, step: int | None) -> torch.Tensor:
    """Never rank on a NaN: raise. (`loraprune.faults` can poison the scores of a chosen step.)"""
    if step is not None and faults.scores(step):
        t = torch.full_like(t, float("nan"))
    if not torch.isfinite(t).all():
        raise NonFiniteScores(f"{what} importance is not finite")
    return t


class Pruning:
    state_key = ""

    def __init__(self, ramp: Ramp, iterative: bool = True):
        self.ramp, self.iterative = ramp, iterative

    def scoring(self, step: int) -> bool:
        """Whether the loop's step `step` is scored (iterative schedule, until the ramp ends)."""
        return self.iterative and self.ramp.scores_matter(step)

    def begin_step(self, model, step: int) -> None:
        if not self.scoring(step):
            self.end_scoring(model)

    def end_scoring(self, model) -> None:
        """No more scores are needed (idempotent)."""

    def progress(self) -> dict:
        return {}

    def describe(self, report: dict) -> None:
        """Add this pruning's part to report.json."""

    def write(self, out_dir, report: dict) -> None:
        """Write this pruning's hand-off files next to masks.json."""

    def handoff(self) -> dict:
        return {}

    def checksum_tensors(self) -> list[torch.Tensor]:
        return []


@dataclass(frozen=True)
class UnitTarget:
    """What unit pruning aims at: the final ratio, which unit kinds, FFN rounding, and how the units
    to remove are allocated across layers (core/allocation.py)."""
    ratio: float
    targets: tuple = ("heads", "ffn")
    round_to: int = 1
    allocation: str = "uniform"     # uniform (paper) or global
    min_keep: float = 0.1           # global: every layer keeps at least this fraction of each kind

    @classmethod
    def from_config(cls, cfg) -> "UnitTarget":
        return cls(cfg.ratio, tuple(cfg.target_list), cfg.round_to, cfg.allocation, cfg.min_keep)


class UnitPruning(Pruning):
    """Heads, KV groups and FFN channels: score after each backward, smooth with an EMA, and on the
    schedule's update steps shrink the masks toward the current ratio (every layer alike, or
    allocated across layers)."""

    state_key = "pruner"

    def __init__(self, masks: MaskSet, criterion, ramp: Ramp, target: UnitTarget, *, ema: float = 0.9,
                 iterative: bool = True):
        super().__init__(ramp, iterative)
        self.masks, self.spec, self.criterion, self.target = masks, masks.spec, criterion, target
        self.ratio, self.targets, self.ema, self.round_to = target.ratio, list(target.targets), ema, target.round_to
        self.scores: dict[int, dict[str, torch.Tensor]] = {}
        self.current_ratio = 0.0
        self.history: list[dict] = []

    def end_scoring(self, model) -> None:
        self.criterion.teardown(model)

    def observe(self, model, reduce=None, step: int | None = None) -> None:
        """Fold this step's scores into the moving average (first observation initialises it).
        `reduce` (data parallel) averages the scores across ranks in place so masks agree."""
        if step is not None and not self.scoring(step):
            return
        self._fold(model, reduce, step)

    def _fold(self, model, reduce, step: int | None) -> None:
        # step: the loop's step, 0 for oneshot calibration (the fault switch can target either)
        for i in self.masks.prunable:
            new = self.criterion.layer_scores(model, self.spec.layers[i])
            if reduce is not None:
                reduce(list(new.values()))
            new = {k: check_finite(f"layer {i} {k}", v, step) for k, v in new.items()}
            old = self.scores.get(i)
            if old is None:
                self.scores[i] = {k: v.detach().float().clone() for k, v in new.items()}
            else:
                for k, v in new.items():
                    old[k].mul_(self.ema).add_(v.detach().float(), alpha=1.0 - self.ema)

    def maybe_update(self, model, step: int, reduce=None) -> bool:
        if not (self.iterative and self.ramp.is_update(step)):
            return False
        self.apply_ratio(self.ramp.ratio(step, self.ratio), step)
        return True

    def calibrate(self, model, forward_backward, batches: int, reduce=None) -> None:
        """Oneshot: score on `batches` calibration batches (the plain mean: an EMA would weight the
        first batch most), then prune to the final ratio at step 0. `forward_backward()` runs one
        batch forward and backward with gradients averaged across ranks; gradients are dropped here."""
        from .masks import clear_grads

        ema = self.ema
        try:
            for k in range(batches):
                self.ema = k / (k + 1)  # running mean
                forward_backward()
                self._fold(model, reduce, 0)
                clear_grads(model, self.masks)
        finally:
            self.ema = ema
        self.apply_ratio(self.ratio, 0)

    def apply_ratio(self, r: float, step: int) -> None:
        if not self.scores:
            raise RuntimeError("no importance scores yet: observe() must run before masks update")
        if self.target.allocation == "global":
            self._apply_global(r)
        else:
            for i in self.masks.prunable:
                self.masks.update_layer(i, r, self.ratio, self.scores[i], self.targets, self.round_to)
        self.current_ratio = r
        kept = [self.masks.kept_counts(i) for i in self.masks.prunable]
        self.history.append({"step": step, "ratio": r,
                             "heads_kept": sum(k["heads"] for k in kept),
                             "ffn_kept": sum(k["ffn"] for k in kept)})
        log.info("step %d: ratio %.4f", step, r)

    def _apply_global(self, r: float) -> None:
        from . import allocation

        t = self.target
        ffn = allocation.ffn_counts(self.masks, self.scores, r, t.min_keep, t.round_to) if "ffn" in self.targets else {}
        heads = allocation.head_counts(self.masks, self.scores, r, t.min_keep) if "heads" in self.targets else {}
        for i in self.masks.prunable:
            self.masks.keep_layer(i, self.scores[i], heads=heads.get(i), ffn=ffn.get(i))

    def finalize(self, model, step: int) -> None:
        """Make sure the final ratio is reached even if the run ended before the ramp did."""
        if self.current_ratio < self.ratio:
            self.apply_ratio(self.ratio, step)

    def progress(self) -> dict:
        return {"ratio": self.current_ratio}

    def describe(self, report: dict) -> None:
        report["mask_history"] = self.history
        report["unit_criterion"] = self.criterion.name
        report["allocation"] = {"kind": self.target.allocation, "min_keep": self.target.min_keep}

    def checksum_tensors(self) -> list[torch.Tensor]:
        return self.masks.checksum_tensors()

    def state_dict(self) -> dict:
        return {"scores": {str(i): v for i, v in self.scores.items()}, "current_ratio": self.current_ratio,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.scores = {int(i): v for i, v in state["scores"].items()}
        self.current_ratio = state["current_ratio"]
        self.history = list(state["history"])
