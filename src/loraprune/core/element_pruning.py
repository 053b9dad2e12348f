"""Element-level pruning (N:M, unstructured) during LoRA fine-tuning, behind the `Pruning` contract
(core/pruning.py); the scorers are in core/criteria/element.py.

Schedule: the fraction of the final pattern follows the ramp with final value 1: N:M prunes
round_half_up(frac·N) weights per block of M (0, 1, ..., N over the ramp), unstructured prunes
frac·sparsity of each group; both reach the final pattern exactly at the end of the ramp. While
masks are found, every covered LoRA Linear computes x @ ((W + s·B·A) ⊙ M)^T (core/masked_lora.py),
so training sees exactly what the merged, element-pruned model computes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import masked_lora
from .criteria.element import build_scorer
from .element_masks import ElementMasks
from .patterns import Pattern, parse_pattern
from .pruning import Pruning, check_finite
from .schedule import Ramp

log = logging.getLogger(__name__)


class ElementPruning(Pruning):
    state_key = "element"

    def __init__(self, emasks: ElementMasks, scorer, ramp: Ramp, *, unit_masks=None, iterative: bool = True):
        super().__init__(ramp, iterative)
        self.emasks, self.scorer, self.unit_masks = emasks, scorer, unit_masks
        self.level = 0.0          # fraction of the final pattern applied so far
        self.history: list[dict] = []
        self.scoring_on = True

    @property
    def keys(self):
        return list(self.emasks.keep)

    def setup(self, model) -> None:
        self.scorer.setup(model, self.keys)

    def scoring(self, step: int) -> bool:
        return self.scoring_on and super().scoring(step)

    def end_scoring(self, model) -> None:
        """No more scores are needed: drop the EMA / activation hooks (memory, time)."""
        if self.scoring_on:
            self.scorer.teardown(model)
            self.scoring_on = False

    def observe(self, model, reduce=None, step: int | None = None) -> None:
        """After backward (gradients averaged across ranks): fold this step's scores in."""
        if step is not None and not self.scoring(step):
            return
        self.scorer.observe(model, self.keys,
                            check=lambda key, t: check_finite(f"layer {key[0]} {key[1]} element", t, step))

    def maybe_update(self, model, step: int, reduce=None) -> bool:
        if not (self.iterative and self.ramp.is_update(step)):
            return False
        self.apply(model, self.ramp.ratio(step, 1.0), step, reduce)
        return True

    @torch.no_grad()
    def apply(self, model, frac: float, step: int, reduce=None) -> None:
        self.scorer.sync(reduce)
        for key in self.keys:
            sc = check_finite(f"layer {key[0]} {key[1]} element", self.scorer.scores(model, key), None)
            self.emasks.update(key, sc, frac, self.unit_masks)
        self.scorer.after_update()
        self.level = frac
        c = self.emasks.counts(self.unit_masks)
        self.history.append({"step": step, "level": frac, "zeros": c["zeros"], "sparsity": c["sparsity"]})
        log.info("step %d: element level %.3f, sparsity %.4f", step, frac, c["sparsity"])

    def calibrate(self, model, forward_backward, batches: int, reduce=None) -> None:
        """Oneshot: score on `batches` calibration batches (a plain mean for lora; the summed
        activations for wanda; nothing for magnitude), then prune to the final pattern at step 0."""
        sc = self.scorer
        if sc.name != "magnitude":
            ema = getattr(sc, "ema", None)
            for k in range(batches):
                if ema is not None:
                    sc.ema = k / (k + 1)  # running mean
                forward_backward()
                self.observe(model, reduce)
                model.zero_grad(set_to_none=True)
            if ema is not None:
                sc.ema = ema
        self.apply(model, 1.0, 0, reduce)

    def finalize(self, model, step: int) -> None:
        """The final pattern, exactly, also when the run ended before the ramp did. (The element
        update at the end of the ramp runs after the structured one of the same step, and units
        never change afterwards, so the blocks of kept columns are final then.)"""
        if self.level < 1.0:
            self.apply(model, 1.0, step)

    def progress(self) -> dict:
        return {"element_level": self.level}

    def handoff(self) -> dict:
        return {"element_masks": self.emasks}

    def checksum_tensors(self) -> list[torch.Tensor]:
        return [self.emasks.keep[k] for k in self.keys]

    def describe(self, report: dict) -> None:
        summary = self.emasks.summary(self.unit_masks)
        params = report.get("params_pruned")
        report["sparsity"] = {
            **summary, "history": self.history, "criterion": self.scorer.name,
            "nonzero_params": None if params is None else params - summary["zeros"],
            "note": "zeros/total count the weights of the seven projections that survive slicing; "
                    "nonzero_params = exported parameters minus those zeros"}
        verified = (report.get("export") or {}).get("sparsity_verified")
        if verified:  # the export measured what it wrote, block by block (export/verify.py)
            report["sparsity"]["verified"] = verified

    def write(self, out_dir, report: dict) -> None:
        """element_masks.safetensors (+ .json summary)."""
        self.emasks.save(Path(out_dir) / "element_masks.safetensors", self.unit_masks)

    def state_dict(self) -> dict:
        return {"level": self.level, "history": self.history, "masks": self.emasks.state_dict(),
                "scorer": self.scorer.state_dict(), "scoring": self.scoring_on}

    def load_state_dict(self, state: dict) -> None:
        self.level, self.history = float(state["level"]), list(state["history"])
        self.emasks.load_state_dict(state["masks"])
        self.scorer.load_state_dict(state["scorer"])
        self.scoring_on = bool(state.get("scoring", True))


def build_element_pruning(cfg, model, spec, unit_masks) -> ElementPruning | None:
    """From a PruneConfig: None for --pattern structured; else the masks (attached to the LoRA
    layers as masked forwards), the scorer (hooks registered) and the pruning."""
    pattern: Pattern = parse_pattern(cfg.pattern, cfg.sparsity)
    if not pattern.element:
        return None
    scorer = build_scorer(cfg.criterion, cfg.importance, cfg.ema)
    emasks = ElementMasks.for_model(model, spec.num_layers, pattern, group=scorer.group)
    emasks.check_shapes(None)
    masked_lora.attach(model, emasks)
    pruning = ElementPruning(emasks, scorer, Ramp.from_config(cfg), unit_masks=unit_masks if cfg.ratio > 0 else None,
                             iterative=cfg.schedule == "iterative")
    pruning.setup(model)
    return pruning
