"""The PNG plots next to report.md: the training run (loss parts and the pruned ratio per step) and
the kept units per layer. matplotlib is optional (the `plot` extra); without it no PNG is written
and report.md says so."""
from __future__ import annotations

from pathlib import Path

TRAINING, LAYERS = "report_training.png", "report_layers.png"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401  (only: is it installed?)
    except ImportError:
        return False
    return True


def write_plots(report: dict, out_dir: Path) -> list[str]:
    """Write both plots; return their file names (none without matplotlib)."""
    if not available():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _training(plt, report, Path(out_dir) / TRAINING)
    _layers(plt, report, Path(out_dir) / LAYERS)
    return [TRAINING, LAYERS]


def _training(plt, r: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = list(range(1, len(r["losses"]) + 1))
    ax.plot(steps, r["losses"], color="black", label="training loss")
    for name, vals in (r.get("loss_parts") or {}).items():
        if len(vals) == len(steps) and (name != "ce" or "kl" in r["loss_parts"]):
            ax.plot(steps, vals, label=name.upper(), alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, r.get("ratio_per_step") or [0.0] * len(steps), color="tab:red", linestyle="--",
             label="pruned ratio")
    ax2.set_ylabel("pruned ratio", color="tab:red")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper right")
    c = r["config"]
    ax.set_title(f"{c['criterion']} {c['schedule']} ratio {c['ratio']}, distill a={c.get('distill_alpha', 0)}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layers(plt, r: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    idx = [l["layer"] for l in r["layers"]]
    for ax, key, title in zip(axes, ("heads", "kv_heads", "ffn"), ("query heads", "KV heads", "FFN channels")):
        kept = [l[key] for l in r["layers"]]
        full = [l[key + "_of"] for l in r["layers"]]
        ax.bar(idx, full, color="lightgrey", label="dense")
        ax.bar(idx, kept, color=["tab:blue" if l["pruned"] else "tab:grey" for l in r["layers"]], label="kept")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    alloc = (r.get("allocation") or {}).get("kind", "uniform")
    fig.suptitle(f"kept units per layer ({alloc} allocation; grey: layers not pruned)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
