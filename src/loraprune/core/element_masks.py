"""The element mask set: one bool keep mask [out, in] per LoRA-targeted projection.

Entries in rows/columns that structured pruning removes are left True and never counted: the pattern
is defined on the weights that survive slicing, i.e. N:M blocks are M consecutive *kept* input
columns. When structured pruning in the same run removes columns, N:M blocks are re-formed over the
kept columns and a few element decisions may change; the last update is made after the last
structured one, so the final pattern is exact either way.

`ElementMasks` is the hand-off between finding masks and exporting, like `masks.MaskSet`: it
serialises to `element_masks.safetensors` (bool tensors named `layers.{i}.{proj}`, metadata JSON in
the safetensors header) plus a readable summary `element_masks.json`.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError
from .arch import PROJ, key_name, layer_modules, parse_key
from .lora import base_linear
from .patterns import FORMAT_VERSION, Pattern, parse_pattern
from .selection import index_of, prune_selection, submatrix
from .units import owned_mask

FORMAT = "loraprune-element-masks"


def structural_keep(unit_masks, i: int, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kept rows [out] or None, kept columns [in] or None) of projection `name` of layer i under
    the structured MaskSet (None = no MaskSet / nothing removed on that side)."""
    if unit_masks is None:
        return None, None
    p = PROJ[name]
    return owned_mask(unit_masks.unit_mask(i, p.unit), unit_masks.spec.layers[i], name)


class ElementMasks:
    """Keep masks [out, in] (bool) for every LoRA-targeted projection of every decoder layer.
    Tensors are updated in place (the masked LoRA forward holds them)."""

    def __init__(self, pattern: Pattern, shapes: dict[tuple[int, str], tuple[int, int]], group: str = "module"):
        if not pattern.element:
            raise ValueError("ElementMasks needs an N:M or unstructured pattern")
        self.pattern, self.group = pattern, group
        self.bypass = False  # the masked forwards (core/masked_lora.py) read it
        self.keep = {k: torch.ones(*shp, dtype=torch.bool) for k, shp in sorted(shapes.items())}

    @classmethod
    def for_model(cls, model, num_layers: int, pattern: Pattern, group: str = "module") -> "ElementMasks":
        shapes = {}
        for i in range(num_layers):
            for name, mod in layer_modules(model, i).items():
                w = base_linear(mod).weight
                shapes[(i, name)] = tuple(w.shape)
                device = w.device
        em = cls(pattern, shapes, group)
        if num_layers and device.type != "cpu":  # masks live where the weights are (read every forward)
            em.keep = {k: v.to(device) for k, v in em.keep.items()}
        return em

    @contextmanager
    def bypassed(self):
        """Inside: the masked LoRA layers compute their plain base layer (the dense teacher)."""
        old, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = old

    def check_shapes(self, unit_masks=None) -> None:
        """N:M needs every (final) count of kept input columns to be a multiple of M."""
        if self.pattern.kind != "nm":
            return
        for (i, name), k in self.keep.items():
            _, cols = structural_keep(unit_masks, i, name)
            c = k.shape[1] if cols is None else int(cols.sum())
            if c % self.pattern.m:
                raise UserError(f"--pattern {self.pattern.text}: layer {i} {name} has {c} input columns, "
                                f"not a multiple of {self.pattern.m}")

    def update(self, key: tuple[int, str], scores: torch.Tensor, frac: float, unit_masks=None) -> None:
        rows, cols = structural_keep(unit_masks, *key)
        new = prune_selection(scores, self.pattern, frac, keep=self.keep[key], rows=rows, cols=cols,
                              group=self.group)
        self.keep[key].copy_(new)

    # ---- counting -----------------------------------------------------------------------------
    def counts(self, unit_masks=None) -> dict:
        """Zeros and total of the weights that survive slicing, per projection name and overall."""
        per: dict[str, list[int]] = {}
        for (i, name), k in self.keep.items():
            rows, cols = structural_keep(unit_masks, i, name)
            sub = submatrix(k, index_of(rows, k.shape[0], k.device), index_of(cols, k.shape[1], k.device))
            z, t = int((~sub).sum()), sub.numel()
            acc = per.setdefault(name, [0, 0])
            acc[0] += z
            acc[1] += t
        zeros = sum(v[0] for v in per.values())
        total = sum(v[1] for v in per.values())
        return {"zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0,
                "per_projection": {n: {"zeros": z, "total": t, "sparsity": z / t if t else 0.0}
                                   for n, (z, t) in per.items()}}

    def summary(self, unit_masks=None) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **self.pattern.to_dict(), "group": self.group,
                "projections": sorted({n for _, n in self.keep}),
                "layers": sorted({i for i, _ in self.keep}), **self.counts(unit_masks)}

    def config_entry(self) -> dict:
        """`config.json` key `loraprune_sparsity` of an exported model (read by sparse_verify)."""
        return {"format": "loraprune-sparsity", "version": FORMAT_VERSION, **self.pattern.to_dict(),
                "group": self.group, "layers": sorted({i for i, _ in self.keep}),
                "projections": sorted({n for _, n in self.keep}),
                "note": "N:M: at least N zeros in every block of M consecutive weights along the input "
                        "dimension of each listed projection weight [out, in]; unstructured: at least "
                        "round(sparsity * size) zeros per projection (group module) or per row (group row)"}

    # ---- serialisation ------------------------------------------------------------------------
    def save(self, path: Path, unit_masks=None) -> None:
        """`path` (.safetensors) and a readable summary next to it (.json)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "pattern": self.pattern.text,
                "sparsity": repr(self.pattern.sparsity), "group": self.group}
        save_file({key_name(*k): v.cpu().contiguous() for k, v in self.keep.items()}, str(path), metadata=meta)
        path.with_suffix(".json").write_text(json.dumps(self.summary(unit_masks), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ElementMasks":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise UserError(f"cannot read element masks {path}: {err}") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a loraprune element-mask file")
        pattern = parse_pattern(meta["pattern"], float(meta.get("sparsity", "0")))
        em = cls(pattern, {parse_key(k): tuple(v.shape) for k, v in tensors.items()}, meta.get("group", "module"))
        for k, v in tensors.items():
            em.keep[parse_key(k)].copy_(v.bool())
        return em

    def state_dict(self) -> dict:
        return {key_name(*k): v.cpu().clone() for k, v in self.keep.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.keep[parse_key(k)].copy_(v)

    # ---- applying to plain weights -------------------------------------------------------------
    @torch.no_grad()
    def zero_state_dict(self, sd: dict, layer_prefix: str, i: int) -> None:
        """Zero the pruned entries of layer i's projection weights in a (merged, unsliced) state dict;
        `layer_prefix` is the state-dict name of decoder layer i (e.g. `model.layers.3`)."""
        for (li, name), k in self.keep.items():
            if li != i:
                continue
            key = f"{layer_prefix}.{PROJ[name].path}.weight"
            if sd[key].shape != k.shape:
                raise UserError(f"element mask {key_name(li, name)} {tuple(k.shape)} does not match {key} "
                                f"{tuple(sd[key].shape)}")
            sd[key] = sd[key].masked_fill(~k.to(sd[key].device), 0)

    @torch.no_grad()
    def apply_to_model(self, model) -> None:
        """Zero the pruned weights of a plain (merged, not peft-wrapped) model in place."""
        for (i, name), k in self.keep.items():
            mod = layer_modules(model, i)[name]
            if hasattr(mod, "base_layer"):
                raise ValueError("apply_to_model needs a merged model (merge_and_unload first)")
            mod.weight.masked_fill_(~k.to(mod.weight.device), 0)
