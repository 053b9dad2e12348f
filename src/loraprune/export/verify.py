"""Check that an exported model's weights satisfy its element sparsity pattern, block by block, and
measure the sparsity. Reads safetensors directly (no model is built), so it also checks models that
loraprune did not write (pass the pattern explicitly).

For N:M: every block of M consecutive weights along the input dimension of each projection weight
[out, in] must hold at least N exact zeros. For unstructured: at least round_half_up(s * size)
zeros per projection (group `module`) or round_half_up(s * in) per output row (group `row`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.arch import WEIGHT_KEY
from ..core.selection import n_removed
from ..core.patterns import parse_pattern
from ..errors import UserError


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    # model*.safetensors only: a prune run directory also holds element_masks.safetensors
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors weights in {model_dir}")
    return files


def check_weight(w: torch.Tensor, pattern, group: str = "module") -> dict:
    """{zeros, size, ok, bad} of one weight [out, in] against the pattern (bad: violating blocks/rows)."""
    zero = w == 0
    out_f, in_f = w.shape
    rec = {"zeros": int(zero.sum()), "size": w.numel(), "shape": [out_f, in_f]}
    if pattern.kind == "nm":
        if in_f % pattern.m:
            rec.update(ok=False, bad=-1, why=f"input dimension {in_f} is not a multiple of {pattern.m}")
            return rec
        per_block = zero.view(out_f, in_f // pattern.m, pattern.m).sum(-1)
        bad = int((per_block < pattern.n).sum())
        rec.update(ok=bad == 0, bad=bad, min_zeros_per_block=int(per_block.min()))
    elif group == "row":
        need = n_removed(pattern.sparsity, in_f)
        bad = int((zero.sum(1) < need).sum())
        rec.update(ok=bad == 0, bad=bad, need_per_row=need)
    else:
        need = n_removed(pattern.sparsity, w.numel())
        rec.update(ok=rec["zeros"] >= need, bad=0 if rec["zeros"] >= need else 1, need=need)
    return rec


def verify_sparsity(model_dir, pattern: str | None = None, sparsity: float | None = None,
                    group: str | None = None) -> dict:
    """Verify MODEL_DIR against its config.json `loraprune_sparsity` entry (or the given pattern).
    Returns a dict with ok, per-projection measured sparsity, violations and nonzero counts."""
    from safetensors import safe_open

    d = Path(model_dir).expanduser()
    if not (d / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json; pass an exported model directory")
    entry = json.loads((d / "config.json").read_text()).get("loraprune_sparsity")
    if pattern is None:
        if not entry:
            raise UserError(f"{model_dir}/config.json has no loraprune_sparsity entry; pass --pattern to check "
                            "a pattern anyway")
        pattern, sparsity, group = entry["pattern"], entry.get("sparsity"), group or entry.get("group")
        layers, projs = set(entry.get("layers", [])), set(entry.get("projections", []))
    else:
        layers, projs = None, None
    p = parse_pattern(pattern, sparsity)
    if not p.element:
        raise UserError("verify-sparsity checks N:M or unstructured patterns")
    group = group or "module"
    per_proj: dict[str, dict] = {}
    violations, checked, params, nonzero = [], 0, 0, 0
    for f in _weight_files(d):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                w = st.get_tensor(key)
                params += w.numel()
                nonzero += int(torch.count_nonzero(w))
                m = WEIGHT_KEY.search(key)
                if not m or (layers is not None and int(m.group(1)) not in layers) \
                        or (projs is not None and m.group(2) not in projs):
                    continue
                rec = check_weight(w, p, group)
                checked += 1
                acc = per_proj.setdefault(m.group(2), {"zeros": 0, "size": 0, "modules": 0})
                acc["zeros"] += rec["zeros"]
                acc["size"] += rec["size"]
                acc["modules"] += 1
                if not rec["ok"]:
                    violations.append({"weight": key, **rec})
    if checked == 0:
        raise UserError(f"no projection weights (layers.N.self_attn|mlp.*_proj.weight) found in {model_dir}")
    if layers is not None and checked != len(layers) * len(projs):
        violations.append({"weight": "(missing)", "why": f"{checked} of {len(layers) * len(projs)} listed "
                                                         "projection weights found"})
    zeros = sum(v["zeros"] for v in per_proj.values())
    size = sum(v["size"] for v in per_proj.values())
    for v in per_proj.values():
        v["sparsity"] = v["zeros"] / v["size"]
    return {"model_dir": str(d), **p.to_dict(), "group": group, "ok": not violations,
            "modules_checked": checked, "violations": violations[:20], "n_violations": len(violations),
            "zeros": zeros, "size": size, "sparsity_measured": zeros / size,
            "per_projection": dict(sorted(per_proj.items())), "params": params, "nonzero_params": nonzero}


def render(res: dict) -> str:
    lines = [f"{res['model_dir']}: pattern {res['pattern']}"
             + (f" (group {res['group']})" if res["kind"] == "unstructured" else "")
             + f", {res['modules_checked']} projection weights checked: "
             + ("OK" if res["ok"] else f"FAILED ({res['n_violations']} weights violate it)"),
             f"measured sparsity of the checked weights: {100 * res['sparsity_measured']:.3f}% "
             f"({res['zeros']:,} zeros of {res['size']:,})",
             f"whole model: {res['nonzero_params']:,} nonzero of {res['params']:,} stored parameters",
             "", "| projection | weights | zeros | sparsity |", "|---|---|---|---|"]
    for name, v in res["per_projection"].items():
        lines.append(f"| {name} | {v['size']:,} | {v['zeros']:,} | {100 * v['sparsity']:.3f}% |")
    for v in res["violations"][:5]:
        lines.append(f"violation: {v}")
    return "\n".join(lines) + "\n"
