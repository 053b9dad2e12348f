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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import CRITERIA, SCHEDULES, PruneConfig
from .errors import UserError

log = logging.getLogger(__name__)

SCHEMA = "loraprune.bench/1"
EVAL_LABELS = {"ptb": "PTB", "sotu": "held-out", "sotu-heldout": "held-out"}
PLAIN_ID = "plain-lora-r0"


@dataclass
class Row:
    criterion: str
    schedule: str
    ratio: float
    pattern: str = "structured"   # or N:M / unstructured (docs/sparsity.md)
    steps: int | None = None      # None: the bench budget; 0: one-shot without LoRA recovery

    @property
    def id(self) -> str:
        if self.ratio == 0 and self.pattern == "structured":
            return PLAIN_ID
        rid = f"{self.criterion}-{self.schedule}" + (f"-r{self.ratio:g}" if self.ratio else "")
        if self.pattern != "structured":
            rid += "-" + self.pattern.replace(":", "of")
        return rid + ("-norec" if self.steps == 0 else "")


@dataclass
class BenchOptions:
    out: str
    model: str | None = None
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.5])
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))
    schedules: list[str] = field(default_factory=lambda: list(SCHEDULES))
    prune_flags: dict = field(default_factory=dict)  # PruneConfig field -> value, same for every row
    evals: list[str] = field(default_factory=lambda: ["ptb", "sotu"])
    eval_ctx: int = 512
    eval_windows: int = 16          # first K windows of each eval text; 0 = all
    zero_shot: list[str] = field(default_factory=list)
    zero_shot_limit: int | None = None
    plain_row: bool = True
    overwrite: bool = False
    resume: bool = False
    keep_adapters: bool = False
    threads: int = 0
    # element sparsity rows (sparse_bench.py): patterns, their criteria, one-shot rows without recovery,
    # and the CPU speed of every exported model
    patterns: list[str] = field(default_factory=lambda: ["structured"])
    element_criteria: list[str] = field(default_factory=lambda: ["lora", "magnitude", "wanda"])
    no_recovery: bool = False
    speed: bool = False

    def rows(self) -> list[Row]:
        from .sparse_bench import element_rows

        rows = [Row("lora", "iterative", 0.0)] if self.plain_row else []
        for p in self.patterns:
            if p != "structured":
                rows += element_rows(self, p)
                continue
            for r in self.ratios:
                for c in self.criteria:
                    for s in self.schedules:
                        rows.append(Row(c, s, r))
        return rows

    def row_config(self, row: Row, run_dir: Path) -> PruneConfig:
        """The PruneConfig of a row (validated here, before any run starts)."""
        vals = {**self.prune_flags, "model": self.model, "criterion": row.criterion, "schedule": row.schedule,
                "ratio": row.ratio, "out": str(run_dir), "overwrite": True, "export": False, "eval_windows": 0}
        if self.patterns != ["structured"] or self.speed:
            from .sparse_bench import row_values

            vals.update(row_values(self, row))
        if self.threads:
            vals["threads"] = self.threads
        return PruneConfig.from_dict(vals)


def validate(opts: BenchOptions) -> None:
    if not opts.ratios or any(not 0 < r < 1 for r in opts.ratios):
        raise UserError(f"--ratios {opts.ratios}: give ratios in (0, 1), e.g. 0.2,0.5")
    from .sparse_bench import validate_sparse

    validate_sparse(opts)
    bad = [c for c in opts.criteria if c not in CRITERIA]
    if bad or not opts.criteria:
        raise UserError(f"--criteria: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(CRITERIA)}")
    bad = [s for s in opts.schedules if s not in SCHEDULES]
    if bad or not opts.schedules:
        raise UserError(f"--schedules: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(SCHEDULES)}")
    if not opts.evals:
        raise UserError("--eval needs at least one of ptb, sotu or a text file")
    if opts.eval_ctx < 2 or opts.eval_windows < 0:
        raise UserError("--eval-ctx must be >= 2 and --eval-windows >= 0")
    if opts.overwrite and opts.resume:
        raise UserError("--overwrite and --resume exclude each other")
    if opts.zero_shot:
        from .zeroshot import parse_tasks

        _zeroshot_api()
        opts.zero_shot = parse_tasks(opts.zero_shot)
    for row in opts.rows():  # every flag combination is a valid prune config
        opts.row_config(row, Path(opts.out) / "runs" / row.id)


