"""`prune()`: the whole LoRAPrune job as a library call (no argparse, no printing).

load -> dense held-out PPL -> attach LoRA + mask hooks (run/job.py) -> fine-tune LoRA while scoring
units and shrinking masks on the cubic ramp, checkpointing as it goes (run/loop.py) -> pruned
held-out PPL -> write adapter, masks, compact model, config and report (run/rundir.py).

While running, everything lives in a hidden `.NAME.partial/` directory next to `--out NAME`; it is
renamed to NAME only when complete (report.json is written last). A killed run leaves only the
partial directory, whose checkpoints `--resume NAME` continues from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import data as data_mod
from ..core.arch import model_spec, parse_layers
from ..core.config import PruneConfig
from ..errors import UserError
from ..eval.ppl import perplexity
from ..models import load_model, load_tokenizer
from . import checkpoint
from .dist import Dist, check_batch, init_from_env
from .job import Loaded, RunPaths, build_job
from .loop import Hooks, StopFlag, calibrate, run_loop
from .prepare import check_prunable, load_eval_sets, load_training_ids, preflight
from .rundir import discard_unless_resumable, open_run_dir, write_outputs


def prune(cfg: PruneConfig, hooks: Hooks | None = None, resume: str | None = None,
          handle_signals: bool = False) -> dict:
    """Run (or, with resume=OUT, continue) the job; return the report dict (also written to OUT)."""
    hooks = hooks or Hooks()
    t0 = time.time()
    d = init_from_env()
    out, part = open_run_dir(cfg, resume, d.main)
    check_batch(cfg.batch_size, d.world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preflight(cfg)
    loaded = load(cfg, d, hooks)
    if d.main:
        part.mkdir(parents=True, exist_ok=True)
        cfg.save(part / "loraprune_config.json")
    d.barrier()
    try:
        return _run(cfg, hooks, d, loaded, RunPaths(out, part), Launch(resume is not None, handle_signals, t0))
    except BaseException:
        if d.main:
            discard_unless_resumable(part)
        raise


def load(cfg: PruneConfig, d: Dist, hooks: Hooks) -> Loaded:
    """The model, tokenizer, spec, prunable layers, training rows and held-out text, checked."""
    hooks.phase("loading model")
    model = load_model(cfg.model, "fp32", cfg.trust_remote_code, d.device, quant=cfg.base_quant)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    spec = model_spec(model.config)
    skip = parse_layers(cfg.skip_layers, spec.num_layers)
    prunable = [i for i in range(spec.num_layers) if i not in skip]
    check_prunable(cfg, spec, prunable)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's context ({max_pos} tokens)")
    hooks.phase("tokenizing data")
    seqs = data_mod.make_sequences(load_training_ids(cfg, tokenizer), cfg.seq_len)
    return Loaded(model, tokenizer, spec, prunable, seqs, load_eval_sets(cfg, tokenizer))


def held_out_ppl(model, loaded: Loaded, cfg: PruneConfig, hooks: Hooks) -> list[dict]:
    return [perplexity(model, ids, cfg.eval_ctx, cfg.eval_windows, progress=hooks.on_eval) for ids, _ in loaded.evals]


@dataclass(frozen=True)
class Launch:
    """How this call started: resuming a run, handling SIGTERM/SIGINT, and when (wall_s counts from it)."""
    resuming: bool
    handle_signals: bool
    t0: float


def _run(cfg, hooks, d, loaded: Loaded, paths: RunPaths, launch: Launch) -> dict:
    ckpt = checkpoint.latest(paths.ckpt_root) if launch.resuming else None
    lora_state, state = checkpoint.load(ckpt) if ckpt else (None, None)
    if state is not None and state["world"] != d.world:
        raise UserError(f"the checkpoint was written by {state['world']} processes; resume with the same number "
                        f"(now {d.world})")
    dense_ppl = state["dense_ppl"] if state else None
    if isinstance(dense_ppl, dict):  # a checkpoint of loraprune < 0.2: one eval text
        dense_ppl = [dense_ppl]
    if loaded.evals and state is None:
        hooks.phase("dense perplexity")
        dense_ppl = held_out_ppl(loaded.model, loaded, cfg, hooks)
    job = build_job(cfg, d, loaded, paths)
    job.t0, job.dense_ppl = launch.t0, dense_ppl
    if state is not None:
        checkpoint.restore_job(job, ckpt, lora_state, state)
        hooks.phase(f"resumed from {ckpt.name}")
    hooks.phase("pruning")
    if cfg.schedule == "oneshot" and job.prunings and state is None:
        calibrate(job)
    stop = StopFlag(launch.handle_signals)
    try:
        run_loop(job, hooks, stop)
    finally:
        stop.restore()
    pruned_ppl = None
    if loaded.evals and d.main:
        hooks.phase("pruned perplexity")
        pruned_ppl = held_out_ppl(job.model, loaded, cfg, hooks)
    report = None
    if d.main:
        hooks.phase("writing outputs")
        report = write_outputs(job, pruned_ppl)
    d.barrier()
    return report if report is not None else {"out": str(paths.out), "rank": d.rank}
