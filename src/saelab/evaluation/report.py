"""``saelab report``: one self-contained HTML page (and its PNGs) comparing saved SAEs.

Inputs per SAE folder (any folder with ``cfg.json``): ``cfg.json``, ``metrics.json`` (from
``saelab eval``) and ``sparsity.safetensors`` when present, and the ``train_log.jsonl`` of the run
folder above it. Anything missing only leaves that SAE out of the plots that need it, with a note
in the log and on the page; the images are embedded as data URIs, so the page works when moved.
SAEs that differ only by seed (``saelab sweep --seeds``: folders ``...-seedN``) are drawn as one
point at their mean with 95 % intervals as error bars. A ``bench.json`` (``saelab bench``) in a
given folder, or in the SAEs' common parent, adds its metrics: one figure per benchmark metric
against L0, coloured by architecture, and a table of mean ± half-width per group of seeds.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.atomic import write_atomically, write_text
from saelab.errors import SaelabError
from saelab.evaluation.bench.intervals import mean_interval
from saelab.evaluation.bench.results import BENCH_FILENAME, group_of, read_bench
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.evaluation.plots import (
    ParetoPoint,
    density_histogram_png,
    pareto_png,
    training_curves_png,
)
from saelab.saes.storage import CFG_FILENAME, SPARSITY_FILENAME, find_sae_dirs, read_weights

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.json"
TRAIN_LOG_FILENAME = "train_log.jsonl"
INDEX_FILENAME = "index.html"

PARETO_PLOTS = (
    # (metrics.json key, axis label, higher is better, file name)
    ("fvu", "FVU", False, "pareto_fvu.png"),
    ("delta_ce", "ΔCE (nats)", False, "pareto_delta_ce.png"),
    ("ce_loss_recovered", "CE loss recovered", True, "pareto_ce_recovered.png"),
)
"""Quality measures plotted against L0, one Pareto figure each."""


@dataclass
class SAEEntry:
    """What the report knows about one saved SAE."""

    path: Path
    label: str
    """Shown on the page: the folder name, or a longer path when two folders share a name."""
    cfg: dict[str, Any]
    metrics: dict[str, Any] | None = None
    log10_density: torch.Tensor | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    """``train_log.jsonl`` records of this SAE (events left out)."""

    @property
    def architecture(self) -> str:
        own = self.cfg.get("saelab") or {}
        return str(own.get("architecture") or self.cfg.get("architecture") or "unknown")

    @property
    def hook(self) -> str:
        return str((self.cfg.get("metadata") or {}).get("hook_name") or "")


@dataclass(frozen=True)
class ReportImage:
    """One PNG of the report."""

    filename: str
    title: str
    png: bytes


def _labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, lengthened by parent folders until they are unique."""
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SaelabError(f"{path} is not valid JSON ({exc}); re-create it") from exc


def _read_train_log(path: Path) -> list[dict[str, Any]]:
    """Metric records of a ``train_log.jsonl``; events (resampling) and torn lines are skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
        if isinstance(record, dict) and "event" not in record and "sae" in record:
            records.append(record)
    return records


def load_entries(sae_dirs: Sequence[Path], notes: list[str]) -> list[SAEEntry]:
    """Read every SAE's files; what is missing is appended to ``notes`` (and logged)."""

    def note(text: str) -> None:
        log.info("%s", text)
        notes.append(text)

    entries = []
    logs: dict[Path, list[dict[str, Any]]] = {}
    for path, label in zip(sae_dirs, _labels(sae_dirs), strict=True):
        cfg = _read_json(path / CFG_FILENAME)
        entry = SAEEntry(path=path, label=label, cfg=cfg if isinstance(cfg, dict) else {})
        if (path / METRICS_FILENAME).is_file():
            entry.metrics = _read_json(path / METRICS_FILENAME)
        else:
            note(f"{label}: no {METRICS_FILENAME} (run saelab eval); left out of the Pareto plots")
        if (path / SPARSITY_FILENAME).is_file():
            try:
                entry.log10_density = read_weights(path / SPARSITY_FILENAME)["sparsity"]
            except (SaelabError, KeyError) as exc:
                note(f"{label}: unreadable {SPARSITY_FILENAME} ({exc}); no density histogram")
        else:
            note(f"{label}: no {SPARSITY_FILENAME}; no density histogram")
        run_log = path.parent / TRAIN_LOG_FILENAME
        if run_log.is_file():
            if path.parent not in logs:
                logs[path.parent] = _read_train_log(run_log)
            entry.curve = [r for r in logs[path.parent] if r["sae"] == path.name]
        entries.append(entry)
    return entries


