"""`loraprune bench-memory`: peak memory of ONE importance-estimation step per criterion.

A case = (mode, dtype, gradient checkpointing). Modes:
  inference    forward only under no_grad on the plain model (no LoRA): the floor
  lora         LoRA attached; forward + backward (only LoRA weights require grad) + LoRA-guided scores
  mask-taylor  LoRA attached; forward + backward (LoRA weights and mask gates) + gate-gradient scores
  taylor       LoRA attached; forward + backward with requires_grad on the frozen weights of every
               pruned layer's seven projections + |W' * dL/dW| scores (LLM-Pruner's vanilla criterion)
Each case runs in its own fresh subprocess (bench/memory_probe.py; peak RSS = VmHWM of that process
image, loraprune/sysmem.py, so cases never mix), on a model built in-process with random weights:
memory does not depend on the values.
The model is created on the meta device and materialised with `to_empty` in the target dtype, then
filled uniformly (no fp32 copy of a bf16 model ever exists, no slow init). bf16 means bf16 weights and
bf16 compute (LoRA weights stay fp32 as peft keeps them; the lora criterion upcasts one module at a time).

Besides RSS, each case reports torch-side accounting (CPU torch keeps no allocator statistics; on CUDA
the allocator's peak is reported too): bytes of parameters, of gradients present after backward,
of tensors saved for backward outside recomputed regions (saved_tensors_hooks, unique storages,
parameters excluded), and of the logits.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

MODES = ("inference", "lora", "mask-taylor", "taylor")
SHAPES = {
    # TinyLlama-1.1B's shape (LLaMA, GQA 32 query / 4 KV heads)
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                           tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=96, vocab_size=320, max_position_embeddings=512, tie_word_embeddings=False),
}
DTYPES = ("fp32", "bf16")
QUANT_DTYPES = ("int8", "nf4")   # a bitsandbytes-quantized base, loaded from a saved random checkpoint
MALLOC_ENV = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


@dataclass
class Case:
    mode: str
    dtype: str = "fp32"
    checkpointing: bool = False
    shape: str = "tinyllama-1.1b"
    batch: int = 1
    seq: int = 512
    lora_r: int = 8
    threads: int = 0
    seed: int = 0
    malloc: str = "default"  # "mmap": glibc returns every freed block over 128 KiB to the OS at once
    checkpoint: str | None = None  # int8 / nf4: the random checkpoint of `shape` to load quantized


# ---- driver: one subprocess per case, repeated -------------------------------------------------

def run_case(case: Case, timeout: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "loraprune.bench.memory_probe", json.dumps(asdict(case))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.update(MALLOC_ENV.get(case.malloc, {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"case": asdict(case), "error": f"exit {p.returncode}: {tail}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def plan(base: Case, modes, dtypes, checkpointing, mallocs=("default",)) -> list[Case]:
    """Every (malloc, dtype, mode, checkpointing) case of `base`'s shape, batch, seq and threads;
    inference runs without checkpointing only."""
    cases = []
    for ma in mallocs:
        for dt in dtypes:
            for mode in modes:
                if mode == "taylor" and dt in QUANT_DTYPES:
                    continue  # a quantized base has no weight gradients
                for ck in ([False] if mode == "inference" else checkpointing):
                    cases.append(replace(base, mode=mode, dtype=dt, checkpointing=ck, malloc=ma))
    return cases


def ensure_checkpoint(shape: str, root: Path) -> Path:
    """A random checkpoint of `shape` (bf16 weights, saved once) for the quantized cases; built in a
    subprocess so this driver never holds the model."""
    path = Path(root) / f"random-{shape}-bf16"
    if not (path / "config.json").is_file():
        code = ("import sys; from loraprune.bench.memory_probe import save_random_checkpoint; "
                "save_random_checkpoint(sys.argv[1], sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, shape, str(path)], check=True)
    return path


def run_all(cases: list[Case], repeats: int, on_result=None) -> list[dict]:
    """Cases interleaved across repeats (case1..caseN, then again), so drifting background load
    affects every case alike."""
    results = []
    for rep in range(repeats):
        for case in cases:
            r = run_case(case)
            r["repeat"] = rep
            results.append(r)
            if on_result:
                on_result(r)
    return results


def summarize(results: list[dict]) -> list[dict]:
    """One row per case: mean / min / max peak RSS over repeats, ratios to taylor and inference."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["case"]
        groups.setdefault((c.get("malloc", "default"), c["dtype"], c["checkpointing"], c["mode"]), []).append(r)
    rows = []
    for (ma, dt, ck, mode), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        peaks = [r["peak_rss_mb"] for r in ok]
        row = {"malloc": ma, "dtype": dt, "checkpointing": ck, "mode": mode, "repeats": len(ok),
               "errors": [r["error"] for r in rs if "error" in r]}
        if ok:
            row.update(peak_rss_mb=statistics.mean(peaks), peak_min_mb=min(peaks), peak_max_mb=max(peaks),
                       rss_weights_mb=statistics.mean(r["rss_weights_mb"] for r in ok),
                       rss_start_mb=statistics.mean(r["rss_start_mb"] for r in ok),
                       step_s=statistics.mean(r["step_s"] for r in ok))
            for k in ("param_bytes", "grad_bytes", "base_grad_bytes", "saved_for_backward_bytes", "logits_bytes",
                      "peak_after_forward_mb", "peak_after_backward_mb", "score_s", "cuda_max_allocated_mb"):
                vals = [r[k] for r in ok if k in r]
                if vals:
                    row[k] = statistics.mean(vals)
        rows.append(row)
    by = {(r["malloc"], r["dtype"], r["checkpointing"], r["mode"]): r for r in rows}
    for r in rows:  # a quantized base is compared with taylor on fp32 (the only taylor it could replace)
        t = by.get((r["malloc"], "fp32" if r["dtype"] in QUANT_DTYPES else r["dtype"], r["checkpointing"], "taylor"))
        inf = by.get((r["malloc"], r["dtype"], False, "inference"))
        # raw peaks, and peaks above the process's start (Python + torch imports: what a GPU number omits)
        for key, ref in (("vs_taylor", t), ("vs_inference", inf)):
            if "peak_rss_mb" in r and ref and "peak_rss_mb" in ref:
                r[key] = r["peak_rss_mb"] / ref["peak_rss_mb"]
                r[key + "_above_start"] = ((r["peak_rss_mb"] - r["rss_start_mb"])
                                           / (ref["peak_rss_mb"] - ref["rss_start_mb"]))
    return rows


