"""The bench table (results.md) and plot (perplexity vs ratio per criterion) from a results document."""
from __future__ import annotations

import math
from pathlib import Path

from . import sparse as sparse_bench
from . import versus
from .options import EVAL_LABELS, BenchOptions

STYLE = {"iterative": ("-", "o"), "oneshot": ("--", "s")}


def _label(name: str) -> str:
    return EVAL_LABELS.get(name, Path(name).name)


def _model(o: dict) -> str:
    return Path(o["model"]).name if o.get("model") else "embedded SmolLM2-135M"


def _params(n) -> str:
    return f"{n / 1e6:.4g}M"


def _num(x, nd=2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:,.{nd}f}"


def _ppl(ev: dict | None, name: str):
    r = (ev or {}).get(name)
    return r.get("ppl") if r else None


def render_markdown(doc: dict) -> str:
    evals = doc["options"]["evals"]
    head = _head(doc)
    lines = _preamble(doc) + ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                              "| " + " | ".join(_dense_cells(doc)) + " |"]
    best = _best(doc["rows"], evals[0]) if evals else {}
    for r in doc["rows"]:
        lines.append("| " + " | ".join(_row_cells(doc, r, best, len(head))) + " |")
    lines += ["", "Bold: lowest first-listed perplexity at that ratio. Columns: see docs/benchmarks.md."]
    return "\n".join(lines + versus.render(doc) + [""])


def _preamble(doc: dict) -> list[str]:
    """Title, progress, budget, eval protocol and machine lines above the table."""
    o, b = doc["options"], doc["budget"]
    dev = (doc.get("dense") or {}).get("eval", {})
    lines = [f"# loraprune bench: {_model(o)}", ""]
    if not doc.get("complete"):
        lines += [f"**In progress**: {len(doc['rows'])} of {_n_rows(o)} rows done.", ""]
    steps = (f"{o['time_budget']:g} CPU-seconds of training steps (steps from a {o['probe_steps']}-step probe of "
             "each row's own step cost)" if o.get("time_budget") else f"{b['steps']} steps")
    lines += [
        f"- Budget per row: {steps} x {b['batch_size'] * b['grad_accum']} sequences x {b['seq_len']} "
        f"tokens of `{b['data'] or 'sotu'}` (same seed {b['seed']} and data order for every row), LoRA r={b['lora_r']} "
        f"alpha={b['lora_alpha']} on q,k,v,o,gate,up,down, lr {b['lr']}, {b['dtype']}.",
        f"- Iterative: masks every {b['prune_every']} steps on a cubic ramp (warm-up {b['warmup_frac']}, "
        f"cool-down {b['cooldown_frac']}), EMA {b['ema']}. Oneshot: scores from {b['calib_batches']} calibration "
        f"batches, prune once, then the same {b['steps']} LoRA steps. Targets {b['targets']}, skipped layers "
        f"{b['skip_layers']}; lora importance {b['importance']}"
        + (f", summed over {b['lora_projections']} projections" if b.get("lora_projections", "all") != "all" else "")
        + ".",
    ]
    for name in o["evals"]:
        r = dev.get(name)
        if r:
            lines.append(f"- {_label(name)} PPL: {Path(r['dataset']).name} {r['split']}, first {r['windows']} of "
                         f"{r['windows_available']} non-overlapping windows x {r['ctx']} tokens, sha "
                         f"{r['content_sha256_16']}, fp32; masked model with LoRA merged.")
    if o["zero_shot"]:
        subset = (f"first {o['zero_shot_limit']}" if o.get("zero_shot_limit") else None) or (
            f"a seeded random {o['zero_shot_sample']} (seed {b['seed']})" if o.get("zero_shot_sample") else "all")
        lines.append(f"- Zero-shot: stock lm_eval on {', '.join(o['zero_shot'])}, {subset} documents per task; "
                     f"lm_eval batch size {o.get('zero_shot_batch_size', 1)}; mean of acc_norm (acc where a task has none).")
    for r in o.get("recipes") or []:
        flags = ", ".join(f"{k}={v}" for k, v in r["flags"].items())
        lines.append(f"- Recipe `{r['name']}` ({r['label']}): {flags or 'the shared flags'}.")
    m = doc.get("machine", {})
    lines += [f"- Machine: {m.get('cpu_count')} CPUs, torch {m.get('torch')}, {m.get('threads')} eval threads, "
              f"CUDA {'yes' if m.get('cuda') else 'no'}. {_step_basis(doc)}"]
    if sparse_bench.table_columns(doc) and sparse_bench.speed_note(doc):
        lines.append(sparse_bench.speed_note(doc))
    return lines


def _recipes(doc: dict) -> bool:
    return bool(doc["options"].get("recipes"))


def _head(doc: dict) -> list[str]:
    o = doc["options"]
    head = ["criterion", "schedule", "ratio", "params kept"] + [f"{_label(e)} PPL" for e in o["evals"]]
    if _recipes(doc):
        head[:2] = ["recipe", "-"]
    if o["zero_shot"]:
        head.append("zero-shot mean")
    head += ["peak RSS (MB)", "step time vs plain LoRA", "prune wall (s)"]
    if o.get("time_budget"):
        head += ["steps", "tokens seen", "train CPU (s)"]
    if sparse_bench.table_columns(doc):  # N:M / unstructured rows or --speed: three more columns
        head[3:3] = ["pattern"]
        head[5:5] = ["nonzero params"]
        head.append("CPU prefill / decode")
    return head


