"""Element-level sparsity patterns (N:M and unstructured) and the selection of weights to prune.

Vocabulary (see docs/sparsity.md):
  pattern      `structured` (units only, `--ratio`), `N:M` (N of every M consecutive weights along
               the input dimension of a weight [out, in] are zero; 2:4 is NVIDIA's semi-structured
               pattern) or `unstructured` (a fraction `--sparsity` of each projection's weights zero).
Selection is monotone: weights pruned at an earlier update are preferred when choosing the ones to
prune now (ties among them by score), so in a pure N:M or unstructured run the mask only shrinks.
Selecting the weights to prune is core/selection.py; the element masks are core/element_masks.py.
This module imports no torch (the config parses patterns).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

FORMAT_VERSION = 1  # of element_masks.safetensors and config.json's loraprune_sparsity entry


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
