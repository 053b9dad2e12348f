"""The state of one pruning run, held in one object: model (peft LoRA), tokenizer, group spec, the
unit mask set, the active prunings, the objective, optimizer and schedule, the data stream, the run
directory, the step and the history. Checkpointing, the loop and the output writer take the job.

`build_job` makes it from a loaded model: seed, LoRA on the seven projections, mask hooks, the unit
criterion and the prunings the config asks for, then AdamW over the LoRA weights only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data as data_mod
from ..core.arch import TARGET_MODULES, ModelSpec
from ..core.config import PruneConfig
from ..core.criteria import build_criterion
from ..core.element_pruning import build_element_pruning
from ..core.masks import MaskSet
from ..core.objective import build_objective, dense_teacher
from ..core.pruning import UnitPruning, UnitTarget
from ..core.quant import n_params
from ..core.schedule import Ramp
from .dist import Dist
from .prepare import seed_everything


@dataclass
class RunPaths:
    out: Path    # --out: where the finished run appears
    part: Path   # the hidden .OUT.partial/ the run works in (its checkpoints/ make it resumable)

    @property
    def ckpt_root(self) -> Path:
        return self.part / "checkpoints"


@dataclass
class Loaded:
    """What the run reads before any LoRA exists: the model and its tokenizer, the group spec, the
    layers to prune, the training sequences and the held-out text."""
    model: object
    tokenizer: object
    spec: ModelSpec
    prunable: list[int]
    seqs: torch.Tensor                      # [n, seq_len] token rows
    evals: list = field(default_factory=list)  # (1-D held-out tokens, provenance) per --eval-data text


@dataclass
class History:
    """Per optimizer step: loss, wall and CPU seconds, and the objective's parts (e.g. ce, kl)."""
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    step_cpu: list[float] = field(default_factory=list)  # this process's CPU: robust to other load
    parts: dict[str, list[float]] = field(default_factory=dict)
    ratios: list[float] = field(default_factory=list)   # the unit ratio pruned after each step

    def record(self, loss: float, parts: dict, wall_s: float, cpu_s: float, ratio: float = 0.0) -> None:
        self.losses.append(loss)
        self.ratios.append(ratio)
        self.step_times.append(wall_s)
        self.step_cpu.append(cpu_s)
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(v)

    def state_dict(self) -> dict:
        return {"losses": self.losses, "step_times": self.step_times, "step_cpu": self.step_cpu,
                "loss_parts": self.parts, "ratios": self.ratios}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.step_times = list(state["losses"]), list(state["step_times"])
        self.step_cpu = list(state.get("step_cpu", []))
        self.parts = {k: list(v) for k, v in (state.get("loss_parts") or {}).items()}
        self.ratios = list(state.get("ratios", []))


@dataclass
class Job:
    cfg: PruneConfig
    dist: Dist
    loaded: Loaded
    paths: RunPaths
    model: object            # the peft-wrapped model
    masks: MaskSet           # the unit masks (all kept when no unit is pruned): exported with the model
    prunings: list           # core.pruning.Pruning, in the order the loop calls them
    objective: object
    trainable: list
    optim: torch.optim.Optimizer
    sched: object
    stream: data_mod.SequenceStream
    params_dense: int
    t0: float = field(default_factory=time.time)
    step: int = 0            # optimizer steps completed
    dense_ppl: list | None = None   # one perplexity record per --eval-data text
    history: History = field(default_factory=History)

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def new_stream(self) -> data_mod.SequenceStream:
        """The run's data order from its first batch (oneshot calibration and training start there)."""
        return data_mod.SequenceStream(self.loaded.seqs, self.cfg.batch_size, self.cfg.seed)

    def progress(self) -> dict:
        out = {"ratio": 0.0}
        for p in self.prunings:
            out.update(p.progress())
        return out

    def handoff(self) -> dict:
        """export_compact's mask arguments: the unit masks and whatever the prunings add."""
        out = {"masks": self.masks}
        for p in self.prunings:
            out.update(p.handoff())
        return out


def lr_lambda(cfg: PruneConfig):
    """Linear warm-up over lr_warmup_steps, then cosine decay to 10% at the last step."""
    def f(step):
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        p = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def attach_lora(cfg: PruneConfig, model):
    from peft import LoraConfig, get_peft_model

    seed_everything(cfg.seed)  # LoRA's A init and every later random draw follow the seed
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def build_prunings(cfg: PruneConfig, model, masks: MaskSet) -> list:
    """Units first (when --ratio > 0), then the element pattern (when not structured)."""
    prunings = []
    if cfg.ratio > 0:
        criterion = build_criterion(cfg.unit_criterion, cfg.importance, masks=masks, seed=cfg.seed,
                                    lora_projections=cfg.lora_projections)
        criterion.setup(model, masks.spec, masks)
        prunings.append(UnitPruning(masks, criterion, Ramp.from_config(cfg), UnitTarget.from_config(cfg),
                                    ema=cfg.ema, iterative=cfg.schedule == "iterative"))
    element = build_element_pruning(cfg, model, masks.spec, masks)
    if element is not None:
        prunings.append(element)
    return prunings


def build_job(cfg: PruneConfig, d: Dist, loaded: Loaded, paths: RunPaths) -> Job:
    params_dense = n_params(loaded.model)  # a 4-bit weight counts the weights it packs
    model = attach_lora(cfg, loaded.model)
    masks = MaskSet(loaded.spec, loaded.prunable, uniform_heads=cfg.uniform)
    masks.attach(model)
    prunings = build_prunings(cfg, model, masks)
    # Only LoRA weights train. (The `taylor` criterion turns on base-weight gradients for scoring;
    # those never reach the optimizer.)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))
    stream = data_mod.SequenceStream(loaded.seqs, cfg.batch_size, cfg.seed)
    handoff = {k: v for p in prunings for k, v in p.handoff().items()}
    element = handoff.get("element_masks")  # the teacher bypasses them too
    objective = build_objective(cfg, teacher=lambda m: dense_teacher(m, masks, element))
    return Job(cfg=cfg, dist=d, loaded=loaded, paths=paths, model=model, masks=masks, prunings=prunings,
               objective=objective, trainable=trainable, optim=optim, sched=sched,
               stream=stream, params_dense=params_dense)
