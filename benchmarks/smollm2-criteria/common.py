"""Shared by diagnose.py and estimate_quality.py: the prune runs' SOTU sequences and the embedded
SmolLM2 with a fresh LoRA (seed 0), plus a rank correlation."""
from __future__ import annotations

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def add_calibration_args(ap) -> None:
    """--threads and the calibration batches (the oneshot schedule's defaults in the bench)."""
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--lora-r", type=int, default=8)


def parse_and_calibrate(ap):
    """(args, SOTU sequences, the prune runs' batch stream (seed 0), its first --calib-batches batches)."""
    from loraprune import data as data_mod

    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seqs = sequences(args.seq_len)
    stream = data_mod.SequenceStream(seqs, args.batch_size, 0)
    return args, seqs, stream, [stream.next_batch() for _ in range(args.calib_batches)]


def sequences(seq_len: int) -> torch.Tensor:
    from loraprune import data as data_mod
    from loraprune.models import load_tokenizer

    tok = load_tokenizer(None)
    ids = data_mod.tokenize_text(tok, data_mod.join_documents(data_mod.load_documents("sotu", "train")))
    return data_mod.make_sequences(ids, seq_len)


def lora_smollm2(r: int, alpha: float):
    """(peft model, ModelSpec, pruned layer indices under the default skip)."""
    from peft import LoraConfig, get_peft_model

    from loraprune.core.arch import TARGET_MODULES, model_spec, parse_layers
    from loraprune.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(None), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGET_MODULES,
                                                        lora_dropout=0.0, task_type="CAUSAL_LM"))
    spec = model_spec(model.config)
    skip = parse_layers("auto", spec.num_layers)
    return model, spec, [i for i in range(spec.num_layers) if i not in skip]
