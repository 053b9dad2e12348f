"""Element-level sparsity patterns (N:M and unstructured) and the element mask set.

Vocabulary (see docs/sparsity.md):
  pattern      `structured` (units only, `--ratio`), `N:M` (N of every M consecutive weights along
               the input dimension of a weight [out, in] are zero; 2:4 is NVIDIA's semi-structured
               pattern) or `unstructured` (a fraction `--sparsity` of each projection's weights zero).
  element mask one bool tensor per LoRA-targeted projection, the shape of its weight [out, in]
               (True = the weight is kept). Entries in rows/columns that structured pruning removes
               are left True and never counted: the pattern is defined on the weights that survive
               slicing, i.e. N:M blocks are M consecutive *kept* input columns.

`ElementMasks` is the hand-off between finding masks and exporting, like `masks.MaskSet`: it
serialises to `element_masks.safetensors` (bool tensors named `layers.{i}.{proj}`, metadata JSON in
the safetensors header) plus a readable summary `element_masks.json`.

Selection is monotone: weights pruned at an earlier update are preferred when choosing the ones to
prune now (ties among them by score), so in a pure N:M or unstructured run the mask only shrinks.
When structured pruning in the same run removes columns, N:M blocks are re-formed over the kept
columns and a few element decisions may change; the last update is made after the last structured
one, so the final pattern is exact either way.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import ATTN, MLP, layer_modules
from .errors import UserError

FORMAT = "loraprune-element-masks"
FORMAT_VERSION = 1
PROJ_PATH = {**{n: f"self_attn.{n}" for n in ATTN}, **{n: f"mlp.{n}" for n in MLP}}


def n_removed(frac: float, n: int) -> int:
    """How many of n are removed at fraction frac: round half up (as masks.n_removed)."""
    return int(math.floor(frac * n + 0.5))


@dataclass(frozen=True)
class Pattern:
    kind: str            # "structured" | "nm" | "unstructured"
    n: int = 0           # N:M: zeros per block
    m: int = 0           # N:M: block length along the input dimension
    sparsity: float = 0.0  # fraction of the (surviving) weights that are zero

    @property
    def element(self) -> bool:
        return self.kind != "structured"

    @property
    def text(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return self.kind

    def label(self) -> str:
        if self.kind == "unstructured":
            return f"unstructured {100 * self.sparsity:g}%"
        return self.text

    def to_dict(self) -> dict:
        d = {"pattern": self.text, "kind": self.kind, "sparsity": self.sparsity}
        if self.kind == "nm":
            d.update(n=self.n, m=self.m, axis="in")
        return d


def parse_pattern(text: str, sparsity: float | None = None) -> Pattern:
    """`structured`, `N:M` (1 <= N < M) or `unstructured` (needs sparsity in (0, 1))."""
    t = (text or "").strip().lower()
    if t == "structured":
        return Pattern("structured")
    if t == "unstructured":
        if sparsity is None or not 0.0 < sparsity < 1.0:
            raise UserError(f"--pattern unstructured needs --sparsity in (0, 1), got {sparsity}")
        return Pattern("unstructured", sparsity=float(sparsity))
    mt = re.fullmatch(r"(\d+):(\d+)", t)
    if not mt:
        raise UserError(f"--pattern {text!r}: use structured, N:M (e.g. 2:4) or unstructured")
    n, m = int(mt.group(1)), int(mt.group(2))
    if not 1 <= n < m:
        raise UserError(f"--pattern {text}: N:M needs 1 <= N < M (N zeros in every block of M weights)")
    return Pattern("nm", n=n, m=m, sparsity=n / m)


# ---- selection (pure functions) -------------------------------------------------------------------
def lowest(score: torch.Tensor, k: int, prefer: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """Bool mask of the k lowest entries along `dim`; entries where `prefer` is True come first
    (among themselves and among the others by score; ties by position)."""
    idx = torch.argsort(score, dim=dim, stable=True)
    if prefer is not None:
        p = torch.gather(prefer, dim, idx)
        idx = torch.gather(idx, dim, torch.argsort((~p).to(torch.int8), dim=dim, stable=True))
    out = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    out.scatter_(dim, idx.narrow(dim, 0, k), True)
    return out


def k_lowest(x: torch.Tensor, k: int) -> torch.Tensor:
    """`lowest(x, k)` along the last dim without sorting (kthvalue; ties by position): O(n)."""
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k >= x.shape[-1]:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    t = x.kthvalue(k, dim=-1, keepdim=True).values
    lt, eq = x < t, x == t
    need = k - lt.sum(-1, keepdim=True)
    return lt | (eq & (eq.cumsum(-1) <= need))


def _lowest_flat(x: torch.Tensor, k: int, prefer: torch.Tensor | None) -> torch.Tensor:
    """`lowest(x, k, prefer)` for 1-D x, in O(n) (kthvalue) instead of a sort."""
    if prefer is None or not bool(prefer.any()):
        return k_lowest(x, k)
    n_pref = int(prefer.sum())
    if n_pref >= k:  # only previously pruned entries are chosen: the k lowest of them
        return k_lowest(x.masked_fill(~prefer, float("inf")), k) & prefer
    return prefer | (k_lowest(x.masked_fill(prefer, float("inf")), k - n_pref) & ~prefer)


def _sub(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, rows).index_select(1, cols)


def _index(mask: torch.Tensor | None, n: int, device="cpu") -> torch.Tensor:
    return torch.arange(n, device=device) if mask is None else mask.to(device).nonzero().flatten()


def prune_selection(scores: torch.Tensor, pattern: Pattern, frac: float, *, keep: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                    group: str = "module") -> torch.Tensor:
    """The new keep mask [out, in] of one projection at `frac` (0..1) of its final pattern.

    scores [out, in]: higher = more important. keep: the current mask (pruned entries are preferred
    to stay pruned). rows [out] / cols [in]: bool, the rows/columns structured pruning keeps (None:
    all); only the sub-matrix rows x cols is pruned. group: for unstructured, `module` ranks all
    weights of the projection together, `row` ranks each output row separately (Wanda).
    N:M at frac: round_half_up(frac * N) zeros in every block of M consecutive kept columns."""
    out_f, in_f = scores.shape
    dev = scores.device
    r, c = _index(rows, out_f, dev), _index(cols, in_f, dev)
    new = torch.ones(out_f, in_f, dtype=torch.bool, device=dev) if keep is None else keep.to(dev, copy=True)
    if r.numel() == 0 or c.numel() == 0:
        return new
    whole = rows is None and cols is None
    sub = scores.float() if whole else _sub(scores.float(), r, c)      # [R, C]
    pruned_now = None if keep is None else ~(keep.to(dev) if whole else _sub(keep.to(dev), r, c))
    if pruned_now is not None and not bool(pruned_now.any()):
        pruned_now = None
    R, C = sub.shape
    if pattern.kind == "nm":
        if C % pattern.m:
            raise ValueError(f"{C} kept input columns are not a multiple of M={pattern.m}")
        k = n_removed(frac, pattern.n)
        blocks = sub.reshape(R, C // pattern.m, pattern.m)
        pref = None if pruned_now is None else pruned_now.reshape(R, C // pattern.m, pattern.m)
        drop = lowest(blocks, k, pref, dim=-1).view(R, C)
    elif pattern.kind == "unstructured":
        level = frac * pattern.sparsity
        if group == "row":
            k = n_removed(level, C)
            drop = k_lowest(sub, k) if pruned_now is None else lowest(sub, k, pruned_now, dim=-1)
        elif group == "module":
            flat_pref = None if pruned_now is None else pruned_now.reshape(-1)
            drop = _lowest_flat(sub.reshape(-1), n_removed(level, R * C), flat_pref).view(R, C)
        else:
            raise ValueError(f"unknown group {group!r}")
    else:
        raise ValueError(f"pattern {pattern.text} has no element level")
    if whole:
        return ~drop
    new[r[:, None], c[None, :]] = ~drop
    return new


# ---- structure of a projection under the unit masks ----------------------------------------------
def structural_keep(unit_masks, i: int, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kept rows [out] or None, kept columns [in] or None) of projection `name` of layer i under
    the structured MaskSet (None = no MaskSet / nothing removed on that side)."""
    if unit_masks is None:
        return None, None
    s, m = unit_masks.spec.layers[i], unit_masks.layers[i]
    heads = m.heads.repeat_interleave(s.head_dim)
    if name == "q_proj":
        return heads, None
    if name in ("k_proj", "v_proj"):
        return m.kv.repeat_interleave(s.head_dim), None
    if name == "o_proj":
        return None, heads
    if name in ("gate_proj", "up_proj"):
        return m.ffn, None
    if name == "down_proj":
        return None, m.ffn
    raise KeyError(name)


