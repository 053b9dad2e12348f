"""The criterion contract (after Torch-Pruning's `Importance(group) -> scores`).

A unit criterion turns what one step left behind (gradients after a backward pass, or activations
recorded by forward hooks) into per-unit scores of one layer:

    layer_scores(model, layer: LayerSpec) -> {"heads": [H], "kv": [KV], "ffn": [I]}   (higher = keep)

`setup(model, spec, masks)` runs once after LoRA and the mask hooks are attached (it may enable
gradients or hooks); `teardown(model)` undoes it when no more scores are needed (idempotent).
`needs_backward` says whether scores come from a backward pass. Scores of a KV head are added to the
scores of its query heads when a whole group is ranked (masks.MaskSet), so `kv` may be zeros.
"""
from __future__ import annotations


class Criterion:
    name = ""
    needs_backward = True

    def setup(self, model, spec, masks) -> None:
        """Once, after LoRA wrapping and mask hooks. Default: nothing to prepare."""

    def teardown(self, model) -> None:
        """When no more scores are needed. Default: nothing to undo."""

    def layer_scores(self, model, layer) -> dict:
        raise NotImplementedError
