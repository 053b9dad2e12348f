"""`prune()`: the whole LoRAPrune job as a library call (no argparse, no printing).

load -> dense held-out PPL -> attach LoRA + mask hooks -> fine-tune LoRA while scoring units and
shrinking masks on the cubic ramp -> pruned held-out PPL -> write adapter, masks, compact model,
config and report into an atomically renamed output directory.
"""
from __future__ import annotations

import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from .arch import TARGET_MODULES, model_spec, parse_layers
from .config import PruneConfig
from .criteria import build_criterion
from .errors import UserError
from .masks import MaskSet, ffn_keep, final_head_shapes
from .models import load_model, load_tokenizer
from .outdir import atomic_dir, check_out_dir
from .ppl import perplexity
from .pruner import NonFiniteScores, Pruner
from .schedule import ramp_bounds

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Hooks:
    """Optional callbacks the CLI uses for progress output (the library itself stays quiet)."""
    on_step: object = None      # (step, total, metrics: dict) -> None
    on_phase: object = None     # (name: str) -> None
    on_eval: object = None      # (n_windows_done) -> None

    def phase(self, name):
        if self.on_phase:
            self.on_phase(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_prunable(cfg: PruneConfig, spec, prunable: list[int]) -> None:
    """Reject settings that cannot be met, before any expensive work."""
    for i in prunable:
        s = spec.layers[i]
        if "ffn" in cfg.target_list and ffn_keep(cfg.ratio, s.intermediate_size, cfg.round_to) < 1:
            raise UserError(f"--ratio {cfg.ratio} leaves zero FFN channels in layer {i}; lower the ratio")
    if cfg.uniform and "heads" in cfg.target_list:
        for i in prunable:
            a, b = final_head_shapes(spec.layers[i], cfg.ratio)[0]
            if spec.hidden_size % (a * b):
                raise UserError(
                    f"--uniform: {a * b} kept query heads per layer do not divide hidden size "
                    f"{spec.hidden_size}, which stock transformers configs require; choose another ratio "
                    "or drop --uniform (the heterogeneous export has no such limit)")


def preflight(cfg: PruneConfig) -> None:
    """Cheap checks of paths before any loading, so typos fail in a second."""
    from pathlib import Path as _P

    from .models import resolve_model_path

    if cfg.model not in (None, "", "embedded"):
        resolve_model_path(cfg.model)
    for src in (cfg.data, cfg.eval_data if cfg.eval_windows else None):
        if src and ("/" in src or _P(src).suffix) and not src.startswith("hf:") and not _P(src).expanduser().is_file():
            raise UserError(f"data file {src} does not exist")


def load_training_ids(cfg: PruneConfig, tokenizer) -> torch.Tensor:
    docs = data_mod.load_documents(cfg.data, "train", cfg.text_field)
    return data_mod.tokenize_text(tokenizer, data_mod.join_documents(docs))


def load_eval_ids(cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor, dict]:
    spec = cfg.eval_data
    split = "test"
    docs = data_mod.load_documents(spec, split, cfg.text_field)
    text = data_mod.join_documents(docs)
    meta = {"dataset": spec, "split": "heldout" if spec.startswith("sotu") else split,
            "content_sha256_16": data_mod.content_hash(text)}
    if spec.startswith("sotu"):
        meta["heldout_rule"] = data_mod.SOTU_HOLDOUT_RULE
    return data_mod.tokenize_text(tokenizer, text), meta


def _lr_lambda(cfg: PruneConfig):
    def f(step):
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        p = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def prune(cfg: PruneConfig, hooks: Hooks | None = None) -> dict:
    """Run the job described by cfg; return the report dict (also written to cfg.out)."""
    hooks = hooks or Hooks()
    t0 = time.time()
    out = check_out_dir(cfg.out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    preflight(cfg)
    hooks.phase("loading model")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = load_model(cfg.model, "fp32", cfg.trust_remote_code, device)
    spec = model_spec(model.config)
    skip = parse_layers(cfg.skip_layers, spec.num_layers)
    prunable = [i for i in range(spec.num_layers) if i not in skip]
    check_prunable(cfg, spec, prunable)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's context ({max_pos} tokens)")

    hooks.phase("tokenizing data")
    seqs = data_mod.make_sequences(load_training_ids(cfg, tokenizer), cfg.seq_len)
    stream = data_mod.SequenceStream(seqs, cfg.batch_size, cfg.seed)
    eval_ids, eval_meta = (load_eval_ids(cfg, tokenizer) if cfg.eval_windows else (None, {}))

    params_dense = count_params(model)
    dense_ppl = None
    if eval_ids is not None:
        hooks.phase("dense perplexity")
        dense_ppl = perplexity(model, eval_ids, cfg.eval_ctx, cfg.eval_windows, progress=hooks.on_eval)

    from peft import LoraConfig, get_peft_model

    seed_everything(cfg.seed)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    masks = MaskSet(spec, prunable)
    masks.attach(model)
    criterion = build_criterion(cfg.criterion, cfg.importance, masks=masks, seed=cfg.seed)
    if hasattr(criterion, "setup"):
        criterion.setup(model, spec, masks)
    pruner = Pruner(spec, masks, criterion, ratio=cfg.ratio, targets=cfg.target_list, total_steps=cfg.steps,
                    prune_every=cfg.prune_every, warmup_frac=cfg.warmup_frac,
                    cooldown_frac=cfg.cooldown_frac, ema=cfg.ema, round_to=cfg.round_to)
    # Only LoRA weights train. (The `taylor` baseline turns on base-weight gradients for scoring;
    # those never reach the optimizer.)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(cfg))

    hooks.phase("pruning")
    if cfg.schedule == "oneshot" and cfg.ratio > 0:
        oneshot_scores(model, pruner, stream, cfg)
        pruner.apply_ratio(cfg.ratio, 0)
        stream = data_mod.SequenceStream(seqs, cfg.batch_size, cfg.seed)  # same data order as iterative
    losses, step_times = [], []
    for step in range(1, cfg.steps + 1):
        ts = time.perf_counter()
        loss = train_step(model, stream, cfg, device)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {step}; lower --lr or use --dtype fp32")
        if cfg.schedule == "iterative" and cfg.ratio > 0 and pruner.needs_scores(step):
            pruner.observe(model)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        if cfg.schedule == "iterative" and cfg.ratio > 0:
            pruner.maybe_update(step)
        losses.append(loss)
        step_times.append(time.perf_counter() - ts)
        if hooks.on_step:
            hooks.on_step(step, cfg.steps, {"loss": loss, "ratio": pruner.current_ratio,
                                             "lr": sched.get_last_lr()[0]})
    if cfg.ratio > 0:
        pruner.finalize(cfg.steps)

    pruned_ppl = None
    if eval_ids is not None:
        hooks.phase("pruned perplexity")
        pruned_ppl = perplexity(model, eval_ids, cfg.eval_ctx, cfg.eval_windows, progress=hooks.on_eval)

    hooks.phase("writing outputs")
    from .report import build_report, write_report

    with atomic_dir(out) as tmp:
        export_info = None
        if cfg.export:
            from .export import export_compact

            export_info = export_compact(model, masks, tmp, tokenizer=tokenizer, uniform=cfg.uniform,
                                         save_dtype=cfg.save_dtype)
        model.save_pretrained(tmp / "adapter")
        masks.save(tmp / "masks.json")
        cfg.save(tmp / "loraprune_config.json")
        report = build_report(
            cfg=cfg, spec=spec, masks=masks, params_dense=params_dense, losses=losses, step_times=step_times,
            dense_ppl=dense_ppl, pruned_ppl=pruned_ppl, eval_meta=eval_meta, history=pruner.history,
            export_info=export_info, wall_s=time.time() - t0, peak_rss_mb=peak_rss_mb(),
            n_train_seqs=int(seqs.shape[0]), ramp=ramp_bounds(cfg.steps, cfg.warmup_frac, cfg.cooldown_frac))
        write_report(report, tmp)
    report["out"] = str(out)
    return report


def train_step(model, stream, cfg: PruneConfig, device) -> float:
    """Forward/backward over grad_accum micro-batches; gradients are left for scoring."""
    model.train()
    total = 0.0
    for _ in range(cfg.grad_accum):
        batch = stream.next_batch().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss / cfg.grad_accum
        if not torch.isfinite(loss):
            return float("nan")
        loss.backward()
        total += float(loss.detach())
    return total


def oneshot_scores(model, pruner: Pruner, stream, cfg: PruneConfig) -> None:
    """Score on calibration batches (gradients discarded afterwards), for the oneshot schedule."""
    device = next(model.parameters()).device
    for _ in range(cfg.calib_batches):
        train_step(model, stream, cfg, device)
        pruner.observe(model)
        model.zero_grad(set_to_none=True)
