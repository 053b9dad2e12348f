"""`loraprune verify-sparsity MODEL_DIR`: check every block of an element-sparse export."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("verify-sparsity", help="check that an exported model satisfies its N:M / unstructured pattern",
                       description="Read the weights of MODEL_DIR (safetensors) and check every block of M (N:M) or "
                                   "every projection / row (unstructured) against config.json's loraprune_sparsity "
                                   "entry, or against --pattern. Prints the measured sparsity. Exit 0 when the "
                                   "pattern holds, 1 when it does not, 2 for bad input.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--pattern", default=None, help="check this pattern instead (N:M or unstructured)")
    p.add_argument("--sparsity", type=float, default=None, help="with --pattern unstructured: the fraction")
    p.add_argument("--group", choices=("module", "row"), default=None,
                   help="unstructured: count zeros per projection (module) or per output row (row)")
    p.add_argument("--json", dest="json_out", help="write the full result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export.verify import render, verify_sparsity

    if args.json_out and not Path(args.json_out).expanduser().parent.is_dir():
        raise UserError(f"cannot write {args.json_out}: its directory does not exist")
    res = verify_sparsity(args.model_dir, args.pattern, args.sparsity, args.group)
    print(render(res), end="")
    if args.json_out:
        Path(args.json_out).expanduser().write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["ok"] else 1
