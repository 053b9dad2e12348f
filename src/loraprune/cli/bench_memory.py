"""`loraprune bench-memory`: peak memory of one importance-estimation step (see loraprune/bench/memory.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import UserError


def _list(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def register(sub) -> None:
    from ..bench.memory import MODES, SHAPES

    p = sub.add_parser(
        "bench-memory", help="peak memory of one scoring step: lora vs mask-taylor vs taylor vs inference",
        description="Build a model of the given shape with random weights in a fresh subprocess per case, run ONE "
                    "forward + backward + scoring step (or a forward-only inference step) and record peak RSS. "
                    "Prints ratios to taylor and to inference.")
    p.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES),
                   help="model shape (default: tinyllama-1.1b: hidden 2048, 22 layers, 32/4 heads, FFN 5632)")
    p.add_argument("--modes", type=_list, default=list(MODES), help=f"comma list (default: {','.join(MODES)})")
    p.add_argument("--dtypes", type=_list, default=["fp32", "bf16"],
                   help="comma list of fp32, bf16, int8, nf4 (int8/nf4: a bitsandbytes-quantized base, loaded from a "
                        "random checkpoint saved once under --checkpoint-dir; taylor is skipped for them) "
                        "(default: fp32,bf16)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the random checkpoint of the quantized cases lives (default: loraprune's cache)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                   help="gradient checkpointing for the backward modes (default: both)")
    p.add_argument("--malloc", type=_list, default=["default", "mmap"],
                   help="glibc malloc settings to run under: default, mmap (MALLOC_MMAP_THRESHOLD_=131072: freed "
                        "blocks over 128 KiB go back to the OS at once) (default: both)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per case (default: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--out", help="directory for memory.json and memory.md")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench.memory import (DTYPES, MALLOC_ENV, MODES, QUANT_DTYPES, SHAPES, Case, ensure_checkpoint, plan,
                                render_markdown, run_all, summarize)

    bad = ([m for m in args.modes if m not in MODES] + [d for d in args.dtypes if d not in DTYPES + QUANT_DTYPES]
           + [m for m in args.malloc if m not in MALLOC_ENV])
    if bad or not args.modes or not args.dtypes or not args.malloc:
        raise UserError(f"unknown mode/dtype/malloc {', '.join(bad) or '(none)'}; modes: {', '.join(MODES)}; "
                        f"dtypes: {', '.join(DTYPES + QUANT_DTYPES)}; malloc: {', '.join(MALLOC_ENV)}")
    if args.batch < 1 or args.seq < 2 or args.repeats < 1:
        raise UserError("--batch and --repeats must be >= 1 and --seq >= 2")
    if args.seq > SHAPES[args.shape]["max_position_embeddings"]:
        raise UserError(f"--seq {args.seq} exceeds the {args.shape} context")
    out = Path(args.out) if args.out else None
    if out and out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out} is a file")
    ck = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    ckpt = None
    if any(d in QUANT_DTYPES for d in args.dtypes):
        from ..models import cache_dir

        ckpt = str(ensure_checkpoint(args.shape, Path(args.checkpoint_dir) if args.checkpoint_dir
                                     else cache_dir() / "bench-memory"))
    base = Case("inference", shape=args.shape, batch=args.batch, seq=args.seq, threads=args.threads, checkpoint=ckpt)
    cases = plan(base, args.modes, args.dtypes, ck, args.malloc)
    t0 = time.time()

    def show(r):
        c = r["case"]
        tag = (f"{c['mode']} {c['dtype']} ckpt={'on' if c['checkpointing'] else 'off'} malloc={c['malloc']} "
               f"repeat {r['repeat']}")
        if "error" in r:
            print(f"[{time.time() - t0:7.1f}s] {tag}: FAILED {r['error']}", file=sys.stderr, flush=True)
        else:
            print(f"[{time.time() - t0:7.1f}s] {tag}: peak {r['peak_rss_mb'] / 1024:.2f} GB, step {r['step_s']:.1f} s",
                  file=sys.stderr, flush=True)

    results = run_all(cases, args.repeats, on_result=show)
    rows = summarize(results)
    import torch

    from ..core.arch import parse_layers

    n_layers = SHAPES[args.shape]["num_hidden_layers"]
    meta = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
            "threads": args.threads or torch.get_num_threads(), "layers": n_layers,
            "prunable": n_layers - len(parse_layers("auto", n_layers)), "command": ["loraprune", *sys.argv[1:]]}
    md = render_markdown(rows, meta)
    print(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=2) + "\n")
        (out / "memory.md").write_text(md)
        print(f"wrote {out}/memory.json, memory.md")
    return 1 if any(r["errors"] for r in rows) else 0
