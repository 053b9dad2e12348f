"""Element-level pruning during LoRA fine-tuning: scorers and the loop glue (the element twin of
criteria.py + pruner.py).

Scorers (contract: `scores(model, key) -> [out, in]`, higher = keep; `group` says how unstructured
pruning ranks: per `module` or per output `row`):
  lora       EMA of the LoRA-guided element importance `criteria.lora_element_importance`
             ((W'⊙Ĝ)² or the abs-norm variant), folded in after every backward while scores matter.
             Ranking per module (unstructured) / per block (N:M).
  magnitude  |W'| of the merged weight W' = W + s·B·A (at the start of fine-tuning W' = W).
  wanda      |W'_oj| · ||X_j||_2 (Sun et al. 2023), X the input of the projection over the tokens
             seen since the last update (the calibration batches in the one-shot schedule);
             unstructured pruning ranks each output row separately, as Wanda does.

Schedule: the fraction of the final pattern follows schedule.ratio_at(step, ..., final=1): N:M prunes
round_half_up(frac·N) weights per block of M (0, 1, ..., N over the ramp), unstructured prunes
frac·sparsity of each group; both reach the final pattern exactly at the end of the ramp.
"""
from __future__ import annotations

import logging

import torch

from .arch import layer_modules
from .baselines import merged_weight
from .criteria import lora_element_importance
from .pruner import NonFiniteScores
from .schedule import is_update_step, ramp_bounds, ratio_at
from .sparsity import ElementMasks, Pattern, key_name, parse_key

log = logging.getLogger(__name__)
ELEMENT_CRITERIA = ("lora", "magnitude", "wanda")


def _check(key, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteScores(f"layer {key[0]} {key[1]} element importance is not finite")


class LoraElementScorer:
    name = "lora"
    needs_backward = True
    group = "module"

    def __init__(self, importance: str = "squared", ema: float = 0.9):
        self.importance, self.ema = importance, ema
        self.avg: dict[tuple[int, str], torch.Tensor] = {}   # [out, in] fp32 per projection

    def observe(self, model, keys) -> None:
        for key in keys:
            new = lora_element_importance(layer_modules(model, key[0])[key[1]], self.importance)
            _check(key, new)
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


class MagnitudeElementScorer:
    name = "magnitude"
    needs_backward = False
    group = "module"

    def observe(self, model, keys) -> None:
        pass

    def scores(self, model, key) -> torch.Tensor:
        return merged_weight(layer_modules(model, key[0])[key[1]]).abs_()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def teardown(self, model) -> None:
        pass


class WandaElementScorer:
    """Forward pre-hooks accumulate sum_t x_tj^2 ([in], fp32) of each projection's input. They are
    registered after the unit-mask hooks, so they see the gated input."""
    name = "wanda"
    needs_backward = False
    group = "row"

    def __init__(self):
        self.sq: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list = []

    def setup(self, model, keys) -> None:
        self.teardown(model)
        for key in keys:
            self._handles.append(layer_modules(model, key[0])[key[1]].register_forward_pre_hook(self._hook(key)))

    def _hook(self, key):
        def hook(_mod, args):
            x = args[0].detach()
            sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)
            prev = self.sq.get(key)
            self.sq[key] = sq if prev is None else prev.add_(sq)
        return hook

    def observe(self, model, keys) -> None:
        pass

    def scores(self, model, key) -> torch.Tensor:
        sq = self.sq.get(key)
        if sq is None:
            raise RuntimeError("no activations recorded for wanda: run forward passes before scoring")
        return merged_weight(layer_modules(model, key[0])[key[1]]).abs_().mul_(sq.sqrt()[None, :])

    def reset(self) -> None:
        self.sq = {}

    def state_dict(self) -> dict:
        return {key_name(*k): v for k, v in self.sq.items()}

    def load_state_dict(self, state: dict) -> None:
        self.sq = {parse_key(k): v for k, v in state.items()}

    def teardown(self, model) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.sq = [], {}


def build_scorer(name: str, importance: str = "squared", ema: float = 0.9):
    if name == "lora":
        return LoraElementScorer(importance, ema)
    if name == "magnitude":
        return MagnitudeElementScorer()
    if name == "wanda":
        return WandaElementScorer()
    raise ValueError(f"unknown element criterion {name!r}; choose one of {', '.join(ELEMENT_CRITERIA)}")


