"""The child process of `loraprune bench-memory`: build a model of a shape, run ONE importance-
estimation step of one case (bench/memory.py), print its numbers as one JSON line.

    python -m loraprune.bench.memory_probe '{"mode": "lora", "dtype": "fp32", ...}'
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import torch

from ..sysmem import peak_rss_mb as peak_mb
from ..sysmem import reset_peak, rss_mb
from .memory import QUANT_DTYPES, SHAPES, Case

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(shape: str, dtype: str):
    """A LLaMA of the given shape with random weights, built without an fp32 detour or slow init."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**SHAPES[shape], head_dim=SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(TORCH_DTYPES[dtype]).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)            # RMSNorm weights
            else:
                p.uniform_(-0.035, 0.035)  # ~ std 0.02
        model.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffers were on meta
    model.tie_weights()
    return model.eval()


def attach_scoring(case: Case, model, out: dict):
    """LoRA (r=case.lora_r) on the seven projections, mask hooks on prune's default layers, and the
    case's criterion set up: (peft model, spec, masks, criterion)."""
    from peft import LoraConfig, get_peft_model

    from ..core.arch import TARGET_MODULES, model_spec, parse_layers
    from ..core.criteria import build_criterion
    from ..core.masks import MaskSet

    model = get_peft_model(model, LoraConfig(r=case.lora_r, lora_alpha=2 * case.lora_r, lora_dropout=0.0,
                                             target_modules=TARGET_MODULES, bias="none", task_type="CAUSAL_LM"))
    if case.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    spec = model_spec(model.config)
    skip = parse_layers("auto", spec.num_layers)  # what `prune` does by default
    masks = MaskSet(spec, [i for i in range(spec.num_layers) if i not in skip])
    masks.attach(model)
    criterion = build_criterion(case.mode, masks=masks, seed=case.seed)
    criterion.setup(model, spec, masks)
    out["prunable_layers"] = len(masks.prunable)
    return model, spec, masks, criterion


class SavedBytes:
    """Bytes of the unique storages autograd saves for backward, parameters excluded."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in self.param_ptrs:
                self.saved[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def scoring_step(model, ids, spec, masks, criterion, out: dict) -> None:
    """Forward + backward + the criterion's scores of every pruned layer, with peaks after each."""
    from ..core.masks import step_gradients

    model.train()
    saved = SavedBytes(model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        res = model(input_ids=ids, labels=ids)
    out["logits_bytes"] = res.logits.numel() * res.logits.element_size()
    out["saved_for_backward_bytes"] = saved.total
    out["peak_after_forward_mb"] = peak_mb()
    loss = res.loss
    del res
    loss.backward()
    grads = step_gradients(model, masks)
    out["grad_bytes"] = sum(g.numel() * g.element_size() for g in grads)
    out["base_grad_bytes"] = sum(p.grad.numel() * p.grad.element_size() for n, p in model.named_parameters()
                                 if p.grad is not None and "lora_" not in n)
    del grads
    out["peak_after_backward_mb"] = peak_mb()
    t2 = time.perf_counter()
    for i in masks.prunable:
        scores = criterion.layer_scores(model, spec.layers[i])
        assert all(torch.isfinite(v).all() for v in scores.values())
    out["score_s"] = time.perf_counter() - t2
    out["loss"] = float(loss)


def save_random_checkpoint(shape: str, path: str) -> None:
    """The random model of `shape` in bf16, saved with save_pretrained (for the quantized cases)."""
    build_model(shape, "bf16").save_pretrained(path)


def model_for(case: Case):
    """The case's base: built in place (fp32 / bf16), or loaded quantized from its checkpoint (the
    float pages of the file released; peak RSS restarts from there, so loading is not measured)."""
    if case.dtype not in QUANT_DTYPES:
        return build_model(case.shape, case.dtype)
    from ..models import load_model

    model = load_model(case.checkpoint, "fp32", quant=case.dtype)
    reset_peak()
    return model


def measure(case: Case) -> dict:
    """Run one case in this process and return its numbers (call it in a fresh process)."""
    if case.threads:
        torch.set_num_threads(case.threads)
    torch.manual_seed(case.seed)
    out = {"case": asdict(case), "rss_start_mb": rss_mb()}
    t0 = time.perf_counter()
    model = model_for(case)
    out["build_s"] = time.perf_counter() - t0
    out["rss_weights_mb"] = rss_mb()
    ids = torch.randint(0, model.config.vocab_size, (case.batch, case.seq))
    if case.mode != "inference":
        model, spec, masks, criterion = attach_scoring(case, model, out)
    params = list(model.parameters())
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in params)  # as stored (4-bit: packed)
    out["trainable_bytes"] = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    out["rss_before_step_mb"] = rss_mb()
    t1 = time.perf_counter()
    if case.mode == "inference":
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out["logits_bytes"] = logits.numel() * logits.element_size()
        del logits
        out["peak_after_forward_mb"] = peak_mb()
    else:
        scoring_step(model, ids, spec, masks, criterion, out)
    out["step_s"] = time.perf_counter() - t1
    out["peak_rss_mb"] = peak_mb()
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _child() -> None:
    case = Case(**json.loads(sys.argv[1]))
    print(json.dumps(measure(case)), flush=True)


if __name__ == "__main__":
    _child()
