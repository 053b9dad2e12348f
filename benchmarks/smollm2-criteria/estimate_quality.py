"""How close is the LoRA-guided estimate to the criterion it stands in for, projection by projection?

The LoRA criterion replaces the true gradient G = dL/dW' (which needs gradients of the frozen
weights) by G^ = s (G_B A + B G_A - G_B G_A). Its reference is therefore the same importance with
the true gradient: (W' * G)^2 summed per unit. This script computes both from the SAME backward pass
(base-weight gradients switched on just for the measurement) on the calibration batches the oneshot
schedule uses, after 0 or more plain LoRA training steps (so that B has moved away from 0), and
reports per projection the mean over pruned layers of the Spearman rank correlation between the two
unit rankings (heads for q/o, KV heads for k/v, channels for gate/up/down), and for whole heads and
channels the correlation of the LoRA estimate summed over all their projections (the paper) or over
their rows only (--lora-projections rows) with the true-gradient importance summed over all of them.

Why per projection: G^ = s^2 G A^T A at B = 0 only mixes INPUT columns, so units that own rows
(q/k/v/gate/up) keep their own gradient, while units that own columns (heads in o_proj, channels in
down_proj) are scored with gradients mixed in from other units; B B^T G (once B has grown) mixes rows.

    PYTHONPATH=src python benchmarks/smollm2-criteria/estimate_quality.py --lora-r 8 --train-steps 0,10,40
"""
from __future__ import annotations

import argparse
import json
import time

import torch


UNIT = {"q_proj": "heads", "o_proj": "heads", "k_proj": "kv", "v_proj": "kv",
        "gate_proj": "ffn", "up_proj": "ffn", "down_proj": "ffn"}


def main():
    from common import add_calibration_args, lora_smollm2, parse_and_calibrate, spearman

    ap = argparse.ArgumentParser()
    add_calibration_args(ap)
    ap.add_argument("--lora-alpha", type=float, default=None, help="default 2 r (scaling 2, as in the bench)")
    ap.add_argument("--train-steps", default="0,10,40", help="measure after these many LoRA steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    from loraprune import data as data_mod
    from loraprune.core.arch import layer_modules
    from loraprune.core.arch import ROW_PROJECTIONS
    from loraprune.core.criteria.gradient import lora_element_importance
    from loraprune.core.lora import base_linear, merged_weight
    from loraprune.core.units import module_unit_sums

    t0 = time.time()
    args, seqs, _, calib = parse_and_calibrate(ap)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r
    model, spec, layers = lora_smollm2(args.lora_r, alpha)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    def measure() -> dict[str, float]:
        bases = [base_linear(m).weight for i in layers for m in layer_modules(model, i).values()]
        for w in bases:
            w.requires_grad_(True)
        est = {}
        ref = {}
        for b in calib:
            model(input_ids=b, labels=b).loss.backward()
            with torch.no_grad():
                for i in layers:
                    for name, mod in layer_modules(model, i).items():
                        u = UNIT[name]
                        e = module_unit_sums(spec.layers[i], name, lora_element_importance(mod))[u].double()
                        w = base_linear(mod).weight
                        r = module_unit_sums(spec.layers[i], name, (merged_weight(mod) * w.grad.float()).pow_(2))[u]
                        est[(i, name)] = est.get((i, name), 0) + e
                        ref[(i, name)] = ref.get((i, name), 0) + r.double()
            model.zero_grad(set_to_none=True)
            for w in bases:
                w.grad = None
        for w in bases:
            w.requires_grad_(False)
        out = {name: sum(spearman(est[(i, name)], ref[(i, name)]) for i in layers) / len(layers) for name in UNIT}
        # whole-unit scores against the true-gradient importance summed over all seven projections
        for unit in ("heads", "ffn"):
            for which in ("all", "rows"):
                names = [n for n, u in UNIT.items() if u == unit and (which == "all" or n in ROW_PROJECTIONS)]
                out[f"{unit} ({which})"] = sum(
                    spearman(sum(est[(i, n)] for n in names),
                             sum(ref[(i, n)] for n, u in UNIT.items() if u == unit)) for i in layers) / len(layers)
        return out

    steps = sorted(int(x) for x in args.train_steps.split(","))
    results = {}
    done = 0
    train = data_mod.SequenceStream(seqs, args.batch_size, 1)  # other batches than the calibration ones
    for target in steps:
        model.train()
        while done < target:
            b = train.next_batch()
            model(input_ids=b, labels=b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
        model.eval()
        results[target] = measure()
        print(f"[{time.time() - t0:6.0f}s] after {target} steps: "
              + ", ".join(f"{k} {v:.2f}" for k, v in results[target].items()), flush=True)

    cols = list(results[steps[0]])
    lines = [f"Spearman(LoRA estimate, same importance with the true gradient), r={args.lora_r}, "
             f"mean over layers {layers[0]}-{layers[-1]}:", "",
             "| LoRA steps | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for s, r in results.items():
        lines.append(f"| {s} | " + " | ".join(f"{r[k]:.2f}" for k in cols) + " |")
    md = "\n".join(lines)
    print(md)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "results": results, "markdown": md}, fh, indent=2)


if __name__ == "__main__":
    main()
