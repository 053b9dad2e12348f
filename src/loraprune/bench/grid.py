"""`loraprune bench`: criteria x schedules x ratios on the same model, data, seed and LoRA budget.

Every row is one `loraprune prune` run in its own subprocess (so its peak memory is its own), with
`--no-export --eval-windows 0`; the bench process then evaluates each row itself with one protocol:
the base model + the row's LoRA adapter merged in + its masks (masked forward == sliced forward,
see masks.py), perplexity by `ppl.perplexity` on the first K non-overlapping windows of each eval
text. The dense model is evaluated the same way in the same run, and a plain-LoRA row (criterion
lora, ratio 0: fine-tuning only, no pruning) gives the reference step time.

Output directory:
  results.json   schema "loraprune.bench/1": options, dense records, one record per row
  results.md     one table (see docs/benchmarks.md for the columns)
  ppl_vs_ratio.png
  runs/<row>/    report.json, report.md, masks.json, loraprune_config.json, eval.json of each row
                 (the adapter is deleted after evaluation unless keep_adapters)
  logs/<row>.log stdout/stderr of the prune subprocess
results.json/.md are rewritten after every row ("complete": false until the end), so a long run can
be watched and resumed (`resume=True` reuses finished rows whose config matches).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.config import PruneConfig
from ..errors import UserError
from ..files import read_json, write_json, write_text
from .options import PLAIN_ID, SCHEMA, BenchOptions, config_flags, validate
from .row_eval import eval_model, eval_protocols, load_row_model, same_protocol

log = logging.getLogger(__name__)


# ---- the run ---------------------------------------------------------------------------------------

def prepare_out(opts: BenchOptions) -> Path:
    out = Path(opts.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {opts.out} is a file")
    if out.exists() and any(out.iterdir()):
        if opts.overwrite:
            shutil.rmtree(out)
        elif not opts.resume:
            raise UserError(f"--out {opts.out} is not empty; pass --resume to continue it or --overwrite")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    return out


def run_prune(cfg: PruneConfig, log_path: Path) -> tuple[int, str]:
    """One `loraprune prune` subprocess; returns (exit code, last stderr line)."""
    cmd = [sys.executable, "-m", "loraprune", "prune", *config_flags(cfg)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, (tail[-1] if tail else "")


def _finished(run_dir: Path, cfg: PruneConfig) -> dict | None:
    """The report of a finished run with the same config (for --resume), else None."""
    try:
        rep = json.loads((run_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    saved, default = rep.get("config") or {}, PruneConfig().to_dict()
    # a field added to PruneConfig after the run matches when the new value is its default
    same = all(saved.get(k, default[k]) == v for k, v in cfg.to_dict().items())
    return rep if same else None


def _evaluable(run_dir: Path) -> bool:
    """Whether a finished row's model can still be rebuilt: its adapter, or its export (quantized base)."""
    return (run_dir / "adapter" / "adapter_config.json").is_file() or (run_dir / "config.json").is_file()


@dataclass
class _Bench:
    """What every row of one bench run shares."""
    opts: BenchOptions
    out: Path
    doc: dict
    tokenizer: object
    protocols: dict   # eval name -> provenance of its text (for --resume)
    seed: int
    emit: object      # (kind, *args) -> None: progress events for the CLI
    # --jobs > 1: rows' prune subprocesses run side by side, but this process evaluates one model at
    # a time (one copy of the base model in memory, lm_eval's global state untouched by two threads)
    eval_lock: threading.Lock = field(default_factory=threading.Lock)
    doc_lock: threading.Lock = field(default_factory=threading.Lock)


