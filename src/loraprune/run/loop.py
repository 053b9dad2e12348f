"""The training loop. Every optimizer step reads like the method:

    for step in steps:
        loss = objective(batch); backward          (grad_accum micro-batches, gradients averaged)
        every pruning: observe its scores          (after backward, before the update)
        optimizer step
        every pruning: masks <- schedule(step)
        checkpoint / stop when due

Prunings (core/pruning.py) decide themselves whether a step is scored or updates masks, so the loop
has no branch per granularity or schedule; the oneshot schedule calibrates before the loop.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from .. import faults
from ..core.masks import clear_grads, step_gradients
from ..core.pruning import NonFiniteScores
from . import checkpoint
from .dist import checksum


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


class StopFlag:
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


def forward_backward(job, stream) -> tuple[float, dict]:
    """The objective over grad_accum micro-batches of this rank's rows, backward, then the one
    cross-rank all-reduce every caller needs (LoRA gradients; base-weight and mask-gate gradients
    while a criterion asks for them; the loss). Gradients stay in .grad for scoring. NaN if a
    micro-batch's loss is not finite (nothing is backpropagated then)."""
    cfg, d, model = job.cfg, job.dist, job.model
    model.train()
    total, parts = 0.0, {}
    for _ in range(cfg.grad_accum):
        batch = d.shard(stream.next_batch()).to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            loss, micro = job.objective(model, batch)
            loss = loss / cfg.grad_accum
        if not torch.isfinite(loss):
            return float("nan"), parts
        loss.backward()
        total += float(loss.detach())
        for k, v in micro.items():
            parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
    names = sorted(parts)
    loss_t = torch.tensor([total] + [parts[k] for k in names])  # the loss and its parts: every rank's mean
    d.average(step_gradients(model, job.masks) + [loss_t])
    return float(loss_t[0]), {k: float(v) for k, v in zip(names, loss_t[1:])}


def calibrate(job) -> None:
    """Oneshot schedule: each pruning scores its calibration batches (from the start of the data)
    and prunes to its final ratio; training then starts from the first batch again."""
    for p in job.prunings:
        stream = job.new_stream()
        try:
            p.calibrate(job.model, lambda: forward_backward(job, stream), job.cfg.calib_batches, job.dist.average)
        except NonFiniteScores as err:
            raise TrainingDiverged(f"{err} in the oneshot calibration (before any training step): "
                                   "stopped; nothing was written") from None
    job.stream = job.new_stream()


def diverged(job, what: str, step: int) -> TrainingDiverged:
    """Never skip a NaN: stop, and say which checkpoint survives."""
    last = checkpoint.latest(job.paths.ckpt_root)
    where = (f"the last good checkpoint ({last.name}) is kept in {job.paths.part}; fix the cause and --resume "
             f"{job.paths.out}" if last else "no checkpoint was written yet")
    return TrainingDiverged(f"{what} at step {step}: stopped; {where} (try a lower --lr or --dtype fp32)")


def train_step(job, step: int) -> tuple[float, dict]:
    """One optimizer step with scoring and mask updates; returns the loss and its parts."""
    cfg, d, model = job.cfg, job.dist, job.model
    for p in job.prunings:
        p.begin_step(model, step)
    loss, parts = forward_backward(job, job.stream)
    loss = faults.loss(loss, step)
    if not math.isfinite(loss):
        raise diverged(job, f"loss became {loss}", step)
    try:
        for p in job.prunings:
            p.observe(model, d.average, step)
    except NonFiniteScores as err:
        raise diverged(job, str(err), step) from None
    torch.nn.utils.clip_grad_norm_(job.trainable, 1.0)
    job.optim.step()
    job.sched.step()
    clear_grads(model, job.masks)
    for p in job.prunings:
        if p.maybe_update(model, step, d.average) and cfg.debug_sync and not d.all_equal(
                checksum(p.checksum_tensors())):
            raise RuntimeError(f"ranks disagree on the masks at step {step}")
    return loss, parts


def run_loop(job, hooks: Hooks, stop: StopFlag) -> None:
    """Steps job.step + 1 ... cfg.steps, checkpointing every save_every steps and on a signal; then
    every pruning reaches its final ratio."""
    cfg, d = job.cfg, job.dist
    for step in range(job.step + 1, cfg.steps + 1):
        ts, tc = time.perf_counter(), time.process_time()
        loss, parts = train_step(job, step)
        job.history.record(loss, parts, time.perf_counter() - ts, time.process_time() - tc, job.progress()["ratio"])
        job.step = step
        faults.after_step()
        if hooks.on_step and d.main:
            hooks.on_step(step, cfg.steps, {"loss": loss, "lr": job.sched.get_last_lr()[0], **job.progress()})
        stop_now = stop.raised
        if d.enabled:
            flag = torch.tensor([float(stop_now)])
            torch.distributed.all_reduce(flag)
            stop_now = bool(flag.item())
        if (cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps) or stop_now:
            path = checkpoint.save_job(job)
            if stop_now:
                raise RunInterrupted(f"stopped by signal after step {step}; checkpoint {path or ''} saved; "
                                     f"continue with: loraprune prune --resume {job.paths.out}")
    for p in job.prunings:
        p.finalize(job.model, cfg.steps)