def _zeroshot_api():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--zero-shot needs lm-evaluation-harness: pip install 'loraprune[eval]'") from None
    from . import zeroshot

    return zeroshot


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


def eval_protocols(opts: BenchOptions) -> dict:
    """name -> provenance of each eval text (dataset, split, content hash): checked before any run,
    and used by --resume to tell whether saved numbers were measured on the same text."""
    from .evaluate import load_ppl_text

    return {name: load_ppl_text(name)[1] for name in opts.evals}


def eval_model(model, tokenizer, opts: BenchOptions, seed: int, label: str) -> dict:
    """{eval name: perplexity record, "zeroshot": zeroshot_mean record} (docs/results-format.md)."""
    from .evaluate import ppl_record

    out = {name: ppl_record(model, tokenizer, name, ctx=opts.eval_ctx, max_windows=opts.eval_windows or None,
                            seed=seed, model_label=label) for name in opts.evals}
    if opts.zero_shot:
        out["zeroshot"] = _zeroshot_api().zeroshot_mean(model, tokenizer, opts.zero_shot, opts.zero_shot_limit,
                                                        model_label=label)
    return out


def load_row_model(opts: BenchOptions, run_dir: Path):
    """Base model + the row's adapter merged in + its masks attached (eval only)."""
    from peft import PeftModel

    from .arch import model_spec
    from .masks import MaskSet
    from .models import load_model

    trust = bool(opts.prune_flags.get("trust_remote_code", False))
    base = load_model(opts.model, "fp32", trust)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    if (run_dir / "element_masks.safetensors").is_file():  # N:M / unstructured row: zero the pruned weights
        from .sparsity import ElementMasks

        ElementMasks.load(run_dir / "element_masks.safetensors").apply_to_model(model)
    masks = MaskSet.load(run_dir / "masks.json", model_spec(model.config))
    masks.attach(model)
    return model.eval()


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


ALWAYS = ("criterion", "schedule", "ratio", "steps", "seed", "out")


def config_flags(cfg: PruneConfig) -> list[str]:
    """cfg as prune flags: the row's identity always, every other field when not at its default."""
    default = PruneConfig().to_dict()
    flags = []
    for k, v in cfg.to_dict().items():
        if v is None or (v == default[k] and k not in ALWAYS):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            flags += [flag, str(v)]
    return flags


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


