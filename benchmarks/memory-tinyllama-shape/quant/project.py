"""Projected peak memory of one LoRA importance step for larger LLaMA-family models, from the per-
parameter costs measured on the TinyLlama-1.1B shape (memory.json next to this file, malloc `mmap`).
A PROJECTION, not a measurement:

    peak(model) = fixed + body_params * body_bytes_per_param + embed_params * embed_bytes
                  + step_extra * (layers * hidden) / (22 * 2048)

fixed: RSS once the weights are loaded minus the parameters' own bytes (Python, torch, bitsandbytes,
allocator; does not grow with the model); body_bytes_per_param: the measured case's parameter bytes
of the decoder layers per weight (int8: 1 + a per-row scale, nf4: 0.5 + block scales); embed_bytes: 4
(fp32 embeddings and head, as measured; 2 for bf16); step_extra: lora peak - weights RSS (activations
with gradient checkpointing at batch 1 x 512, dequantized per-layer buffers), scaled with
layers x hidden; for taylor it is the base-weight gradients and scales with the body.

    python benchmarks/memory-tinyllama-shape/quant/project.py
"""
import json
from pathlib import Path

TINY = dict(layers=22, hidden=2048, inter=5632, heads=32, kv=4, vocab=32000, tied=False)
MODELS = {  # public configs
    "Llama-2-7B": dict(layers=32, hidden=4096, inter=11008, heads=32, kv=32, vocab=32000, tied=False),
    "Llama-3-8B": dict(layers=32, hidden=4096, inter=14336, heads=32, kv=8, vocab=128256, tied=False),
    "Llama-3-70B": dict(layers=80, hidden=8192, inter=28672, heads=64, kv=8, vocab=128256, tied=False),
}


def counts(c):
    hd = c["hidden"] // c["heads"]
    layer = 2 * c["hidden"] * c["hidden"] + 2 * c["hidden"] * c["kv"] * hd + 3 * c["hidden"] * c["inter"]
    embed = c["vocab"] * c["hidden"] * (1 if c["tied"] else 2)
    return layer * c["layers"], embed


def main():
    doc = json.loads((Path(__file__).parent / "memory.json").read_text())
    rows = {(s["dtype"], s["mode"]): s for s in doc["summary"] if s["malloc"] == "mmap"}
    body, embed = counts(TINY)
    gb = 1024 ** 3
    print(f"measured on TinyLlama-1.1B shape: body {body / 1e9:.3f}B params, embeddings+head {embed / 1e9:.3f}B\n")
    cases = [("fp32", "taylor"), ("fp32", "lora"), ("bf16", "lora"), ("int8", "lora"), ("nf4", "lora")]
    cost = {}
    for dt, mode in cases:
        s, inf = rows[(dt, mode)], rows[(dt, "inference")]
        emb_bytes = embed * (2 if dt == "bf16" else 4)
        per_param = (inf["param_bytes"] - emb_bytes) / body
        runtime = inf["rss_weights_mb"] * 2 ** 20 - inf["param_bytes"]   # fixed
        extra = (s["peak_rss_mb"] - s["rss_weights_mb"]) * 2 ** 20
        cost[(dt, mode)] = (runtime, per_param, emb_bytes / embed, extra)
        print(f"{dt:>5} {mode:<7} fixed {runtime / gb:.2f} GB, body {per_param:.2f} B/param, step extra {extra / gb:.2f} GB, "
              f"measured peak {s['peak_rss_mb'] / 1024:.2f} GB")
    print("\n| model | " + " | ".join(f"{m} {d}" for d, m in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for name, c in MODELS.items():
        b, e = counts(c)
        scale = c["layers"] * c["hidden"] / (TINY["layers"] * TINY["hidden"])
        cells = []
        for k in cases:
            runtime, per_param, per_embed, extra = cost[k]
            if k[1] == "taylor":  # base-weight gradients scale with the body, not with activations
                extra_k = extra * b / body
            else:
                extra_k = extra * scale
            cells.append(f"{(runtime + b * per_param + e * per_embed + extra_k) / gb:.0f} GB")
        print(f"| {name} ({(b + e) / 1e9:.1f}B) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