class ElementPruner:
    def __init__(self, emasks: ElementMasks, scorer, *, unit_masks=None, total_steps: int, prune_every: int = 5,
                 warmup_frac: float = 0.1, cooldown_frac: float = 0.2):
        self.emasks, self.scorer, self.unit_masks = emasks, scorer, unit_masks
        self.total_steps, self.prune_every = total_steps, prune_every
        self.warmup_frac, self.cooldown_frac = warmup_frac, cooldown_frac
        self.level = 0.0          # fraction of the final pattern applied so far
        self.history: list[dict] = []
        self.scoring = True

    @property
    def keys(self):
        return list(self.emasks.keep)

    def setup(self, model) -> None:
        if hasattr(self.scorer, "setup"):
            self.scorer.setup(model, self.keys)

    def needs_scores(self, step: int) -> bool:
        _, end = ramp_bounds(self.total_steps, self.warmup_frac, self.cooldown_frac)
        return self.scoring and step <= end

    def observe(self, model) -> None:
        """After backward (gradients averaged across ranks): fold this step's scores in."""
        self.scorer.observe(model, self.keys)

    def maybe_update(self, model, step: int, reduce=None) -> bool:
        if not is_update_step(step, self.total_steps, self.prune_every, self.warmup_frac, self.cooldown_frac):
            return False
        self.apply(model, ratio_at(step, self.total_steps, 1.0, self.warmup_frac, self.cooldown_frac), step, reduce)
        return True

    @torch.no_grad()
    def apply(self, model, frac: float, step: int, reduce=None) -> None:
        if isinstance(self.scorer, WandaElementScorer) and reduce is not None:
            reduce([self.scorer.sq[k] for k in self.keys if k in self.scorer.sq])  # same ||X|| on every rank
        for key in self.keys:
            sc = self.scorer.scores(model, key)
            _check(key, sc)
            self.emasks.update(key, sc, frac, self.unit_masks)
        if isinstance(self.scorer, WandaElementScorer):
            self.scorer.reset()
        self.level = frac
        c = self.emasks.counts(self.unit_masks)
        self.history.append({"step": step, "level": frac, "zeros": c["zeros"], "sparsity": c["sparsity"]})
        log.info("step %d: element level %.3f, sparsity %.4f", step, frac, c["sparsity"])

    def finalize(self, model, step: int) -> None:
        """The final pattern, exactly, also when the run ended before the ramp did. (The element
        update at the end of the ramp runs after the structured one of the same step, and units
        never change afterwards, so the blocks of kept columns are final then.)"""
        if self.level < 1.0:
            self.apply(model, 1.0, step)

    def teardown(self, model) -> None:
        """No more scores are needed: drop the EMA / activation hooks (memory, time)."""
        if self.scoring:
            self.scorer.teardown(model)
            self.scoring = False

    def state_dict(self) -> dict:
        return {"level": self.level, "history": self.history, "masks": self.emasks.state_dict(),
                "scorer": self.scorer.state_dict(), "scoring": self.scoring}

    def load_state_dict(self, state: dict) -> None:
        self.level, self.history = float(state["level"]), list(state["history"])
        self.emasks.load_state_dict(state["masks"])
        self.scorer.load_state_dict(state["scorer"])
        self.scoring = bool(state.get("scoring", True))


def build_element_pruner(cfg, model, spec, unit_masks) -> ElementPruner | None:
    """From a PruneConfig: None for --pattern structured; else the masks (attached to the LoRA
    layers as masked forwards), the scorer (hooks registered) and the pruner."""
    from . import masked_lora
    from .sparsity import parse_pattern

    pattern: Pattern = parse_pattern(cfg.pattern, cfg.sparsity)
    if not pattern.element:
        return None
    scorer = build_scorer(cfg.criterion, cfg.importance, cfg.ema)
    emasks = ElementMasks.for_model(model, spec.num_layers, pattern, group=scorer.group)
    emasks.check_shapes(None)
    masked_lora.attach(model, emasks)
    pruner = ElementPruner(emasks, scorer, unit_masks=unit_masks if cfg.ratio > 0 else None,
                           total_steps=cfg.steps, prune_every=cfg.prune_every, warmup_frac=cfg.warmup_frac,
                           cooldown_frac=cfg.cooldown_frac)
    pruner.setup(model)
    return pruner


def oneshot_element_scores(model, epruner: ElementPruner, forward_backward, calib_batches: int,
                           reduce=None) -> None:
    """One-shot: score on `calib_batches` calibration batches (a plain mean for lora; the summed
    activations for wanda; nothing for magnitude), then prune to the final pattern at step 0.
    `forward_backward()` runs one training batch forward and backward (gradients are cleared here)."""
    sc = epruner.scorer
    if sc.name != "magnitude":
        ema = getattr(sc, "ema", None)
        for k in range(calib_batches):
            if ema is not None:
                sc.ema = k / (k + 1)  # running mean
            forward_backward()
            epruner.observe(model)
            model.zero_grad(set_to_none=True)
        if ema is not None:
            sc.ema = ema
    epruner.apply(model, 1.0, 0, reduce)


def write_element_outputs(epruner: ElementPruner, unit_masks, out_dir, report: dict) -> None:
    """element_masks.safetensors (+ .json summary) in the run directory; report["sparsity"]."""
    from pathlib import Path

    em = epruner.emasks
    em.save(Path(out_dir) / "element_masks.safetensors", unit_masks if epruner.unit_masks is not None else None)
    summary = em.summary(epruner.unit_masks)
    params = report.get("params_pruned")
    report["sparsity"] = {
        **summary, "history": epruner.history, "criterion": epruner.scorer.name,
        "nonzero_params": None if params is None else params - summary["zeros"],
        "note": "zeros/total count the weights of the seven projections that survive slicing; "
                "nonzero_params = exported parameters minus those zeros"}
    if report.get("export"):  # measure what was written, block by block
        from .sparse_verify import verify_sparsity

        res = verify_sparsity(out_dir)
        if not res["ok"]:
            raise RuntimeError(f"exported weights violate the {res['pattern']} pattern: {res['violations'][:2]}")
        report["sparsity"]["verified"] = {k: res[k] for k in ("ok", "modules_checked", "zeros", "size",
                                                              "sparsity_measured", "params", "nonzero_params")}
