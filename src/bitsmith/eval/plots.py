"""PNG reports (matplotlib is an optional extra: ``pip install 'bitsmith[plot]'``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import BitsmithError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BitsmithError("plots need matplotlib: pip install 'bitsmith[plot]' (or pip install matplotlib)") from None
    return plt


def require_matplotlib() -> None:
    """Fail before any long work when a plot was asked for and matplotlib is missing."""
    _pyplot()


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def compare_plot(
    out: str | Path,
    rows: Sequence[dict],
    *,
    metric: str,
    baseline: float | None,
    layers: Sequence[dict] | None = None,
    layers_label: str = "",
) -> Path:
    """Left: quality vs bits/weight for each recipe (the Pareto picture), the original as a
    line. Right (when given): per-layer relative output error of one recipe, worst first."""
    plt = _pyplot()
    ncols = 2 if layers else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 5), squeeze=False)
    ax = axes[0][0]
    xs = [r["bits_per_weight"] for r in rows]
    ys = [r[metric] for r in rows]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"original: {baseline:.4g}")
        ax.legend(loc="best", fontsize=8)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel("stored bits/weight of quantized tensors (metadata included)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("quality vs bits/weight")
    ax.grid(True, alpha=0.3)
    if layers:
        ax2 = axes[0][1]
        names = [_short(layer["name"]) for layer in layers]
        errs = [layer["rel_error"] for layer in layers]
        ax2.plot(range(len(errs)), errs, color="tab:red")
        step = max(1, len(names) // 12)
        ax2.set_xticks(range(0, len(names), step))
        ax2.set_xticklabels(names[::step], rotation=60, ha="right", fontsize=7)
        ax2.set_ylabel("relative output error on real activations")
        ax2.set_title(f"per-layer output error, worst first: {layers_label}")
        ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def inspect_plot(out: str | Path, tensors: Sequence[dict], title: str) -> Path:
    """Per quantized tensor (file order): stored bits/weight (bars) and, when the checkpoint
    carries its quantize report, the relative weight error (line, right axis)."""
    plt = _pyplot()
    q = [t for t in tensors if t.get("bits_per_weight") is not None]
    if not q:
        raise BitsmithError("no quantized tensor to plot")
    fig, ax = plt.subplots(figsize=(max(8, min(24, len(q) * 0.08)), 5))
    ax.bar(range(len(q)), [t["bits_per_weight"] for t in q], color="tab:blue", width=1.0, alpha=0.7)
    ax.set_ylabel("stored bits/weight", color="tab:blue")
    ax.set_xlabel("quantized tensor (file order)")
    step = max(1, len(q) // 16)
    ax.set_xticks(range(0, len(q), step))
    ax.set_xticklabels([_short(t["name"]) for t in q][::step], rotation=60, ha="right", fontsize=7)
    errs = [t.get("rel_error") for t in q]
    if any(e is not None for e in errs):
        ax2 = ax.twinx()
        ax2.plot(range(len(q)), [e if e is not None else float("nan") for e in errs], color="tab:red", linewidth=1)
        ax2.set_ylabel("relative weight error (from the quantize report)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