def run_bench(opts: BenchOptions, command: list[str] | None = None, on_event=None) -> dict:
    """Run every row; return the results document (also written to opts.out)."""
    from .models import load_model, load_tokenizer
    from .results import model_info, new_document

    emit = on_event or (lambda *a, **k: None)
    validate(opts)
    out = prepare_out(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    seed = int(opts.prune_flags.get("seed", PruneConfig().seed))
    trust = bool(opts.prune_flags.get("trust_remote_code", False))
    t0 = time.time()
    doc = new_document(command)
    doc.update({"bench_schema": SCHEMA, "options": asdict(opts), "complete": False, "budget": _budget(opts),
                "machine": _machine(), "dense": None, "rows": []})

    emit("phase", "dense model evaluation")
    tokenizer = load_tokenizer(opts.model, trust)
    protocols = eval_protocols(opts)
    dense_path = out / "dense_eval.json"
    dense = _read_json(dense_path) if opts.resume else None
    if dense is None or not _same_protocol(dense.get("eval"), protocols, opts):
        model = load_model(opts.model, "fp32", trust)
        dense = {"params": sum(p.numel() for p in model.parameters()),
                 "model": model_info(model, opts.model, None, "fp32"),
                 "eval": eval_model(model, tokenizer, opts, seed, "dense")}
        del model
        _write_json(dense_path, dense)
    doc["dense"] = dense
    doc["models"]["dense"] = dense["model"]

    rows = opts.rows()
    for k, row in enumerate(rows, 1):
        run_dir = out / "runs" / row.id
        cfg = opts.row_config(row, run_dir)
        emit("row_start", k, len(rows), row)
        rec = {"id": row.id, "criterion": row.criterion, "schedule": row.schedule, "ratio": row.ratio,
               "plain_lora": row.id == PLAIN_ID, "run_dir": str(run_dir.relative_to(out))}
        if opts.patterns != ["structured"] or opts.speed:
            rec.update(pattern=row.pattern, recovery_steps=cfg.steps)
        rep = _finished(run_dir, cfg) if opts.resume else None
        if rep is None:
            rc, last = run_prune(cfg, out / "logs" / f"{row.id}.log")
            rep = _finished(run_dir, cfg) if rc == 0 else None
            if rep is None:
                rec.update(status="failed", error=f"prune exited {rc}: {last}")
                doc["rows"].append(rec)
                emit("row_done", k, len(rows), rec)
                _write_results(out, doc)
                continue
        ev = _read_json(run_dir / "eval.json") if opts.resume else None
        if ev is None or not _same_protocol(ev, protocols, opts):
            emit("phase", f"evaluating {row.id}")
            model = load_row_model(opts, run_dir)
            ev = eval_model(model, tokenizer, opts, seed, row.id)
            del model
            _write_json(run_dir / "eval.json", ev)
        if not opts.keep_adapters:
            shutil.rmtree(run_dir / "adapter", ignore_errors=True)
        rec.update(status="ok", **_row_numbers(rep), eval=ev)
        if rep.get("sparsity"):
            rec["nonzero_params"] = rep["sparsity"]["nonzero_params"]
        doc["models"][row.id] = {"name": row.id, "path": None, "model_type": rep["model_type"],
                                 "params": rep["params_pruned"], "num_layers": rep["num_layers"], "dtype": "fp32",
                                 "masked": True, "note": "base model + merged LoRA adapter + masks (not sliced)"}
        doc["rows"].append(rec)
        step_ratios(doc)
        emit("row_done", k, len(rows), rec)
        _write_results(out, doc)

    step_ratios(doc)
    if opts.speed:
        from .sparse_bench import measure_speed

        emit("phase", "CPU speed of every exported model")
        measure_speed(doc, out, opts)
    doc["complete"] = True
    doc["wall_s"] = round(time.time() - t0, 1)
    _write_results(out, doc)
    from .bench_report import plot

    plot(doc, out / "ppl_vs_ratio.png")
    return doc


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
    return {"params_dense": rep["params_dense"], "params_pruned": rep["params_pruned"],
            "params_kept_frac": rep["params_pruned"] / rep["params_dense"],
            "achieved_unit_ratio": rep.get("achieved_unit_ratio"), "peak_rss_mb": rep["peak_rss_mb"],
            "mean_step_s": rep["mean_step_s"], "mean_step_cpu_s": rep.get("mean_step_cpu_s"), "wall_s": rep["wall_s"],
            "loss_start": rep["loss_start"],
            "loss_end": rep["loss_end"], "steps": len(rep["losses"])}


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


def _same_protocol(ev: dict | None, protocols: dict, opts: BenchOptions) -> bool:
    """Whether saved eval records were measured with the current protocol (for --resume)."""
    ev = ev or {}
    for name, meta in protocols.items():
        r = ev.get(name)
        if not r or r.get("ctx") != opts.eval_ctx or r.get("content_sha256_16") != meta["content_sha256_16"]:
            return False
        if r.get("max_windows") != (opts.eval_windows or None):
            return False
    if opts.zero_shot:
        z = ev.get("zeroshot") or {}
        return z.get("tasks") == list(opts.zero_shot) and z.get("limit") == opts.zero_shot_limit
    return True


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _write_results(out: Path, doc: dict) -> None:
    from .bench_report import render_markdown
    from .results import write_json

    recs = []
    for label, ev in [("dense", (doc["dense"] or {}).get("eval"))] + [
            (r["id"], r.get("eval")) for r in doc["rows"] if r["status"] == "ok"]:
        for v in (ev or {}).values():
            if v.get("kind") == "zeroshot_mean":
                recs += list(v.get("per_task", {}).values())
                v = {k: x for k, x in v.items() if k != "per_task"}
            recs.append(v)
    doc["results"] = recs  # the shared results format: every record once, labelled by row id
    write_json(doc, out / "results.json")
    tmp = out / f".results.md.tmp-{os.getpid()}"
    tmp.write_text(render_markdown(doc))
    os.replace(tmp, out / "results.md")
