"""PNG figures for ``saelab report``: feature density, Pareto fronts across SAEs, training curves.

Figures are built on matplotlib's Agg canvas directly (no pyplot, no display, no global state), and
each ``*_png`` returns PNG bytes so the caller decides where they go (a file, a data URI, or
both). The matching ``*_figure`` returns the figure itself, for reading back what was drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

CURVE_METRICS = ("l0", "fvu", "frac_dead")
"""Training-log fields drawn against tokens, one panel each."""

DPI = 100


@dataclass(frozen=True)
class ParetoPoint:
    """One SAE in a Pareto plot."""

    label: str
    architecture: str
    x: float
    """L0: lower is better."""
    y: float
    """The quality measure (FVU, ΔCE: lower is better; CE recovered: higher is better)."""
    x_err: float | None = None
    """Half-width of the 95 % interval of x over seeds (drawn as an error bar), if known."""
    y_err: float | None = None
    """Half-width of the 95 % interval of y over seeds, if known."""


def pareto_front(xy: Sequence[tuple[float, float]], *, maximize_y: bool = False) -> list[int]:
    """Indices of the points no other point beats, sorted by x (then by y, best first).

    Lower x is always better; lower y too unless ``maximize_y``. A point is dropped when another
    is at least as good in both and strictly better in one; non-finite points never qualify.
    """
    sign = -1.0 if maximize_y else 1.0
    finite = [i for i, (x, y) in enumerate(xy) if math.isfinite(x) and math.isfinite(y)]
    # Sweep in order of x (ties: best y first); a point is on the front iff its y beats every
    # y seen so far. Exact duplicates are all kept: neither beats the other.
    order = sorted(finite, key=lambda i: (xy[i][0], sign * xy[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        y = sign * xy[i][1]
        if y < best or (front and xy[front[-1]] == xy[i]):
            front.append(i)
            best = min(best, y)
    return front


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # attaches the Agg canvas: rendering never touches a display
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def density_histogram_png(label: str, log10_density_F: Float[torch.Tensor, " F"]) -> bytes:
    """Histogram of log10 feature density; dead features (density 0 → -inf) are counted aside."""
    return _png(density_histogram_figure(label, log10_density_F))


def density_histogram_figure(label: str, log10_density_F: Float[torch.Tensor, " F"]) -> Figure:
    """The figure of :func:`density_histogram_png`."""
    values_F = log10_density_F.detach().double().cpu()
    alive_F = values_F[torch.isfinite(values_F)]
    n_dead = int(values_F.numel() - alive_F.numel())
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if alive_F.numel():
        ax.hist(alive_F.numpy(), bins=50, color="tab:blue")
    ax.set_xlabel("log10 feature density (fraction of tokens a feature fires on)")
    ax.set_ylabel("features")
    ax.set_title(f"{label}\n{values_F.numel()} features, {n_dead} never fired", fontsize=9)
    fig.tight_layout()
    return fig


def pareto_png(
    points: Sequence[ParetoPoint],
    *,
    ylabel: str,
    maximize_y: bool = False,
    title: str = "",
    front: bool = True,
) -> bytes:
    """Scatter of SAEs coloured by architecture, with their Pareto front drawn as a line (unless
    ``front`` is False) and each point's 95 % intervals over seeds as error bars."""
    return _png(
        pareto_figure(points, ylabel=ylabel, maximize_y=maximize_y, title=title, front=front)
    )


def pareto_figure(
    points: Sequence[ParetoPoint],
    *,
    ylabel: str,
    maximize_y: bool = False,
    title: str = "",
    front: bool = True,
) -> Figure:
    """The figure of :func:`pareto_png`."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    architectures = sorted({p.architecture for p in points})
    colours = {arch: f"C{i % 10}" for i, arch in enumerate(architectures)}
    for arch in architectures:
        mine = [p for p in points if p.architecture == arch]
        ax.scatter([p.x for p in mine], [p.y for p in mine], color=colours[arch], label=arch)
        barred = [p for p in mine if p.x_err is not None or p.y_err is not None]
        if barred:
            ax.errorbar(
                [p.x for p in barred],
                [p.y for p in barred],
                xerr=[_err(p.x_err) for p in barred],
                yerr=[_err(p.y_err) for p in barred],
                fmt="none",
                ecolor=colours[arch],
                capsize=3,
                linewidth=1,
            )
    on_front = pareto_front([(p.x, p.y) for p in points], maximize_y=maximize_y) if front else []
    if on_front:
        ax.plot(
            [points[i].x for i in on_front],
            [points[i].y for i in on_front],
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
    # L0 can span orders of magnitude across a sweep; a log axis then keeps small-L0 SAEs apart.
    xs = [p.x for p in points]
    if xs and min(xs) > 0 and max(xs) > 10 * min(xs):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel(ylabel)
    better = "higher" if maximize_y else "lower"
    ax.set_title(title or f"L0 vs {ylabel} (lower L0, {better} {ylabel} is better)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _err(half_width: float | None) -> float:
    """An error bar's half-width; none (or not finite) draws nothing."""
    return half_width if half_width is not None and math.isfinite(half_width) else 0.0


def training_curves_png(records_by_sae: Mapping[str, Sequence[Mapping[str, float]]]) -> bytes:
    """One panel per :data:`CURVE_METRICS` field against tokens, one line per SAE."""
    return _png(training_curves_figure(records_by_sae))


def training_curves_figure(records_by_sae: Mapping[str, Sequence[Mapping[str, float]]]) -> Figure:
    """The figure of :func:`training_curves_png`."""
    fig = Figure(figsize=(6.5, 3.0 * len(CURVE_METRICS)))
    axes = fig.subplots(len(CURVE_METRICS), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        for label, records in records_by_sae.items():
            rows = [r for r in records if metric in r and "tokens" in r]
            if rows:
                ax.plot([r["tokens"] for r in rows], [r[metric] for r in rows], label=label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_title("training curves", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("training tokens")
    fig.tight_layout()
    return fig
