"""The second table of a bench: every row against the dense model measured in the same run --
perplexity as a multiple of dense, and the zero-shot tasks one by one with their mean and its
difference from dense in points -- so a target such as "PTB <= 1.5x dense" is read off directly.
With BoolQ among several tasks the mean is also given without it: a small pruned model tends to answer
BoolQ with one label for every question, so its BoolQ score swings with the label balance of the
sample (0.33 to 0.65 on the committed 200-document sample) rather than with what the model kept."""
from __future__ import annotations

import math
from pathlib import Path

from .options import EVAL_LABELS

TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def _ppl(ev: dict | None, name: str):
    r = (ev or {}).get(name)
    return r.get("ppl") if r else None


def _task_score(rec: dict) -> float | None:
    """acc_norm where the task defines it, else acc (the rule of the zero-shot mean)."""
    v = rec.get("acc_norm")
    return v if v is not None else rec.get("acc")


def _zs(ev: dict | None) -> dict:
    return (ev or {}).get("zeroshot") or {}


def _ratio(x, d) -> str:
    if x is None or not d or not math.isfinite(x):
        return "n/a"
    return f"{x / d:.2f}x"


def _row_name(r: dict) -> str:
    return "plain LoRA (no pruning)" if r["plain_lora"] else r.get("label") or f"{r['criterion']} {r['schedule']}"


def render(doc: dict) -> list[str]:
    """Markdown lines of the against-dense table ([] when there is no dense evaluation)."""
    o = doc["options"]
    dense_ev = (doc.get("dense") or {}).get("eval")
    if not dense_ev:
        return []
    evals = o["evals"]
    tasks = list(o.get("zero_shot") or [])
    head = ["row", "ratio"] + [f"{EVAL_LABELS.get(e, Path(e).name)} PPL vs dense" for e in evals]
    head += [TASK_LABELS.get(t, t) for t in tasks] + (["zero-shot mean", "vs dense (points)"] if tasks else [])
    head += ["mean w/o BoolQ", "vs dense w/o BoolQ (points)"] if _without_boolq(tasks) else []
    dense_zs = _zs(dense_ev)
    lines = ["", "Against dense (same run): perplexity as a multiple of dense; zero-shot acc_norm per task "
             "(acc where a task has none), mean, and the mean's difference from dense in points.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| " + " | ".join(_cells("dense (no fine-tuning)", "0", dense_ev, dense_ev, evals, tasks, dense_zs))
                 + " |")
    for r in doc["rows"]:
        if r["status"] != "ok":
            continue
        lines.append("| " + " | ".join(_cells(_row_name(r), f"{r['ratio']:g}", r.get("eval"), dense_ev, evals,
                                                tasks, dense_zs)) + " |")
    return lines


def _cells(name, ratio, ev, dense_ev, evals, tasks, dense_zs) -> list[str]:
    # params: one table row (its name, ratio, eval), the dense reference, and the columns to fill
    cells = [name, ratio] + [_ratio(_ppl(ev, e), _ppl(dense_ev, e)) for e in evals]
    if not tasks:
        return cells
    zs = _zs(ev)
    per = zs.get("per_task") or {}
    for t in tasks:
        v = _task_score(per[t]) if t in per else None
        cells.append("n/a" if v is None else f"{v:.3f}")
    mean, dmean = zs.get("mean"), dense_zs.get("mean")
    cells.append("n/a" if mean is None else f"{mean:.4f}")
    cells.append("n/a" if mean is None or dmean is None else f"{100 * (mean - dmean):+.1f}")
    others = _without_boolq(tasks)
    if others:
        mean, dmean = _mean_of(zs, others), _mean_of(dense_zs, others)
        cells.append("n/a" if mean is None else f"{mean:.4f}")
        cells.append("n/a" if mean is None or dmean is None else f"{100 * (mean - dmean):+.1f}")
    return cells


def _without_boolq(tasks: list) -> list:
    """The tasks of the second mean: all but BoolQ, when BoolQ is one of several ([] otherwise)."""
    return [t for t in tasks if t != "boolq"] if "boolq" in tasks and len(tasks) > 1 else []


def _mean_of(zs: dict, tasks: list) -> float | None:
    per = zs.get("per_task") or {}
    vals = [_task_score(per[t]) if t in per else None for t in tasks]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def plot_lines(doc: dict) -> list[tuple[str, str, list]]:
    """(label, style key, rows) per line of the perplexity-vs-ratio plot: one line per recipe in a
    --recipes bench, else one per (criterion, schedule); structured rows only, plain LoRA excluded."""
    rows = [r for r in doc["rows"] if r["status"] == "ok" and not r["plain_lora"]
            and r.get("pattern", "structured") == "structured"]
    if doc["options"].get("recipes"):
        return [(rc["label"], (rc["flags"] or {}).get("schedule", "iterative"),
                 [r for r in rows if r.get("recipe") == rc["name"]]) for rc in doc["options"]["recipes"]]
    out = []
    for c in dict.fromkeys(r["criterion"] for r in rows):
        for s in doc["options"]["schedules"]:
            out.append((f"{c} ({s})", s, [r for r in rows if r["criterion"] == c and r["schedule"] == s]))
    return out
