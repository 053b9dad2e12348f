"""Why the LoRA-guided criterion ranks units well but single weights badly (see README.md here).

On one batch of the embedded SmolLM2 (4 x 128 tokens of SOTU training text), for LoRA r=8 at init
(B = 0) and after K LoRA steps, compare the LoRA estimate Ĝ = s(G_B A + B G_A - G_B G_A) of the
merged-weight gradient with the true gradient G (base weights given requires_grad for this script
only), at two granularities:
  element: Spearman correlation of (W'⊙Ĝ)² with (W'⊙G)² over the weights of each projection, and of
           the estimate Ĝ with G itself;
  unit:    the same for the FFN channel sums (gate row + up row + down column) of each layer.
Usage: .venv/bin/python benchmarks/sparsity/diagnose.py [--steps K] [--layers 5,15,25] [--out F.json]
"""
from __future__ import annotations

import argparse
import json

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from loraprune import data as data_mod
    from loraprune.core.arch import TARGET_MODULES, layer_modules
    from loraprune.core.lora import lora_parts
    from loraprune.models import load_model, load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    tok = load_tokenizer(None)
    model = get_peft_model(load_model(None), LoraConfig(r=8, lora_alpha=16, target_modules=TARGET_MODULES,
                                                        lora_dropout=0.0))
    seqs = data_mod.make_sequences(data_mod.tokenize_text(tok, data_mod.join_documents(
        data_mod.load_documents("sotu", "train", "text"))), 128)
    stream = data_mod.SequenceStream(seqs, 4, 0)
    probe = stream.next_batch()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(lora, lr=3e-4)

    def measure(tag: str) -> dict:
        mods = {(i, n): m for i in layers for n, m in layer_modules(model, i).items()}
        for m in mods.values():
            m.base_layer.weight.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model.train()
        model(input_ids=probe, labels=probe).loss.backward()
        out = {"elements": {}, "ffn_units": {}}
        per_layer = {}
        for (i, n), m in mods.items():
            _p = lora_parts(m)
            W, A, B, s = _p.weight, _p.A, _p.B, _p.scaling
            with torch.no_grad():
                merged = W + s * (B @ A)
                g_true = W.grad.float()
                g_hat = s * (B.grad @ A + B @ A.grad - B.grad @ A.grad)
                t_true, t_hat = (merged * g_true).pow(2), (merged * g_hat).pow(2)
                out["elements"][f"{i}.{n}"] = {"taylor": spearman(t_hat, t_true), "grad": spearman(g_hat, g_true),
                                               "magnitude_vs_true_taylor": spearman(merged.abs(), t_true)}
                unit = {"gate_proj": (1, 0), "up_proj": (1, 0), "down_proj": (0, 0)}.get(n)
                if unit is not None:  # FFN channel sums: rows of gate/up, columns of down
                    dim = unit[0]
                    acc = per_layer.setdefault(i, [0, 0])
                    acc[0] = acc[0] + t_true.sum(dim)
                    acc[1] = acc[1] + t_hat.sum(dim)
            m.base_layer.weight.grad = None
            m.base_layer.weight.requires_grad_(False)
        for i, (t, h) in per_layer.items():
            out["ffn_units"][str(i)] = spearman(h, t)
        el = [v["taylor"] for v in out["elements"].values()]
        out["summary"] = {"element_taylor_spearman_mean": sum(el) / len(el),
                          "ffn_unit_spearman_mean": sum(out["ffn_units"].values()) / len(out["ffn_units"])}
        print(tag, json.dumps(out["summary"]), flush=True)
        model.zero_grad(set_to_none=True)
        return out

    res = {"setup": {"model": "embedded SmolLM2-135M", "lora_r": 8, "probe_batch": "4 x 128 sotu train tokens",
                     "layers": layers}, "init": measure("init (B=0)")}
    for _ in range(args.steps):
        batch = stream.next_batch()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    res[f"after_{args.steps}_steps"] = measure(f"after {args.steps} LoRA steps")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
