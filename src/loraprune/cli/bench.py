"""`loraprune bench`: a side-by-side table of criteria x schedules x ratios (see loraprune/bench/)."""
from __future__ import annotations

import argparse
import sys
import time

from ..core.config import CRITERIA, SCHEDULES
from .flags import add_config_flags, given_flags

# PruneConfig fields the bench sets per row (or replaces by its own evaluation); all others pass through.
OWN = {"ratio", "criterion", "schedule", "out", "overwrite", "export", "eval_data", "eval_ctx", "eval_windows",
       "pattern"}


def _list(conv):
    def parse(text):
        try:
            return [conv(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot parse {text!r} as a comma-separated list") from None
    return parse


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="compare criteria and schedules at several ratios on the same model, data and budget",
        description="Run `loraprune prune` once per (criterion, schedule, ratio) in a subprocess, plus a plain "
                    "LoRA fine-tuning row (ratio 0), evaluate every result and the dense model with one protocol, "
                    "and write results.json, results.md and ppl_vs_ratio.png. Any prune flag not listed "
                    "under bench options (e.g. --steps, --seq-len, --batch-size, --lr, --seed) is passed to "
                    "every row unchanged.")
    g = p.add_argument_group("bench options")
    g.add_argument("--ratios", type=_list(float), default=[0.2, 0.5], help="comma list (default: 0.2,0.5)")
    g.add_argument("--criteria", type=_list(str), default=list(CRITERIA),
                   help=f"comma list (default: {','.join(CRITERIA)})")
    g.add_argument("--schedules", type=_list(str), default=list(SCHEDULES),
                   help=f"comma list (default: {','.join(SCHEDULES)})")
    g.add_argument("--eval", type=_list(str), default=["ptb", "sotu"],
                   help="perplexity texts: ptb (test), sotu (held-out speeches), or text files (default: ptb,sotu)")
    g.add_argument("--eval-ctx", type=int, default=512, help="perplexity window in tokens (default: 512)")
    g.add_argument("--eval-windows", type=int, default=16,
                   help="first K non-overlapping windows of each eval text; 0 = all (default: 16)")
    g.add_argument("--zero-shot", type=_list(str), default=[], metavar="TASKS",
                   help="zero-shot tasks to average (needs loraprune.zeroshot)")
    g.add_argument("--zero-shot-limit", type=int, default=None, help="the first N documents per zero-shot task")
    g.add_argument("--zero-shot-sample", type=int, default=None, metavar="N",
                   help="a seeded random N documents per zero-shot task (the same for every row; seed: --seed)")
    g.add_argument("--zero-shot-batch-size", type=int, default=1, metavar="B",
                   help="lm_eval batch size of the zero-shot tasks (recorded with every number; default: 1)")
    g.add_argument("--recipes", metavar="FILE", default=None,
                   help="YAML/JSON list of named recipes (flag sets) to run at every ratio, instead of the "
                        "criteria x schedules grid (see loraprune/bench/recipes.py)")
    g.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="CPU seconds of training steps per row; each row's steps come from a probe of its own "
                        "step cost (0: --steps for every row)")
    g.add_argument("--probe-steps", type=int, default=6, help="steps of the time-budget probe run (default: 6)")
    g.add_argument("--jobs", type=int, default=1,
                   help="rows trained at the same time, each in its own process with --threads threads; "
                        "models are still evaluated one at a time (default: 1)")
    g.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g.add_argument("--resume", action="store_true", help="continue a --out: reuse finished rows with the same config")
    g.add_argument("--no-plain", dest="plain_row", action="store_false",
                   help="skip the plain LoRA row (then there is no step-time reference)")
    g.add_argument("--keep-adapters", action="store_true", help="keep each row's LoRA adapter (and exported model)")
    g.add_argument("--patterns", type=_list(str), default=["structured"],
                   help="comma list of structured, N:M (e.g. 2:4), unstructured (uses --sparsity, default 0.5); "
                        "element patterns add rows for --element-criteria (default: structured)")
    g.add_argument("--element-criteria", type=_list(str), default=["lora", "magnitude", "wanda"],
                   help="criteria of the element-pattern rows: lora runs each --schedules, magnitude and wanda run "
                        "one-shot with the same LoRA recovery (default: lora,magnitude,wanda)")
    g.add_argument("--no-recovery", action="store_true",
                   help="also one-shot element rows without LoRA recovery (--steps 0)")
    g.add_argument("--speed", action="store_true",
                   help="export every row and measure the CPU prefill/decode speed of every exported model")
    add_config_flags(p.add_argument_group("prune flags passed to every row"), skip=OWN)
    p.set_defaults(func=run)


def options_from_args(args):
    from ..bench.options import BenchOptions
    from ..bench.recipes import load_recipes

    flags = given_flags(args, skip=OWN)
    model = flags.pop("model", None)
    return BenchOptions(out=args.out, model=model, ratios=args.ratios, criteria=args.criteria,
                        schedules=args.schedules, prune_flags=flags, evals=args.eval, eval_ctx=args.eval_ctx,
                        eval_windows=args.eval_windows, zero_shot=args.zero_shot,
                        zero_shot_limit=args.zero_shot_limit, plain_row=args.plain_row, overwrite=args.overwrite,
                        resume=args.resume, keep_adapters=args.keep_adapters, threads=flags.get("threads", 0),
                        patterns=args.patterns, element_criteria=args.element_criteria, no_recovery=args.no_recovery,
                        speed=args.speed, recipes=load_recipes(args.recipes) if args.recipes else [],
                        time_budget=args.time_budget, probe_steps=args.probe_steps,
                        zero_shot_sample=args.zero_shot_sample, jobs=args.jobs,
                        zero_shot_batch_size=args.zero_shot_batch_size)


def run(args) -> int:
    from ..bench.grid import run_bench
    from ..bench.table import render_markdown

    opts = options_from_args(args)
    t0 = time.time()

    def event(kind, *a):
        el = f"[{time.time() - t0:7.1f}s]"
        if kind == "phase":
            print(f"{el} {a[0]}", file=sys.stderr, flush=True)
        elif kind == "row_start":
            k, n, row = a
            print(f"{el} row {k}/{n}: {row.id} (loraprune prune subprocess)", file=sys.stderr, flush=True)
        elif kind == "row_done":
            k, n, rec = a
            if rec["status"] != "ok":
                print(f"{el} row {k}/{n}: {rec['id']} FAILED: {rec['error']}", file=sys.stderr, flush=True)
            else:
                ppl = ", ".join(f"{name} {v['ppl']:.2f}" for name, v in rec["eval"].items() if "ppl" in v)
                print(f"{el} row {k}/{n}: {rec['id']} done: {ppl}; peak {rec['peak_rss_mb']:.0f} MB, "
                      + (f"{rec['mean_step_s']:.2f} s/step" if rec["mean_step_s"] else "no training steps"),
                      file=sys.stderr, flush=True)

    cmd = ["loraprune", "bench", *sys.argv[2:]] if len(sys.argv) > 1 and sys.argv[1] == "bench" else None
    doc = run_bench(opts, command=cmd, on_event=event)
    print(render_markdown(doc))
    print(f"wrote {opts.out}/results.json, results.md, ppl_vs_ratio.png")
    failed = [r["id"] for r in doc["rows"] if r["status"] != "ok"]
    if failed:
        print(f"loraprune: {len(failed)} row(s) failed: {', '.join(failed)}; see {opts.out}/logs/", file=sys.stderr)
        return 1
    return 0
