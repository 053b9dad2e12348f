"""`loraprune bench-speed DENSE_DIR PRUNED_DIR [...]`: prefill/decode throughput and peak memory, side by side."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("bench-speed", help="compare inference speed and memory of dense and pruned models",
                       description="In one process, interleaved and repeated: prefill tokens/s at --ctx and greedy "
                                   "decode tokens/s with KV cache, for each model directory (the first is the "
                                   "reference); peak memory per model; min and median over repeats.")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="dense model first, then pruned exports")
    p.add_argument("--label", action="append", help="name of each model in the table (repeat, in order)")
    p.add_argument("--ctx", type=int, default=512, help="prefill length in tokens (default: 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per trial (default: 64)")
    p.add_argument("--repeats", type=int, default=5, help="measured trials per model (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured trials per model first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default; say it)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="compute dtype (default: fp32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default=None,
                   help="attention implementation (default: what transformers picks, sdpa)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the per-model peak-RSS probe processes (CPU)")
    p.add_argument("--json", dest="json_out", help="write the full result (with every timing) to this file")
    p.add_argument("--md", dest="md_out", help="write the markdown table to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import resolve_model_path
    from ..bench.speed import SpeedSettings, render_markdown, run_speed

    if len(args.models) < 2:
        raise UserError("give a dense model directory and at least one pruned one")
    paths = [resolve_model_path(m) for m in args.models]
    for out in (args.json_out, args.md_out):
        if out and not Path(out).expanduser().parent.is_dir():
            raise UserError(f"cannot write {out}: its directory does not exist")

    def progress(r, label, p, d):
        phase = "warm-up" if r < args.warmup else f"repeat {r - args.warmup + 1}/{args.repeats}"
        print(f"{phase:>12}  {label:<24} prefill {p:7.3f} s  decode {d:7.3f} s", file=sys.stderr, flush=True)

    settings = SpeedSettings(ctx=args.ctx, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                             dtype=args.dtype, device=args.device, attn=args.attn, memory=args.memory,
                             threads=args.threads)
    result = run_speed(paths, args.label, settings, progress=progress)
    md = render_markdown(result)
    print(md)
    if args.json_out:
        Path(args.json_out).expanduser().write_text(json.dumps(result, indent=2) + "\n")
    if args.md_out:
        Path(args.md_out).expanduser().write_text(md)
    return 0