def _finite(metrics: dict[str, Any] | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def build_figures(entries: Sequence[SAEEntry], notes: list[str]) -> list[ReportImage]:
    """Every PNG the entries allow: Pareto fronts, training curves, a density histogram per SAE."""
    figures = []
    groups: dict[str, list[SAEEntry]] = {}
    for entry in entries:  # seeds of one configuration become one point with error bars
        groups.setdefault(group_of(str(entry.path), {}), []).append(entry)
    for key, ylabel, maximize, filename in PARETO_PLOTS:
        points = []
        for members in groups.values():
            xs, ys = [], []
            for entry in members:
                x, y = _finite(entry.metrics, "l0"), _finite(entry.metrics, key)
                if x is not None and y is not None:
                    xs.append(x)
                    ys.append(y)
                elif entry.metrics is not None:
                    notes.append(f"{entry.label}: metrics.json lacks a finite l0 or {key}")
                    log.info("%s", notes[-1])
            if xs:
                label = members[0].label if len(members) == 1 else f"{members[0].label} ×{len(xs)}"
                points.append(_point(label, members[0].architecture, xs, ys))
        if points:
            png = pareto_png(points, ylabel=ylabel, maximize_y=maximize)
            figures.append(ReportImage(filename, f"L0 vs {ylabel}", png))
    curves = {entry.label: entry.curve for entry in entries if entry.curve}
    if curves:
        figures.append(
            ReportImage("training_curves.png", "Training curves", training_curves_png(curves))
        )
    for i, entry in enumerate(entries):
        if entry.log10_density is not None:
            png = density_histogram_png(entry.label, entry.log10_density)
            figures.append(
                ReportImage(f"density_{i:03d}.png", f"Feature density: {entry.label}", png)
            )
    return figures


def _point(label: str, architecture: str, xs: list[float], ys: list[float]) -> ParetoPoint:
    """One point at the mean of the seeds' values, with their 95 % half-widths (none for one)."""
    (x, x_err), (y, y_err) = mean_interval(xs), mean_interval(ys)
    if len(xs) == 1:
        x_err = y_err = None
    return ParetoPoint(label, architecture, x, y, x_err, y_err)


def bench_figures(doc: dict[str, Any], notes: list[str]) -> list[ReportImage]:
    """One figure per benchmark metric of a ``bench.json`` (those not in :data:`METRIC_KEYS`):
    the metric against L0 per group of seeds, coloured by architecture, with 95 % intervals.
    L0 is the group's ``l0`` metric (``bench core``), else its members' ``info.l0``."""
    figures = []
    metrics = [m for m in doc.get("summary", {}) if m not in METRIC_KEYS]
    for i, metric in enumerate(metrics):
        points = []
        for name, group in doc.get("groups", {}).items():
            stat = group["metrics"].get(metric)
            l0_stat = group["metrics"].get("l0")
            l0s = [doc["saes"][k]["info"].get("l0") for k in group["members"]]
            l0s = [v for v in l0s if isinstance(v, int | float)]
            if stat is None or stat.get("mean") is None or (l0_stat is None and not l0s):
                continue
            x, x_err = (l0_stat["mean"], l0_stat["half_width"]) if l0_stat else mean_interval(l0s)
            arch = str(group["info"].get("architecture") or "unknown")
            label = Path(name).name
            points.append(ParetoPoint(label, arch, x, stat["mean"], x_err, stat["half_width"]))
        if points:
            resolves = doc["summary"][metric].get("smallest_resolvable_difference")
            shown = "n/a" if resolves is None else f"{resolves:.3g}"
            title = f"{metric} vs L0 (95 % intervals over seeds; resolves {shown})"
            png = pareto_png(points, ylabel=metric, title=title, front=False)
            figures.append(ReportImage(f"bench_{i:03d}.png", f"{metric} vs L0", png))
        else:
            notes.append(f"bench.json: no group has {metric} and an L0; not plotted")
    return figures


def bench_table(doc: dict[str, Any]) -> list[str]:
    """HTML rows: a group of seeds per row, ``mean ± half-width`` per benchmark metric, then the
    smallest difference each metric resolves."""
    esc = html.escape
    metrics = list(doc.get("summary", {}))
    rows = ["<table><tr><th>group</th><th>seeds</th>"]
    rows[0] += "".join(f"<th>{esc(m)}</th>" for m in metrics) + "</tr>"
    for name, group in doc.get("groups", {}).items():
        cells = [esc(Path(name).name), esc(str(len(group["members"])))]
        for metric in metrics:
            stat = group["metrics"].get(metric) or {}
            mean, half = stat.get("mean"), stat.get("half_width")
            text = (
                "" if mean is None else f"{mean:.4g}" + ("" if half is None else f" ± {half:.2g}")
            )
            cells.append(esc(text))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    resolves = [doc["summary"][m].get("smallest_resolvable_difference") for m in metrics]
    rows.append(
        "<tr><td>resolves</td><td></td>"
        + "".join(f"<td>{'' if r is None else esc(f'{r:.3g}')}</td>" for r in resolves)
        + "</tr></table>"
    )
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def render_html(
    entries: Sequence[SAEEntry],
    figures: Sequence[ReportImage],
    notes: Sequence[str],
    bench_rows: Sequence[str] = (),
) -> str:
    """The page: the metrics table, the benchmark table (``bench_rows``, from
    :func:`bench_table`), every figure as a base64 data URI, and the notes."""
    esc = html.escape
    head = ["SAE", "architecture", "hook", "d_sae", *METRIC_KEYS]
    rows = []
    for entry in entries:
        metrics = entry.metrics or {}
        cells = [entry.label, entry.architecture, entry.hook, entry.cfg.get("d_sae")]
        cells += [metrics.get(key) for key in METRIC_KEYS]
        rows.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    images = []
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        images.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(figure.title)}">'
            f"<figcaption>{esc(figure.title)}</figcaption></figure>"
        )
    note_items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>saelab report</title>',
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}"
            "td:first-child{text-align:left}figure{display:inline-block;margin:1em}</style>",
            "</head><body>",
            f"<h1>saelab report: {len(entries)} SAE(s)</h1>",
            "<h2>Metrics</h2>",
            "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>",
            *rows,
            "</table>",
            *(
                ["<h2>Benchmarks (mean ± 95 % interval over seeds)</h2>", *bench_rows]
                if bench_rows
                else []
            ),
            "<h2>Figures</h2>",
            *images,
            *(["<h2>Notes</h2>", f"<ul>{note_items}</ul>"] if notes else []),
            "</body></html>",
            "",
        ]
    )


