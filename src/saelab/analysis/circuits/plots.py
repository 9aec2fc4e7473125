"""PNG figures for ``saelab circuit``: the faithfulness curve and the top-k comparison bars.

Built on matplotlib's Agg canvas directly (no pyplot, no display); each function returns PNG
bytes and the caller writes them atomically.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def faithfulness_png(curve: dict[str, Any], title: str = "", mark_k: int | None = None) -> bytes:
    """Normalised faithfulness (left axis) and the raw metric (right) vs features kept."""
    n = curve["n_features"]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    faithful = [math.nan if f is None else f for f in curve["faithfulness"]]
    ax.plot(n, faithful, marker="o", color="tab:blue", label="faithfulness")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    if mark_k is not None:
        ax.axvline(mark_k, color="tab:red", lw=0.8, ls="--", label=f"k = {mark_k}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.3, max(n) * 1.4)
    ax.set_xlabel("features kept (ranked by |IE|)")
    ax.set_ylabel("(m(C) − m(∅)) / (m(M) − m(∅))")
    # The metric is an affine function of faithfulness: a second scale, not a second line.
    empty, span = (
        curve["metric_empty_circuit"],
        curve["metric_full_model"] - curve["metric_empty_circuit"],
    )
    if span:
        right = ax.secondary_yaxis(
            "right", functions=(lambda f: empty + f * span, lambda m: (m - empty) / span)
        )
        right.set_ylabel("metric (mean over prompts)")
    ablated = f"{curve['ablation']}-ablated" + (", errors too" if curve["ablate_errors"] else "")
    ax.set_title(f"{title}\nrest {ablated}; IE by {curve['method']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def compare_png(result: dict[str, Any]) -> bytes:
    """Bars of mean logit difference and accuracy per SAE and variant; clean as a line."""
    variants = list(dict.fromkeys(v["variant"] for v in result["variants"]))
    saes = [s["label"] for s in result["saes"]]
    fig = Figure(figsize=(10, 4.5))
    panels = (("logit_diff", "mean metric (logit diff)"), ("accuracy", "accuracy (metric > 0)"))
    width = 0.8 / len(variants)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, variant in enumerate(variants):
            by_sae = {v["sae"]: v[key] for v in result["variants"] if v["variant"] == variant}
            values = [by_sae[s] for s in saes]
            xs = [x + (j - (len(variants) - 1) / 2) * width for x in range(len(saes))]
            ax.bar(xs, values, width=width, label=variant)
        ax.axhline(result["clean"][key], color="black", ls="--", lw=1, label="clean")
        ax.set_xticks(range(len(saes)), [s.replace(" (", "\n(") for s in saes], fontsize=7)
        ax.set_ylabel(label)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{result['task']}: top-{result['k']} per {result['keep_per']} vs full SAEs", fontsize=9
    )
    fig.tight_layout()
    return _png(fig)