def render_markdown(rows: list[dict], meta: dict) -> str:
    c = meta
    lines = [f"# Memory of one importance-estimation step: {c['shape']}, batch {c['batch']} x seq {c['seq']}",
             "",
             f"Peak RSS of a fresh process per case (mean of {c['repeats']} runs; min-max in brackets), "
             f"{c['threads']} torch threads, LoRA r={c.get('lora_r', 8)} on q,k,v,o,gate,up,down, "
             f"{c.get('prunable', '?')} of {c.get('layers', '?')} layers pruned/scored (prune's default skip). "
             "Ratios divide peak RSS; in brackets: peak RSS minus the process's RSS before the model existed "
             "(Python + torch imports, ~0.4 GB), closer to what a GPU allocator reports.", "",
             "malloc `default`: glibc as configured (its dynamic mmap threshold keeps freed activation buffers "
             "in the heap); `mmap`: MALLOC_MMAP_THRESHOLD_=131072, every freed block over 128 KiB goes back "
             "to the OS at once, so RSS follows the live tensors.", "",
             "| malloc | dtype | grad ckpt | mode | peak RSS (GB) | weights RSS (GB) | vs taylor | vs inference | "
             "grads (GB) | saved for bwd (GB) | step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODES)}
    for r in sorted(rows, key=lambda r: (r["malloc"], r["dtype"], r["checkpointing"], order.get(r["mode"], 9))):
        if "peak_rss_mb" not in r:
            lines.append(f"| {r['malloc']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | {r['mode']} | "
                         f"FAILED: {'; '.join(r['errors'])[:80]} | | | | | | |")
            continue
        gb = lambda x: "" if x is None else f"{x / 1024:.2f}"  # noqa: E731  (MB -> GB)
        gbb = lambda x: "" if x is None else f"{x / 2**30:.2f}"  # noqa: E731  (bytes -> GB)
        lines.append(
            f"| {r['malloc']} | {r['dtype']} "
            f"| {'-' if r['mode'] == 'inference' else ('on' if r['checkpointing'] else 'off')} "
            f"| {r['mode']} | {gb(r['peak_rss_mb'])} [{gb(r['peak_min_mb'])}-{gb(r['peak_max_mb'])}] "
            f"| {gb(r['rss_weights_mb'])} | {_x(r, 'vs_taylor')} | {_x(r, 'vs_inference')} "
            f"| {gbb(r.get('grad_bytes'))} | {gbb(r.get('saved_for_backward_bytes'))} | {r['step_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _x(r, key):
    v, w = r.get(key), r.get(key + "_above_start")
    return "" if v is None else f"{v:.2f}x ({w:.2f}x)"