def write_report(dirs: Iterable[str | Path], out_dir: str | Path) -> Path:
    """Find the SAEs under ``dirs``, write their PNGs and ``index.html`` to ``out_dir``."""
    out_dir = Path(out_dir)
    notes: list[str] = []
    # Resolved: the page labels SAEs by their trailing folder names.
    dirs = list(dirs)
    entries = load_entries([d.resolve() for d in find_sae_dirs(dirs)], notes)
    figures = build_figures(entries, notes)
    bench_rows: list[str] = []
    bench = _find_bench(dirs, entries)
    if bench is not None:
        doc = read_bench(bench)
        figures += bench_figures(doc, notes)
        bench_rows = bench_table(doc)
        notes.append(f"benchmark metrics from {bench}")
    for figure in figures:
        png = figure.png
        write_atomically(out_dir / figure.filename, lambda p, png=png: p.write_bytes(png))
    index = write_text(out_dir / INDEX_FILENAME, render_html(entries, figures, notes, bench_rows))
    log.info("report on %d SAE(s) with %d figure(s) in %s", len(entries), len(figures), index)
    return index


def _find_bench(dirs: Sequence[str | Path], entries: Sequence[SAEEntry]) -> Path | None:
    """The ``bench.json`` in one of ``dirs``, else in the SAE folders' common parent."""
    import os

    candidates = [Path(d) / BENCH_FILENAME for d in dirs]
    if entries:
        common = os.path.commonpath([str(e.path.parent) for e in entries])
        candidates.append(Path(common) / BENCH_FILENAME)
    return next((c for c in candidates if c.is_file()), None)
