"""Named recipes and equal CPU time for `loraprune bench --recipes FILE --time-budget S`.

A recipe file (YAML or JSON) lists named flag sets; every recipe runs at every --ratios value:

    recipes:
      - name: paper                        # row id: paper-r0.2, paper-r0.5
        label: LoRAPrune as in the paper   # shown in the table
        flags: {criterion: lora, schedule: iterative, allocation: uniform, distill_alpha: 0}

With --time-budget S every row gets S seconds of this process's CPU time for its training steps:
a probe run of the row's own config (--probe-steps steps, no evaluation, no export) measures its CPU
time per optimizer step (the first step, a warm-up, excluded), and the row then runs
floor(S / that) steps. Process CPU time, not wall time: rows that share the machine with other work
(or with each other, one thread each) are still given the same compute. The probe is kept in
probes/<row>.json and reused by --resume.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.config import PruneConfig, load_config_file
from ..errors import UserError
from ..files import read_json, write_json


def load_recipes(path: str) -> list[dict]:
    """[{name, label, flags}] from a recipe file; every flag must be a PruneConfig field."""
    data = load_config_file(path)
    recipes = data.get("recipes")
    if not isinstance(recipes, list) or not recipes:
        raise UserError(f"{path}: expected a non-empty list under 'recipes:'")
    names, out = set(), []
    for k, r in enumerate(recipes):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not isinstance(r.get("flags", {}), dict):
            raise UserError(f"{path}: recipe {k + 1} needs a name and a flags mapping")
        if r["name"] in names or not r["name"].replace("-", "").replace("_", "").isalnum():
            raise UserError(f"{path}: recipe name {r['name']!r} is repeated or not [A-Za-z0-9_-]")
        names.add(r["name"])
        flags = set(r.get("flags", {}))
        bad = (flags - set(PruneConfig().to_dict())) | (flags & {"ratio", "out", "steps"})
        if bad:
            raise UserError(f"{path}: recipe {r['name']!r} sets {', '.join(sorted(bad))}, which a recipe cannot set")
        out.append({"name": r["name"], "label": str(r.get("label", r["name"])), "flags": dict(r.get("flags", {}))})
    return out


def budget_steps(cfg: PruneConfig, run_dir: Path, opts, run_prune) -> tuple[PruneConfig, dict]:
    """The row's config with steps = floor(time_budget / CPU per step), from a probe run (cached)."""
    probe_dir = run_dir.parent.parent / "probes" / run_dir.name   # (a prune run replaces run_dir)
    record = probe_dir.parent / f"{run_dir.name}.json"
    probe_cfg = replace(cfg, steps=opts.probe_steps, out=str(probe_dir), save_every=0, export=False, eval_windows=0)
    probe_cfg = PruneConfig.from_dict(probe_cfg.to_dict())  # re-validated (ramp, lr warm-up)
    cached = read_json(record) if opts.resume else None
    if not cached or cached.get("config") != probe_cfg.to_dict() or cached.get("time_budget") != opts.time_budget:
        rc, last = run_prune(probe_cfg, run_dir.parent.parent / "logs" / f"{run_dir.name}.probe.log")
        rep = read_json(probe_dir / "report.json") if rc == 0 else None
        if rep is None:
            raise RuntimeError(f"probe run exited {rc}: {last}")
        cpu = rep["step_cpu"][1:]  # the first step warms caches up
        per_step = sum(cpu) / len(cpu)
        cached = {"config": probe_cfg.to_dict(), "time_budget": opts.time_budget, "probe_steps": opts.probe_steps,
                  "cpu_per_step_s": per_step, "steps": max(opts.probe_steps, int(opts.time_budget // per_step))}
        write_json(record, cached)
    return PruneConfig.from_dict({**cfg.to_dict(), "steps": cached["steps"]}), cached