def run_bench(opts: BenchOptions, command: list[str] | None = None, on_event=None) -> dict:
    """Run every row; return the results document (also written to opts.out)."""
    from ..eval.results import new_document
    from ..models import load_tokenizer

    validate(opts)
    out = prepare_out(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    t0 = time.time()
    doc = new_document(command)
    doc.update({"bench_schema": SCHEMA, "options": asdict(opts), "complete": False, "budget": _budget(opts),
                "machine": _machine(), "dense": None, "rows": []})
    emit = on_event or (lambda *a, **k: None)
    emit("phase", "dense model evaluation")
    b = _Bench(opts, out, doc, load_tokenizer(opts.model, bool(opts.prune_flags.get("trust_remote_code", False))),
               eval_protocols(opts), int(opts.prune_flags.get("seed", PruneConfig().seed)), emit)
    _dense(b)
    rows = opts.rows()
    done: list = [None] * len(rows)

    def one(k: int) -> None:
        emit("row_start", k + 1, len(rows), rows[k])
        rec = _row(b, rows[k])
        with b.doc_lock:  # rows land in the table in row order, whichever finishes first
            done[k] = rec
            doc["rows"] = [r for r in done if r is not None]
            step_ratios(doc)
            emit("row_done", k + 1, len(rows), rec)
            _write_results(out, doc)

    with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for f in [pool.submit(one, k) for k in range(len(rows))]:
            f.result()
    if opts.speed:
        from .sparse import measure_speed

        emit("phase", "CPU speed of every exported model")
        measure_speed(doc, out, opts)
    doc["complete"] = True
    doc["wall_s"] = round(time.time() - t0, 1)
    _write_results(out, doc)
    from .table import plot

    plot(doc, out / "ppl_vs_ratio.png")
    return doc


def _dense(b: _Bench) -> None:
    """The dense model, evaluated once per bench directory (reused by --resume when the protocol holds)."""
    from ..eval.results import model_info
    from ..models import load_model

    path = b.out / "dense_eval.json"
    dense = read_json(path) if b.opts.resume else None
    if dense is None or not same_protocol(dense.get("eval"), b.protocols, b.opts):
        model = load_model(b.opts.model, "fp32", bool(b.opts.prune_flags.get("trust_remote_code", False)))
        dense = {"params": sum(p.numel() for p in model.parameters()),
                 "model": model_info(model, b.opts.model, None, "fp32"),
                 "eval": eval_model(model, b.tokenizer, b.opts, b.seed, "dense")}
        del model
        write_json(path, dense)
    b.doc["dense"] = dense
    b.doc["models"]["dense"] = dense["model"]


def _row(b: _Bench, row) -> dict:
    """Run (or reuse) one row's prune subprocess, evaluate its model, return its record."""
    opts, out = b.opts, b.out
    run_dir = out / "runs" / row.id
    cfg = opts.row_config(row, run_dir)
    rec = {"id": row.id, "criterion": row.criterion, "schedule": row.schedule, "ratio": row.ratio,
           "plain_lora": row.id == PLAIN_ID, "run_dir": str(run_dir.relative_to(out))}
    if row.recipe:
        rec.update(recipe=row.recipe, label=next(r["label"] for r in opts.recipes if r["name"] == row.recipe))
    if opts.time_budget:
        from .recipes import budget_steps

        try:
            cfg, probe = budget_steps(cfg, run_dir, opts, run_prune)
        except RuntimeError as err:
            return {**rec, "status": "failed", "error": str(err)}
        rec["probe"] = {k: probe[k] for k in ("cpu_per_step_s", "steps", "probe_steps")}
    if opts.patterns != ["structured"] or opts.speed:
        rec.update(pattern=row.pattern, recovery_steps=cfg.steps)
    rep = _finished(run_dir, cfg) if opts.resume else None
    ev = read_json(run_dir / "eval.json") if rep is not None else None
    stale = ev is None or not same_protocol(ev, b.protocols, opts)
    if rep is None or (stale and not _evaluable(run_dir)):  # (a finished row's adapter is deleted after its eval)
        rc, last = run_prune(cfg, out / "logs" / f"{row.id}.log")
        rep = _finished(run_dir, cfg) if rc == 0 else None
        if rep is None:
            return {**rec, "status": "failed", "error": f"prune exited {rc}: {last}"}
        stale = True
    if stale:
        with b.eval_lock:
            b.emit("phase", f"evaluating {row.id}")
            model = load_row_model(opts, run_dir)
            ev = eval_model(model, b.tokenizer, opts, b.seed, row.id)
            del model
        write_json(run_dir / "eval.json", ev)
    if not opts.keep_adapters:
        shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    rec.update(status="ok", **_row_numbers(rep), eval=ev)
    if rep.get("sparsity"):
        rec["nonzero_params"] = rep["sparsity"]["nonzero_params"]
    b.doc["models"][row.id] = {"name": row.id, "path": None, "model_type": rep["model_type"],
                               "params": rep["params_pruned"], "num_layers": rep["num_layers"], "dtype": "fp32",
                               "masked": True, "note": "base model + merged LoRA adapter + masks (not sliced)"}
    return rec


def step_ratios(doc: dict) -> None:
    """Step time of every finished row relative to the plain-LoRA row (the first row)."""
    plain = next((r for r in doc["rows"] if r["plain_lora"] and r["status"] == "ok"), None)
    for r in doc["rows"]:
        if r["status"] == "ok" and plain and plain["mean_step_s"] and r["mean_step_s"]:
            # CPU time of the pruning process per step when the report has it (other processes on
            # shared cores inflate wall time unevenly between rows), else wall time
            r["step_time_rel_wall"] = r["mean_step_s"] / plain["mean_step_s"]
            cpu, ref = r.get("mean_step_cpu_s"), plain.get("mean_step_cpu_s")
            r["step_time_basis"] = "cpu" if cpu and ref else "wall"
            r["step_time_rel"] = cpu / ref if cpu and ref else r["step_time_rel_wall"]


def _row_numbers(rep: dict) -> dict:
    c = rep["config"]
    return {"params_dense": rep["params_dense"], "params_pruned": rep["params_pruned"],
            "params_kept_frac": rep["params_pruned"] / rep["params_dense"],
            "achieved_unit_ratio": rep.get("achieved_unit_ratio"), "peak_rss_mb": rep["peak_rss_mb"],
            "mean_step_s": rep["mean_step_s"], "mean_step_cpu_s": rep.get("mean_step_cpu_s"), "wall_s": rep["wall_s"],
            "loss_start": rep["loss_start"], "loss_end": rep["loss_end"], "steps": len(rep["losses"]),
            "train_cpu_s": sum(rep.get("step_cpu") or []) or None,
            "tokens_seen": len(rep["losses"]) * c["batch_size"] * c["grad_accum"] * c["seq_len"]}


def _budget(opts: BenchOptions) -> dict:
    cfg = PruneConfig.from_dict({**{k: v for k, v in opts.prune_flags.items() if k != "sparsity"},
                                 "model": opts.model})
    keys = ("steps", "batch_size", "grad_accum", "seq_len", "lora_r", "lora_alpha", "lr", "seed", "dtype",
            "data", "prune_every", "warmup_frac", "cooldown_frac", "ema", "calib_batches", "importance",
            "lora_projections", "targets", "skip_layers")
    return {k: getattr(cfg, k) for k in keys}


def _machine() -> dict:
    import platform

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def _write_results(out: Path, doc: dict) -> None:
    from ..eval.results import write_json as write_results_json
    from .table import render_markdown

    recs = []
    for label, ev in [("dense", (doc["dense"] or {}).get("eval"))] + [
            (r["id"], r.get("eval")) for r in doc["rows"] if r["status"] == "ok"]:
        for v in (ev or {}).values():
            if v.get("kind") == "zeroshot_mean":
                recs += list(v.get("per_task", {}).values())
                v = {k: x for k, x in v.items() if k != "per_task"}
            recs.append(v)
    doc["results"] = recs  # the shared results format: every record once, labelled by row id
    write_results_json(doc, out / "results.json")
    write_text(out / "results.md", render_markdown(doc))
