"""The element-sparsity part of `loraprune bench`: CPU speed of exported rows and the table's extra
columns (grid.py and table.py call these; the rows themselves are bench/options.py; see docs/sparsity.md).

`--patterns structured,2:4,unstructured` adds, for each element pattern, rows for the element criteria
(`--element-criteria`, default lora,magnitude,wanda): `lora` with each of `--schedules`, the baselines
magnitude and wanda one-shot (as in their papers) with the bench's LoRA recovery budget, and with
`--no-recovery` also one-shot without any fine-tuning (--steps 0). Element rows prune no units
(ratio 0); unstructured rows use `--sparsity` (default 0.5).

`--speed` exports every row (merged, sliced, exact zeros) and measures the CPU speed of every exported
model against the dense one with speed.run_speed (interleaved trials in one process). Exported
element-sparse models keep dense shapes: CPU kernels do not skip zeros, so expect ~1.0x; only
structured rows are smaller.
"""
from __future__ import annotations

from pathlib import Path

SPEED = {"ctx": 256, "new_tokens": 32, "repeats": 3, "warmup": 1}


def measure_speed(doc: dict, out: Path, opts) -> None:
    """Prefill/decode tokens/s of the dense model and every exported row, interleaved in one process;
    the rows' exported weights are deleted afterwards unless keep_adapters."""
    from ..models import resolve_model_path
    from .speed import SpeedSettings, run_speed

    rows = [r for r in doc["rows"] if r["status"] == "ok" and (out / r["run_dir"] / "config.json").is_file()]
    paths = [resolve_model_path(opts.model)] + [str(out / r["run_dir"]) for r in rows]
    labels = ["dense"] + [r["id"] for r in rows]
    res = run_speed(paths, labels, SpeedSettings(**SPEED, dtype="fp32", device="cpu", memory=False,
                                                 threads=opts.threads or None))
    by_label = {m["label"]: m for m in res["models"]}
    doc["speed"] = {"setup": res["setup"], "dense": _speed(by_label["dense"])}
    for r in rows:
        r["speed"] = _speed(by_label[r["id"]])
        if not opts.keep_adapters:
            for f in (out / r["run_dir"]).glob("*.safetensors"):
                if f.name != "element_masks.safetensors":
                    f.unlink()


def _speed(m: dict) -> dict:
    keys = ("params", "prefill_tok_s_median", "decode_tok_s_median", "speedup_prefill_median",
            "speedup_decode_median")
    return {k: m[k] for k in keys}


def table_columns(doc: dict) -> bool:
    """Whether the bench table needs the sparsity columns."""
    return any(r.get("pattern", "structured") != "structured" for r in doc["rows"]) or bool(doc.get("speed"))


def cells(doc: dict, r: dict | None) -> list[str]:
    """The extra cells of one row (None: the dense row): pattern, nonzero params, CPU speed."""
    sp = (doc.get("speed") or {})
    if r is None:
        d = sp.get("dense")
        return ["-", "100%", _speed_cell(d, dense=True)]
    kept = r.get("nonzero_params", r.get("params_pruned"))
    nz = f"{kept / 1e6:.4g}M ({100 * kept / r['params_dense']:.1f}%)" if kept else "n/a"
    pat = "-" if r.get("plain_lora") else r.get("pattern", "structured")
    if r.get("recovery_steps") == 0:
        pat += ", no recovery"
    return [pat, nz, _speed_cell(r.get("speed"))]


def _speed_cell(s: dict | None, dense: bool = False) -> str:
    if not s:
        return "n/a"
    if dense:
        return f"{s['prefill_tok_s_median']:,.0f} / {s['decode_tok_s_median']:,.1f} tok/s"
    return f"{s['speedup_prefill_median']:.2f}x / {s['speedup_decode_median']:.2f}x"


def speed_note(doc: dict) -> str:
    s = (doc.get("speed") or {}).get("setup")
    if not s:
        return ""
    return (f"- CPU speed (prefill / decode, median of {s['repeats']} interleaved repeats after {s['warmup']} "
            f"warm-up; dense row in tokens/s, others as speed-up): prefill {s['ctx']} tokens then "
            f"{s['new_tokens']} greedy decode steps, batch 1, KV cache, fp32, {s['threads']} threads, "
            f"{s['cpu']}; torch {s['torch']}. Element-sparse exports are dense tensors with zeros: CPU "
            "matmuls do not skip zeros. Nonzero params: exported parameters minus the weights the element "
            "masks zero (`loraprune verify-sparsity` measures them on the files). Bold: lowest first-listed "
            "perplexity among rows of the same ratio and pattern.")

