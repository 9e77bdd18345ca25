"""The Pareto picture for the README: quality vs stored bits/weight for every library and config
in ``benchmarks/results/quality.json`` (made by ``benchmarks/quality.py``).

    python benchmarks/quality_plot.py   # writes benchmarks/results/quality.png
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {"bitsmith": "tab:blue", "bitsandbytes": "tab:orange", "hqq": "tab:green", "optimum-quanto": "tab:red"}


def main() -> None:
    data = json.loads((RESULTS / "quality.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    panels = [("smollm2", "perplexity", "SmolLM2-135M: wiki perplexity (log; lower is better)"),
              ("minilm", "mean_cosine", "all-MiniLM-L6-v2: embedding cosine vs fp32 (higher is better)")]
    for ax, (model, metric, title) in zip(axes, panels):
        rows = [r for r in data[model]["rows"] if r.get("library") in COLORS and r.get(metric) is not None]
        base = next((r for r in data[model]["rows"] if r.get("library") in ("-", None) and r.get(metric) is not None), None)
        for lib, color in COLORS.items():
            pts = [r for r in rows if r["library"] == lib and r["bits_per_weight"] <= 9]
            if metric == "perplexity":
                pts = [r for r in pts if r[metric] < 1000]  # 2-bit configs are off the chart (see the table)
            else:
                pts = [r for r in pts if r[metric] > 0.5]
            ax.scatter([r["bits_per_weight"] for r in pts], [r[metric] for r in pts], color=color, label=lib, zorder=3)
            for r in pts:
                ax.annotate(r["config"].split(" (")[0], (r["bits_per_weight"], r[metric]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3), color=color)
        if base is not None and metric == "perplexity":
            ax.axhline(base[metric], color="gray", linestyle="--", label=f"fp32: {base[metric]:.2f}")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("stored bits/weight of the quantized linears (metadata included)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / "quality.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
