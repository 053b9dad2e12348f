"""`prune()`: the whole LoRAPrune job as a library call (no argparse, no printing).

load -> dense held-out PPL -> attach LoRA + mask hooks -> fine-tune LoRA while scoring units and
shrinking masks on the cubic ramp (checkpointing as it goes) -> pruned held-out PPL -> write
adapter, masks, compact model, config and report.

While running, everything lives in a hidden `.NAME.partial/` directory next to `--out NAME`; it is
renamed to NAME only when complete (report.json is written last). A killed run leaves only the
partial directory, whose checkpoints `--resume NAME` continues from.
"""
from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_mod
from . import faults
from . import data as data_mod
from .arch import TARGET_MODULES, model_spec, parse_layers
from .config import PruneConfig
from .criteria import build_criterion
from .element_prune import build_element_pruner, oneshot_element_scores
from .dist import Dist, check_batch, init_from_env, mask_checksum
from .errors import UserError
from .masks import MaskSet, clear_grads, step_gradients
from .models import load_model, load_tokenizer
from .outdir import check_out_dir
from .ppl import perplexity
from .pruner import NonFiniteScores, Pruner
from .prepare import (check_prunable, count_params, load_eval_ids, load_training_ids,  # noqa: F401
                      preflight, seed_everything)
from .rundir import partial_dir, resolve_resume, write_outputs  # noqa: F401

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


class RunInterrupted(RuntimeError):
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


def _lr_lambda(cfg: PruneConfig):
    def f(step):
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        p = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


