"""How well does each criterion rank single units on the embedded SmolLM2, before any fine-tuning?

Ground truth: the increase of the loss on held-out batches when ONE unit is removed (its gate set to
0), for every query head of every pruned layer and for a seeded sample of FFN channels in a few
layers. Scores: each criterion averaged over the same calibration batches the oneshot schedule uses
(LoRA freshly initialised: B = 0, so W' = W). Reported: mean over layers of the Spearman rank
correlation between score and ground truth, and how much of the ground truth's least-important half
the criterion's least-important half recovers (0.5 = chance).

    PYTHONPATH=src python benchmarks/smollm2-criteria/diagnose.py [--threads 1] [--ffn-layers 5,12,19,26]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def bottom_half_overlap(score: torch.Tensor, truth: torch.Tensor) -> float:
    k = len(score) // 2
    s = set(score.argsort()[:k].tolist())
    t = set(truth.argsort()[:k].tolist())
    return len(s & t) / k


def main():
    from common import add_calibration_args, lora_smollm2, parse_and_calibrate, spearman

    ap = argparse.ArgumentParser()
    add_calibration_args(ap)
    ap.add_argument("--truth-batches", type=int, default=2)
    ap.add_argument("--ffn-layers", default="5,12,19,26")
    ap.add_argument("--ffn-sample", type=int, default=48)
    ap.add_argument("--criteria", default="lora,lora:abs-norm,mask-taylor,taylor,magnitude,activation,random",
                    help="names; lora:abs-norm = the lora criterion with --importance abs-norm")
    from loraprune.core.criteria import build_criterion
    from loraprune.core.masks import MaskSet, clear_grads

    t0 = time.time()
    args, _, stream, calib = parse_and_calibrate(ap)
    truth_batches = [stream.next_batch() for _ in range(args.truth_batches)]  # not used for scoring
    model, spec, layers = lora_smollm2(args.lora_r, 2 * args.lora_r)
    masks = MaskSet(spec, layers)
    masks.attach(model)
    model.eval()

    def loss(batches):
        with torch.no_grad():
            return sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)

    # ---- scores, averaged over the calibration batches
    scores = {}
    for name in args.criteria.split(","):
        base, _, imp = name.partition(":")
        crit = build_criterion(base, imp or "squared", masks=masks, seed=0)
        if hasattr(crit, "setup"):
            crit.setup(model, spec, masks)
        acc = {}
        for b in calib:
            out = model(input_ids=b, labels=b)
            out.loss.backward()
            for i in masks.prunable:
                s = crit.layer_scores(model, spec.layers[i])
                for k, v in s.items():
                    acc.setdefault(i, {}).setdefault(k, torch.zeros_like(v, dtype=torch.float64))
                    acc[i][k] += v.double() / len(calib)
            clear_grads(model, masks)
        if hasattr(crit, "teardown"):
            crit.teardown(model)
        scores[name] = acc
        print(f"[{time.time() - t0:6.0f}s] scored {name}", flush=True)

    # ---- ground truth: loss increase of removing one unit
    base = loss(truth_batches)
    head_truth = {}
    for i in masks.prunable:
        g = masks.head_gates[i]
        vals = []
        for h in range(spec.layers[i].num_heads):
            with torch.no_grad():
                g[h] = 0.0
            vals.append(loss(truth_batches) - base)
            with torch.no_grad():
                g[h] = 1.0
        head_truth[i] = torch.tensor(vals, dtype=torch.float64)
    print(f"[{time.time() - t0:6.0f}s] head ground truth done", flush=True)
    ffn_truth = {}
    gen = torch.Generator().manual_seed(0)
    for i in [int(x) for x in args.ffn_layers.split(",")]:
        chans = torch.randperm(spec.layers[i].intermediate_size, generator=gen)[:args.ffn_sample]
        g = masks.ffn_gates[i]
        vals = []
        for c in chans.tolist():
            with torch.no_grad():
                g[c] = 0.0
            vals.append(loss(truth_batches) - base)
            with torch.no_grad():
                g[c] = 1.0
        ffn_truth[i] = (chans, torch.tensor(vals, dtype=torch.float64))
    print(f"[{time.time() - t0:6.0f}s] ffn ground truth done", flush=True)

    # ---- agreement
    table = {}
    for name, acc in scores.items():
        # head value as the mask update sees a head inside its group: its own score (kv counted per group)
        hs = [spearman(acc[i]["heads"], head_truth[i]) for i in head_truth]
        ho = [bottom_half_overlap(acc[i]["heads"], head_truth[i]) for i in head_truth]
        fs = [spearman(acc[i]["ffn"][ch], t) for i, (ch, t) in ffn_truth.items()]
        fo = [bottom_half_overlap(acc[i]["ffn"][ch], t) for i, (ch, t) in ffn_truth.items()]
        table[name] = {"heads_spearman": sum(hs) / len(hs), "heads_bottom_half_overlap": sum(ho) / len(ho),
                       "ffn_spearman": sum(fs) / len(fs), "ffn_bottom_half_overlap": sum(fo) / len(fo)}
    # how the criteria agree with each other on FFN channels (all channels of the sampled layers)
    names = list(scores)
    cross = {a: {b: sum(spearman(scores[a][i]["ffn"], scores[b][i]["ffn"]) for i in ffn_truth) / len(ffn_truth)
                 for b in names} for a in names}
    lines = ["| criterion | heads: Spearman vs truth | heads: bottom-half overlap | FFN: Spearman vs truth | "
             "FFN: bottom-half overlap |", "|---|---|---|---|---|"]
    for n, r in table.items():
        lines.append(f"| {n} | {r['heads_spearman']:.3f} | {r['heads_bottom_half_overlap']:.3f} | "
                     f"{r['ffn_spearman']:.3f} | {r['ffn_bottom_half_overlap']:.3f} |")
    lines += ["", "FFN-channel Spearman between criteria (layers " + args.ffn_layers + "):", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{cross[a][b]:.2f}" for b in names) + " |")
    md = "\n".join(lines)
    print(md)
    print(f"base held-out loss {base:.4f}; {len(head_truth)} layers x heads, {len(ffn_truth)} x {args.ffn_sample} "
          f"FFN channels; {time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "base_loss": base, "table": table, "cross_ffn": cross,
                       "markdown": md}, fh, indent=2)


if __name__ == "__main__":
    main()