# ---- the mask set -------------------------------------------------------------------------------
def key_name(i: int, name: str) -> str:
    return f"layers.{i}.{name}"


def parse_key(key: str) -> tuple[int, str]:
    _, i, name = key.split(".")
    return int(i), name


class ElementMasks:
    """Keep masks [out, in] (bool) for every LoRA-targeted projection of every decoder layer.
    Tensors are updated in place (the masked LoRA forward holds them)."""

    def __init__(self, pattern: Pattern, shapes: dict[tuple[int, str], tuple[int, int]], group: str = "module"):
        if not pattern.element:
            raise ValueError("ElementMasks needs an N:M or unstructured pattern")
        self.pattern, self.group = pattern, group
        self.keep = {k: torch.ones(*shp, dtype=torch.bool) for k, shp in sorted(shapes.items())}

    @classmethod
    def for_model(cls, model, num_layers: int, pattern: Pattern, group: str = "module") -> "ElementMasks":
        shapes = {}
        for i in range(num_layers):
            for name, mod in layer_modules(model, i).items():
                w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
                shapes[(i, name)] = tuple(w.shape)
                device = w.device
        em = cls(pattern, shapes, group)
        if num_layers and device.type != "cpu":  # masks live where the weights are (read every forward)
            em.keep = {k: v.to(device) for k, v in em.keep.items()}
        return em

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
            sub = _sub(k, _index(rows, k.shape[0], k.device), _index(cols, k.shape[1], k.device))
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
            key = f"{layer_prefix}.{PROJ_PATH[name]}.weight"
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
