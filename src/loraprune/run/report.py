"""report.json (machine-readable) and report.md (the summary table the CLI prints)."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from .. import __version__
from ..files import write_json, write_text
from ..sysmem import peak_rss_mb


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _layers(job) -> tuple[list[dict], int, int]:
    """Per-layer kept counts, and kept / total units over the pruned layers' targeted kinds."""
    cfg, spec, masks = job.cfg, job.spec, job.masks
    layers, units_total, units_kept = [], 0, 0
    for i, s in enumerate(spec.layers):
        k = masks.kept_counts(i)
        layers.append({"layer": i, "pruned": i in masks.prunable, "heads": k["heads"], "heads_of": s.num_heads,
                       "kv_heads": k["kv_heads"], "kv_heads_of": s.num_kv_heads,
                       "ffn": k["ffn"], "ffn_of": s.intermediate_size})
        if i in masks.prunable:
            if "heads" in cfg.target_list:
                units_total += s.num_heads
                units_kept += k["heads"]
            if "ffn" in cfg.target_list:
                units_total += s.intermediate_size
                units_kept += k["ffn"]
    return layers, units_kept, units_total


def build_report(job, export_info: dict | None, pruned_ppl: dict | None) -> dict:
    """report.json of a finished run (docs/results-format.md); prunings add their parts after."""
    from ..core.schedule import Ramp

    cfg, spec, masks, h = job.cfg, job.spec, job.masks, job.history
    layers, units_kept, units_total = _layers(job)
    params_dense, losses = job.params_dense, h.losses
    predicted = params_dense - masks.params_removed()
    params_after = export_info["params"] if export_info else predicted
    head_frac = [1 - l["heads"] / l["heads_of"] for l in layers if l["pruned"]]
    ffn_frac = [1 - l["ffn"] / l["ffn_of"] for l in layers if l["pruned"]]
    k = max(1, min(5, len(losses) // 4)) if losses else 1
    evals = [{"dense": d, "pruned": p, **meta, "dtype": "fp32", "seed": cfg.seed} for d, p, (_, meta)
             in zip(job.dense_ppl or [], pruned_ppl or [None] * len(job.loaded.evals), job.loaded.evals)]
    return {
        "loraprune_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": cfg.to_dict(),
        "model_type": spec.model_type,
        "num_layers": spec.num_layers,
        "prunable_layers": masks.prunable,
        "params_dense": params_dense,
        "params_pruned_predicted": predicted,
        "params_pruned": params_after,
        "params_removed_fraction": 1 - params_after / params_dense,
        "target_ratio": cfg.ratio,
        "achieved_head_ratio_mean": _mean(head_frac),
        "achieved_ffn_ratio_mean": _mean(ffn_frac),
        "achieved_unit_ratio": (1 - units_kept / units_total) if units_total else 0.0,
        "layers": layers,
        "loss_start": _mean(losses[:k]),
        "loss_end": _mean(losses[-k:]),
        "loss_window_steps": k,
        "losses": losses,
        "loss_parts": h.parts,
        "ratio_per_step": h.ratios,
        "mean_step_s": _mean(h.step_times),
        "mean_step_cpu_s": _mean(h.step_cpu),
        "step_cpu": h.step_cpu,
        "train_sequences": int(job.loaded.seqs.shape[0]),
        "ramp_start_end_steps": list(Ramp.from_config(cfg).bounds()),
        "mask_history": [],
        "evals": evals,
        "eval": evals[0] if evals else {"dense": None, "pruned": None, "dtype": "fp32", "seed": cfg.seed},
        "export": export_info,
        "wall_s": time.time() - job.t0,
        "peak_rss_mb": peak_rss_mb(),
        "world_size": job.dist.world,
    }


def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def render_markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        f"# loraprune report: {c['criterion']} criterion, {c['schedule']} schedule, ratio {c['ratio']}",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| model | {c['model'] or 'embedded SmolLM2-135M'} ({r['model_type']}, {r['num_layers']} layers) |",
        f"| params dense -> pruned | {r['params_dense']:,} -> {r['params_pruned']:,} "
        f"({100 * r['params_removed_fraction']:.1f}% of parameters removed) |",
        f"| target unit ratio (pruned layers) | {c['ratio']} |",
        f"| achieved ratio: heads / FFN channels / all units | "
        f"{_pct(r['achieved_head_ratio_mean'])} / {_pct(r['achieved_ffn_ratio_mean'])} / "
        f"{_pct(r['achieved_unit_ratio'])} |",
        f"| pruned layers | {_ranges(r['prunable_layers'])} of 0-{r['num_layers'] - 1} |",
        *_sparsity_lines(r.get("sparsity")),
        f"| training loss start -> end (mean of {r['loss_window_steps']} steps) | "
        f"{_fmt(r['loss_start'], 3)} -> {_fmt(r['loss_end'], 3)} |",
        *_part_lines(r),
    ]
    for k, ev in enumerate(r.get("evals") or ([r["eval"]] if r["eval"].get("dense") else [])):
        d, p = ev["dense"], ev["pruned"]
        label = "held-out" if k == 0 else ev["dataset"].upper() if ev["dataset"] == "ptb" else ev["dataset"]
        lines.append(f"| {label} PPL dense -> pruned | {_fmt(d['ppl'])} -> {_fmt(p['ppl'])} "
                     f"({_ratio(p['ppl'], d['ppl'])}; {ev['dataset']} {ev['split']}, {d['windows']} windows x "
                     f"{d['ctx']} tokens, sha {ev['content_sha256_16']}) |")
    lines += [
        f"| steps x batch x seq | {c['steps']} x {c['batch_size'] * c['grad_accum']} x {c['seq_len']} "
        f"(mean step {_fmt(r['mean_step_s'])} s) |",
        f"| wall time | {_fmt(r['wall_s'], 1)} s |",
        f"| peak memory (RSS) | {_fmt(r['peak_rss_mb'], 0)} MB |",
        "",
        *_plot_lines(r),
        "Per-layer kept units (heads / KV heads / FFN channels):",
        "",
        "| layer | heads | KV heads | FFN channels |",
        "|---|---|---|---|",
    ]
    for l in r["layers"]:
        mark = "" if l["pruned"] else " (skipped)"
        lines.append(f"| {l['layer']}{mark} | {l['heads']}/{l['heads_of']} | {l['kv_heads']}/{l['kv_heads_of']} "
                     f"| {l['ffn']}/{l['ffn_of']} |")
    return "\n".join(lines) + "\n"


def _plot_lines(r: dict) -> list[str]:
    from .plots import LAYERS, TRAINING

    plots = r.get("plots")
    if plots is None:  # a report rendered outside a run directory
        return []
    if not plots:
        return ["(Plots need matplotlib: pip install 'loraprune[plot]'.)", ""]
    return [f"![training loss and pruned ratio per step]({TRAINING})", "",
            f"![kept heads, KV heads and FFN channels per layer]({LAYERS})", ""]


def _part_lines(r: dict) -> list[str]:
    """CE and KL start -> end when the objective has more than one part (distillation)."""
    parts, k = r.get("loss_parts") or {}, r["loss_window_steps"]
    if len(parts) < 2:
        return []
    return [f"| {name.upper()} start -> end | {_fmt(_mean(v[:k]), 3)} -> {_fmt(_mean(v[-k:]), 3)} |"
            for name, v in parts.items()]


def _sparsity_lines(sp: dict | None) -> list[str]:
    """--pattern N:M / unstructured (core/element_pruning.py, describe); nothing otherwise."""
    if not sp:
        return []
    line = (f"| element pattern ({sp['criterion']} criterion, all layers) | {sp['pattern']}: {sp['zeros']:,} of "
            f"{sp['total']:,} projection weights zero ({100 * sp['sparsity']:.2f}%) |")
    nz = sp.get("nonzero_params")
    return [line] + ([f"| nonzero parameters | {nz:,} |"] if nz is not None else [])


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for v in idx[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def write_report(report: dict, out_dir: Path) -> None:
    from .plots import write_plots

    out_dir = Path(out_dir)
    report["plots"] = write_plots(report, out_dir)
    write_text(out_dir / "report.md", render_markdown(report))
    write_json(out_dir / "report.json", report)  # last: it marks the directory complete