def _with_sparse(doc: dict, r: dict | None, cells: list[str]) -> list[str]:
    if sparse_bench.table_columns(doc):
        extra = sparse_bench.cells(doc, r)
        cells[3:3], cells[5:5] = extra[:1], extra[1:2]
        cells.append(extra[2])
    return cells


def _dense_cells(doc: dict) -> list[str]:
    o, dense = doc["options"], doc.get("dense") or {}
    dev, pd = dense.get("eval", {}), dense.get("params")
    cells = ["dense (no fine-tuning)", "-", "0", f"{_params(pd)} (100%)" if pd else "n/a"]
    cells += [_num(_ppl(dev, e)) for e in o["evals"]]
    if o["zero_shot"]:
        cells.append(_num((dev.get("zeroshot") or {}).get("mean"), 4))
    cells += ["", "", ""] + (["", "", ""] if o.get("time_budget") else [])
    return _with_sparse(doc, None, cells)


def _row_cells(doc: dict, r: dict, best: dict, width: int) -> list[str]:
    o = doc["options"]
    name = "plain LoRA (no pruning)" if r["plain_lora"] else r.get("label") or r["criterion"]
    cells = [name, "-" if r["plain_lora"] or r.get("recipe") else r["schedule"], f"{r['ratio']:g}"]
    if r["status"] != "ok":
        cells += [f"FAILED: {r.get('error', '')[:80]}"] + [""] * (width - 4)
        if sparse_bench.table_columns(doc):
            cells[3:3] = [r.get("pattern", "structured")]
            cells = cells[:width]
        return cells
    cells.append(f"{_params(r['params_pruned'])} ({100 * r['params_kept_frac']:.1f}%)")
    for i, e in enumerate(o["evals"]):
        v = _num(_ppl(r["eval"], e))
        cells.append(f"**{v}**" if i == 0 and best.get(_group(r)) == r["id"] else v)
    if o["zero_shot"]:
        cells.append(_num((r["eval"].get("zeroshot") or {}).get("mean"), 4))
    rel = r.get("step_time_rel")
    cells += [_num(r["peak_rss_mb"], 0), f"{rel:.2f}x" if rel else "n/a", _num(r["wall_s"], 1)]
    if o.get("time_budget"):
        cells += [str(r["steps"]), f"{r['tokens_seen']:,}", _num(r.get("train_cpu_s"), 0)]
    return _with_sparse(doc, r, cells)


def _step_basis(doc: dict) -> str:
    basis = {r.get("step_time_basis") for r in doc["rows"] if r.get("step_time_rel")}
    if basis == {"cpu"}:
        return ("Step time vs plain LoRA: CPU time of the pruning process per optimizer step (robust to other "
                "load on shared cores; wall-time ratios are in results.json).")
    return "Step time vs plain LoRA: wall time per optimizer step (noisy on shared cores)."


def _n_rows(o: dict) -> int:
    """Rows the bench will run: every kind (structured, element-pattern, plain), as BenchOptions.rows."""
    return len(BenchOptions(**o).rows())


def _group(r: dict):
    """Rows compared for the bold mark: same ratio and same element pattern."""
    return (r["ratio"], r.get("pattern", "structured"))


def _best(rows: list[dict], name: str) -> dict:
    best = {}
    for r in rows:
        if r["status"] != "ok" or r["plain_lora"]:
            continue
        v = _ppl(r["eval"], name)
        if v is None or not math.isfinite(v):
            continue
        if _group(r) not in best or v < best[_group(r)][0]:
            best[_group(r)] = (v, r["id"])
    return {k: v[1] for k, v in best.items()}


def plot(doc: dict, path) -> None:
    """PPL (log scale) vs ratio: one panel per eval text, one line per recipe (or criterion and schedule); lines
    start at the plain-LoRA row (ratio 0); the dense model is the dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = doc["options"]["evals"]
    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    plain = next((r for r in rows if r["plain_lora"]), None)
    fig, axes = plt.subplots(1, max(1, len(evals)), figsize=(6 * max(1, len(evals)), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = versus.plot_lines(doc)   # one line per recipe, or per (criterion, schedule)
    for ax, name in zip(axes[0], evals):
        for ci, (label, sched, line_rows) in enumerate(lines):
            pts = sorted((r["ratio"], _ppl(r["eval"], name)) for r in line_rows)
            pts = [p for p in pts if p[1] is not None and math.isfinite(p[1])]
            if not pts:
                continue
            if plain and _ppl(plain["eval"], name):
                pts = [(0.0, _ppl(plain["eval"], name))] + pts
            ls, mk = STYLE.get(sched, ("-", "^"))
            ax.plot(*zip(*pts), linestyle=ls, marker=mk, color=colors[ci % len(colors)], label=label)
        d = _ppl((doc.get("dense") or {}).get("eval"), name)
        if d:
            ax.axhline(d, color="grey", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("ratio (fraction of units removed per pruned layer)")
        ax.set_ylabel(f"{_label(name)} perplexity")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    b = doc["budget"]
    budget = (f"{doc['options']['time_budget']:g} CPU-s of LoRA steps" if doc["options"].get("time_budget")
              else f"{b['steps']} LoRA steps")
    fig.suptitle(f"{_model(doc['options'])}: {budget} x {b['batch_size'] * b['grad_accum']} x {b['seq_len']} "
                 "tokens per row", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
