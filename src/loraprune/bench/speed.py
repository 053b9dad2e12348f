"""Inference speed of dense vs pruned checkpoints, measured side by side in one process.

One trial of a model = prefill `ctx` tokens (batch 1, KV cache on, logits of the last position only,
as generate() does) and then `new_tokens` greedy decode steps through the KV cache. Trials are
interleaved across models (model order rotates every repeat) so that machine load drifts hit every
model alike; we report the min and the median over repeats. Peak memory on CPU is the peak RSS of a
fresh process per model (RSS is per process, so it cannot be separated in the shared process); on
CUDA it is torch.cuda.max_memory_allocated in the shared process.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..sysmem import peak_rss_mb


@dataclass
class Bench:
    label: str
    path: str
    model: object = None
    params: int = 0
    layer_params: int = 0
    prefill_s: list = field(default_factory=list)
    decode_s: list = field(default_factory=list)
    peak_mem_mb: float | None = None
    baseline_mem_mb: float | None = None  # CPU probe: RSS of the fresh process before loading the model


def layer_params(model) -> int:
    """Parameters inside the decoder layers (what pruning shrinks; embeddings and lm_head stay)."""
    return sum(p.numel() for p in model.model.layers.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def trial(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one prompt; decode runs exactly new_tokens steps."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    t1 = time.perf_counter()
    cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(input_ids=tok, cache=cache, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def prompt_ids(vocab_size: int, ctx: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, ctx), generator=g).to(device)


@dataclass(frozen=True)
class SpeedSettings:
    """One trial: prefill `ctx` tokens then `new_tokens` greedy decode steps; `repeats` measured
    trials per model after `warmup` unmeasured ones."""
    ctx: int = 512
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1
    dtype: str = "fp32"
    device: str = "cpu"
    attn: str | None = None        # attention implementation (None: transformers' choice)
    memory: bool = True            # CPU: peak RSS of a fresh process per model
    threads: int | None = None

    def check(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.ctx < 1 or self.new_tokens < 1:
            raise UserError("--repeats, --ctx and --new-tokens must be >= 1 and --warmup >= 0")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")


def _load_all(paths: list[str], labels: list[str], st: SpeedSettings, dev) -> list[Bench]:
    from ..models import load_model

    benches = []
    for label, path in zip(labels, paths):
        model = load_model(path, st.dtype, device=dev)
        if st.attn:
            model.set_attn_implementation(st.attn)
        benches.append(Bench(label, path, model, sum(p.numel() for p in model.parameters()), layer_params(model)))
    return benches


def run_speed(paths: list[str], labels: list[str] | None = None, settings: SpeedSettings = SpeedSettings(),
              progress=None) -> dict:
    """Measure every checkpoint in `paths` (the first is the reference); return the result dict.
    `progress(repeat, label, prefill_s, decode_s)` after every trial."""
    st = settings
    st.check()
    if st.threads:
        torch.set_num_threads(st.threads)
    labels = labels or [Path(p).name for p in paths]
    if len(labels) != len(paths):
        raise UserError("give one --label per model directory")
    dev = torch.device(st.device)
    benches = _load_all(paths, labels, st, dev)
    vocab = {b.model.config.vocab_size for b in benches}
    if len(vocab) != 1:
        raise UserError(f"the models have different vocabularies ({sorted(vocab)}); compare a model with its pruned self")
    ids = prompt_ids(vocab.pop(), st.ctx, device=dev)
    for r in range(st.warmup + st.repeats):
        shift = r % len(benches)
        for b in benches[shift:] + benches[:shift]:  # rotate the order every repeat
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            p, d = trial(b.model, ids, st.new_tokens)
            if dev.type == "cuda":
                b.peak_mem_mb = max(b.peak_mem_mb or 0, torch.cuda.max_memory_allocated(dev) / 2**20)
            if r >= st.warmup:
                b.prefill_s.append(p)
                b.decode_s.append(d)
            if progress:
                progress(r, b.label, p, d)
    attn_used = benches[0].model.config._attn_implementation
    for b in benches:
        b.model = None  # free before the memory probes
    if st.memory and dev.type == "cpu":
        for b in benches:
            probe = probe_peak_rss(b.path, st)
            b.peak_mem_mb, b.baseline_mem_mb = probe["peak_rss_mb"], probe["baseline_rss_mb"]
    return summarize(benches, ctx=st.ctx, new_tokens=st.new_tokens, repeats=st.repeats, warmup=st.warmup,
                     dtype=st.dtype, device=st.device, attn=attn_used, threads=torch.get_num_threads())


def summarize(benches: list[Bench], **setup) -> dict:
    """Throughput from min and median times; speed-ups vs the first model both as a ratio of medians
    and paired per repeat (same round, adjacent in time: robust to machine load drifting)."""
    ctx, new = setup["ctx"], setup["new_tokens"]
    ref = benches[0]
    rows = []
    for b in benches:
        row = {"label": b.label, "path": b.path, "params": b.params, "layer_params": b.layer_params,
               "params_ratio": ref.params / b.params, "layer_params_ratio": ref.layer_params / b.layer_params,
               "peak_mem_mb": b.peak_mem_mb, "baseline_mem_mb": b.baseline_mem_mb}
        for phase, n in (("prefill", ctx), ("decode", new)):
            times, ref_times = getattr(b, phase + "_s"), getattr(ref, phase + "_s")
            paired = sorted(r / t for r, t in zip(ref_times, times))
            row.update({
                f"{phase}_tok_s_best": n / min(times), f"{phase}_tok_s_median": n / statistics.median(times),
                f"speedup_{phase}_median": statistics.median(ref_times) / statistics.median(times),
                f"speedup_{phase}_paired_median": statistics.median(paired),
                f"speedup_{phase}_paired_range": [paired[0], paired[-1]],
                f"{phase}_s": times,
            })
        rows.append(row)
    return {"setup": {**setup, **environment()}, "models": rows}


def environment() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def probe_peak_rss(path: str, st: SpeedSettings) -> dict:
    """{"peak_rss_mb", "baseline_rss_mb"} of a fresh process that loads `path` and runs one trial."""
    args = [sys.executable, "-m", "loraprune.bench.speed", "--probe", path, str(st.ctx), str(st.new_tokens),
            st.dtype, str(st.threads or 0), st.attn or ""]
    res = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe of {path} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _probe_main(path: str, ctx: str, new_tokens: str, dtype: str, threads: str, attn: str) -> None:
    from ..models import load_model

    if int(threads):
        torch.set_num_threads(int(threads))
    baseline = peak_rss_mb()  # python + torch + transformers, before the model
    model = load_model(path, dtype)
    if attn:
        model.set_attn_implementation(attn)
    trial(model, prompt_ids(model.config.vocab_size, int(ctx)), int(new_tokens))
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline}))


def render_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"Prefill {s['ctx']} tokens, then {s['new_tokens']} greedy decode steps (batch 1, KV cache); {s['dtype']}, "
        f"{s['device']} ({s['cpu']}, {s['cpu_count']} cores), {s['threads']} torch threads, attention "
        f"`{s['attn']}`; {s['repeats']} interleaved repeats after {s['warmup']} warm-up; torch {s['torch']}, "
        f"transformers {s['transformers']}, {s['date']}.",
        "Speed-up: median over repeats of (reference time / model time) within the same repeat, "
        "[min-max] over repeats. Peak memory: peak RSS of a fresh process loading the model and running one "
        "trial (in brackets: above the RSS before loading).",
        "",
        "| model | params | decoder-layer params | prefill tok/s median (best) | prefill speed-up "
        "| decode tok/s median (best) | decode speed-up | peak memory MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        mem = "n/a"
        if m["peak_mem_mb"] is not None:
            mem = f"{m['peak_mem_mb']:,.0f}"
            if m.get("baseline_mem_mb") is not None:
                mem += f" ({m['peak_mem_mb'] - m['baseline_mem_mb']:,.0f})"
        lo_p, hi_p = m["speedup_prefill_paired_range"]
        lo_d, hi_d = m["speedup_decode_paired_range"]
        lines.append(
            f"| {m['label']} | {m['params'] / 1e6:.1f}M (1/{m['params_ratio']:.2f}) "
            f"| {m['layer_params'] / 1e6:.1f}M (1/{m['layer_params_ratio']:.2f}) "
            f"| {m['prefill_tok_s_median']:,.0f} ({m['prefill_tok_s_best']:,.0f}) "
            f"| {m['speedup_prefill_paired_median']:.2f}x [{lo_p:.2f}-{hi_p:.2f}] "
            f"| {m['decode_tok_s_median']:,.1f} ({m['decode_tok_s_best']:,.1f}) "
            f"| {m['speedup_decode_paired_median']:.2f}x [{lo_d:.2f}-{hi_d:.2f}] | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "--probe":
    _probe_main(*sys.argv[2:])
