"""The figure of ``saelab steer``: effect and cost against the coefficient (and, with layer
transfer, the effect retained at each layer), as PNG on matplotlib's Agg canvas.

Example:
    >>> plot_steer(result, "runs/steer/steer.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from saelab.atomic import write_atomically

EFFECT_LINES = ("delta_logit_diff", "delta_logprob_target", "delta_logprob_contrast")
"""Keys of ``SWEEP_KEYS`` drawn in the effect panel; the rest go in the cost panel."""
COST_LINES = ("kl", "delta_ce")
DPI = 100


def _panel(ax: Any, rows: list[dict[str, Any]], keys: tuple[str, ...], title: str) -> None:
    coefs = [row["coef"] for row in rows]
    drawn = False
    for key in keys:
        if all(row.get(key) is not None for row in rows):
            ax.plot(coefs, [row[key] for row in rows], marker="o", label=key)
            drawn = True
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("coefficient")
    ax.set_title(title, fontsize=10)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _transfer_panel(ax: Any, transfer: dict[str, Any]) -> None:
    layers = [cell["layer"] for cell in transfer["cells"]]
    for j, coef in enumerate(transfer["coefs"]):
        values = [cell["retained"][j] for cell in transfer["cells"]]
        if any(v is not None for v in values):
            ax.plot(
                layers,
                [float("nan") if v is None else v for v in values],
                marker="o",
                label=f"c={coef:g}",
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(transfer["own_layer"], color="black", lw=0.8, ls="--")
    ax.set_xticks(layers)
    ax.set_xlabel("layer (dashed: built at)")
    ax.set_title("effect retained at other layers", fontsize=10)
    ax.legend(fontsize=8)


def plot_steer(result: dict[str, Any], path: str | Path) -> Path:
    """Write the sweep's figure to ``path`` (atomically) and return the path."""
    layers = (result.get("transfer") or {}).get("layers")
    panels = 3 if layers else 2
    fig = Figure(figsize=(5 * panels, 4))
    FigureCanvasAgg(fig)  # rendering never touches a display
    axes = fig.subplots(1, panels)
    rows = result["sweep"]
    _panel(axes[0], rows, EFFECT_LINES, "effect on scored completions (nats)")
    _panel(axes[1], rows, COST_LINES, "cost on neutral text (nats)")
    if layers:
        _transfer_panel(axes[2], layers)
    vector = result["vector"]
    fig.suptitle(
        f"{vector['method']} vector at {result['hook']} ({result['positions']} positions), "
        f"{result['model']}",
        fontsize=10,
    )
    fig.tight_layout()
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
