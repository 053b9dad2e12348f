"""Build the "floor" model of the speed table: SmolLM2-135M with every layer cut to 1 query head,
1 KV head and 8 FFN channels. What remains of its time is what pruning cannot remove: the
embedding and lm_head (28.3M of the 33.2M parameters), norms, and the per-step Python / transformers
overhead of 30 decoder layers. Quality is irrelevant; this is a measuring stick.

    .venv/bin/python benchmarks/speed/make_floor_model.py runs/speed-minimal
"""
import sys

from loraprune.core.arch import model_spec
from loraprune.export.compact import export_compact
from loraprune.core.masks import MaskSet
from loraprune.models import load_model, load_tokenizer

out = sys.argv[1] if len(sys.argv) > 1 else "runs/speed-minimal"
model = load_model(None)
masks = MaskSet(model_spec(model.config))
for m in masks.layers:
    m.heads[:] = False
    m.heads[0] = True
    m.kv[:] = False
    m.kv[0] = True
    m.ffn[:] = False
    m.ffn[:8] = True
info = export_compact(model, masks, out, tokenizer=load_tokenizer(None))
print(f"wrote {out}: {info['params']:,} parameters ({info['kind']} config)")