class _StopFlag:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, stop."""

    def __init__(self, enabled: bool):
        self.raised = False
        self._old = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def prune(cfg: PruneConfig, hooks: Hooks | None = None, resume: str | None = None,
          handle_signals: bool = False) -> dict:
    """Run (or, with resume=OUT, continue) the job; return the report dict (also written to OUT)."""
    hooks = hooks or Hooks()
    t0 = time.time()
    d = init_from_env()
    if resume:
        out, part = resolve_resume(resume)
    else:
        out = check_out_dir(cfg.out, cfg.overwrite)
        part = partial_dir(out)
        if part.exists():
            if not cfg.overwrite:
                raise UserError(f"an unfinished run is in {part}; continue it with --resume {cfg.out} "
                                "or start over with --overwrite")
            if d.main:
                shutil.rmtree(part)
    check_batch(cfg.batch_size, d.world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preflight(cfg)

    hooks.phase("loading model")
    model = load_model(cfg.model, "fp32", cfg.trust_remote_code, d.device)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    spec = model_spec(model.config)
    prunable = [i for i in range(spec.num_layers) if i not in parse_layers(cfg.skip_layers, spec.num_layers)]
    check_prunable(cfg, spec, prunable)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's context ({max_pos} tokens)")

    hooks.phase("tokenizing data")
    seqs = data_mod.make_sequences(load_training_ids(cfg, tokenizer), cfg.seq_len)
    eval_ids, eval_meta = (load_eval_ids(cfg, tokenizer) if cfg.eval_windows else (None, {}))
    if d.main:
        part.mkdir(parents=True, exist_ok=True)
        cfg.save(part / "loraprune_config.json")
    d.barrier()
    try:
        report = _run(cfg, hooks, d, model, tokenizer, spec, prunable, seqs, eval_ids, eval_meta, out, part,
                      resume is not None, handle_signals, t0)
    except BaseException:
        # keep the partial directory only when it holds a checkpoint worth resuming from
        if d.main and part.exists() and not ckpt_mod.list_checkpoints(part / "checkpoints"):
            shutil.rmtree(part, ignore_errors=True)
        raise
    return report


def _run(cfg, hooks, d: Dist, model, tokenizer, spec, prunable, seqs, eval_ids, eval_meta, out, part,
         resuming, handle_signals, t0) -> dict:
    params_dense = count_params(model)
    ckpt_root = part / "checkpoints"
    latest = ckpt_mod.list_checkpoints(ckpt_root)[-1] if resuming and ckpt_mod.list_checkpoints(ckpt_root) else None
    lora_state, state = ckpt_mod.load(latest) if latest else (None, None)
    if state is not None and state["world"] != d.world:
        raise UserError(f"the checkpoint was written by {state['world']} processes; resume with the same number "
                        f"(now {d.world})")

    dense_ppl = state["dense_ppl"] if state else None
    if eval_ids is not None and state is None:
        hooks.phase("dense perplexity")
        dense_ppl = perplexity(model, eval_ids, cfg.eval_ctx, cfg.eval_windows, progress=hooks.on_eval)

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict, get_peft_model_state_dict

    seed_everything(cfg.seed)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    masks = MaskSet(spec, prunable, uniform_heads=cfg.uniform)
    masks.attach(model)
    criterion = build_criterion(cfg.unit_criterion, cfg.importance, masks=masks, seed=cfg.seed,
                                lora_projections=cfg.lora_projections)
    if hasattr(criterion, "setup"):
        criterion.setup(model, spec, masks)
    # --pattern N:M / unstructured: element masks, masked LoRA forwards, element scorer (else None)
    epruner = build_element_pruner(cfg, model, spec, masks)
    pruner = Pruner(spec, masks, criterion, ratio=cfg.ratio, targets=cfg.target_list, total_steps=cfg.steps,
                    prune_every=cfg.prune_every, warmup_frac=cfg.warmup_frac,
                    cooldown_frac=cfg.cooldown_frac, ema=cfg.ema, round_to=cfg.round_to)
    # Only LoRA weights train. (The `taylor` baseline turns on base-weight gradients for scoring;
    # those never reach the optimizer.)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(cfg))
    stream = data_mod.SequenceStream(seqs, cfg.batch_size, cfg.seed)
    losses, step_times, step_cpu, start = [], [], [], 1
    do_prune = cfg.ratio > 0

    if state is not None:
        set_peft_model_state_dict(model, lora_state)
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        pruner.load_state_dict(state["pruner"])
        if epruner is not None:
            epruner.load_state_dict(state["element"])
        loaded = MaskSet.load(latest / "masks.json", spec)
        for i in range(spec.num_layers):
            masks.layers[i] = loaded.layers[i]
            masks._sync_gates(i)
        stream.load_state_dict(state["stream"])
        losses, step_times = list(state["losses"]), list(state["step_times"])
        step_cpu = list(state.get("step_cpu", []))
        ckpt_mod.set_rng_state(state["rng"])
        start = int(state["step"]) + 1
        hooks.phase(f"resumed from {latest.name}")

    def save_checkpoint(step: int) -> Path | None:
        path = None
        if d.main:
            st = {"step": step, "world": d.world, "optim": optim.state_dict(), "sched": sched.state_dict(),
                  "pruner": pruner.state_dict(), "stream": stream.state_dict(), "losses": losses,
                  "step_times": step_times, "step_cpu": step_cpu, "rng": ckpt_mod.rng_state(),
                  "dense_ppl": dense_ppl}
            if epruner is not None:
                st["element"] = epruner.state_dict()
            path = ckpt_mod.save(ckpt_root, step, lora=get_peft_model_state_dict(model), state=st, masks=masks,
                                 keep=cfg.keep_checkpoints)
        d.barrier()
        return path

    hooks.phase("pruning")
    if cfg.schedule == "oneshot" and (do_prune or epruner is not None) and state is None:
        if do_prune:
            oneshot_scores(model, pruner, stream, cfg, d)
            pruner.apply_ratio(cfg.ratio, 0)
        if epruner is not None:  # after the units: N:M blocks are formed over the kept columns
            stream = data_mod.SequenceStream(seqs, cfg.batch_size, cfg.seed)
            oneshot_element_scores(model, epruner, lambda: averaged_step(model, stream, cfg, d, masks),
                                   cfg.calib_batches, reduce=d.average)
        stream = data_mod.SequenceStream(seqs, cfg.batch_size, cfg.seed)  # same data order as iterative
    stop = _StopFlag(handle_signals)
    try:
        for step in range(start, cfg.steps + 1):
            if not (cfg.schedule == "iterative" and do_prune and pruner.needs_scores(step)):
                end_scoring(criterion, model)
            if epruner is not None and not (cfg.schedule == "iterative" and epruner.needs_scores(step)):
                epruner.teardown(model)
            ts, tc = time.perf_counter(), time.process_time()
            loss = faults.loss(averaged_step(model, stream, cfg, d, masks), step)
            if not math.isfinite(loss):
                raise _diverged(f"loss became {loss}", step, ckpt_root, part, out)
            if cfg.schedule == "iterative" and do_prune and pruner.needs_scores(step):
                try:
                    pruner.observe(model, reduce=d.average, poison=faults.scores(step))
                except NonFiniteScores as err:
                    raise _diverged(str(err), step, ckpt_root, part, out) from None
            if cfg.schedule == "iterative" and epruner is not None and epruner.needs_scores(step):
                try:
                    epruner.observe(model)
                except NonFiniteScores as err:
                    raise _diverged(str(err), step, ckpt_root, part, out) from None
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optim.step()
            sched.step()
            clear_grads(model, masks)
            if cfg.schedule == "iterative" and do_prune and pruner.maybe_update(step) and cfg.debug_sync:
                if not d.all_equal(mask_checksum(masks)):
                    raise RuntimeError(f"ranks disagree on the masks at step {step}")
            if cfg.schedule == "iterative" and epruner is not None:
                epruner.maybe_update(model, step, reduce=d.average)  # after the units (same step)
            losses.append(loss)
            step_times.append(time.perf_counter() - ts)
            step_cpu.append(time.process_time() - tc)  # this process's CPU: robust to other load
            faults.after_step()
            if hooks.on_step and d.main:
                hooks.on_step(step, cfg.steps, {"loss": loss, "ratio": pruner.current_ratio,
                                                 "lr": sched.get_last_lr()[0]})
            stop_now = stop.raised
            if d.enabled:
                flag = torch.tensor([float(stop_now)])
                torch.distributed.all_reduce(flag)
                stop_now = bool(flag.item())
            if (cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps) or stop_now:
                path = save_checkpoint(step)
                if stop_now:
                    raise RunInterrupted(f"stopped by signal after step {step}; checkpoint {path or ''} saved; "
                                         f"continue with: loraprune prune --resume {out}")
    finally:
        stop.restore()
    if do_prune:
        pruner.finalize(cfg.steps)
    if epruner is not None:
        epruner.finalize(model, cfg.steps)

    pruned_ppl = None
    if eval_ids is not None and d.main:
        hooks.phase("pruned perplexity")
        pruned_ppl = perplexity(model, eval_ids, cfg.eval_ctx, cfg.eval_windows, progress=hooks.on_eval)

    report = None
    if d.main:
        hooks.phase("writing outputs")
        report = write_outputs(cfg, model, masks, tokenizer, spec, part, out, params_dense=params_dense,
                                losses=losses, step_times=step_times, step_cpu=step_cpu, dense_ppl=dense_ppl,
                                pruned_ppl=pruned_ppl,
                                eval_meta=eval_meta, history=pruner.history, t0=t0, n_seqs=int(seqs.shape[0]),
                                world=d.world, epruner=epruner)
    d.barrier()
    return report if report is not None else {"out": str(out), "rank": d.rank}


def _diverged(what: str, step: int, ckpt_root: Path, part: Path, out: Path) -> TrainingDiverged:
    """Never skip a NaN: stop, and say which checkpoint survives."""
    last = ckpt_mod.list_checkpoints(ckpt_root)
    where = (f"the last good checkpoint ({last[-1].name}) is kept in {part}; fix the cause and --resume {out}"
             if last else "no checkpoint was written yet")
    return TrainingDiverged(f"{what} at step {step}: stopped; {where} (try a lower --lr or --dtype fp32)")


def train_step(model, stream, cfg: PruneConfig, d: Dist) -> float:
    """Forward/backward over grad_accum micro-batches of this rank's rows; gradients are left in .grad
    (averaged across ranks by the caller) for scoring."""
    model.train()
    total = 0.0
    for _ in range(cfg.grad_accum):
        batch = d.shard(stream.next_batch()).to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss / cfg.grad_accum
        if not torch.isfinite(loss):
            return float("nan")
        loss.backward()
        total += float(loss.detach())
    return total


def averaged_step(model, stream, cfg: PruneConfig, d: Dist, masks) -> float:
    """train_step, then the one cross-rank all-reduce every caller needs: the gradients of all
    parameters (LoRA, and base weights while the taylor baseline scores), the mask-gate gradients
    (mask-taylor) and the loss. A no-op average in one process."""
    loss = train_step(model, stream, cfg, d)
    loss_t = torch.tensor([loss])
    d.average(step_gradients(model, masks) + [loss_t])
    return float(loss_t)


def oneshot_scores(model, pruner: Pruner, stream, cfg: PruneConfig, d: Dist) -> None:
    """Score on calibration batches (gradients discarded afterwards), for the oneshot schedule. The
    scores are the plain mean over the batches (an EMA would weight the first batch most)."""
    ema = pruner.ema
    for k in range(cfg.calib_batches):
        pruner.ema = k / (k + 1)  # running mean
        averaged_step(model, stream, cfg, d, pruner.masks)
        pruner.observe(model, reduce=d.average)
        clear_grads(model, pruner.masks)
    pruner.ema = ema


def end_scoring(criterion, model) -> None:
    """No more scores are needed: let the criterion drop what scoring costs (the taylor baseline's
    base-weight gradients, mask-gate gradients, activation hooks). Idempotent."""
    if hasattr(criterion, "teardown"):
        criterion.teardown(model)
