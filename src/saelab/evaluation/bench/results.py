"""``bench.json``: every suite's metrics per SAE, grouped over seeds, with 95 % intervals.

A suite returns ``{"suite": name, "saes": {key: {"metrics": {...}, "info": {...},
"details": {...}}}}`` (see :class:`~saelab.evaluation.bench.registry.Suite`). :func:`merge_results`
folds such results into one bench document; runs of several suites (or several ``saelab bench``
calls writing the same file) accumulate, a metric measured again replaces the old value.
:func:`summarise` groups the SAEs that differ only by seed (``info["group"]``, else the SAE
folder with a trailing ``-seedN`` removed) and gives each metric per group its mean, the 95 %
half-width over seeds (Student t) and the seeds, and per metric the smallest difference between
two groups that those seeds can resolve (:func:`~.intervals.smallest_resolvable_difference`).

Layout of ``bench.json``::

    {"saelab_version": ..., "suites": {"absorption": {"options": {...}, "metrics": [...]}},
     "saes": {KEY: {"info": {architecture, hook, l0, d_sae, seed, group}, "metrics": {m: v},
                    "suites": [suite, ...], "details": {suite: {...}}}},
     "groups": {GROUP: {"members": [KEY, ...], "seeds": [...], "info": {...},
                        "metrics": {m: {"mean", "half_width", "n", "values"}}}},
     "summary": {m: {"groups", "seeds_per_group", "smallest_resolvable_difference"}}}

Example:
    >>> bench = merge_results(None, absorption_result)
    >>> write_bench("runs/sweep/bench.json", bench)
    >>> read_bench("runs/sweep/bench.json")["groups"]
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from saelab import __version__
from saelab.atomic import write_json
from saelab.errors import SaelabError
from saelab.evaluation.bench.intervals import mean_interval, smallest_resolvable_difference

BENCH_FILENAME = "bench.json"

_SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def group_of(key: str, info: dict[str, Any]) -> str:
    """The group a result belongs to: ``info["group"]``, else ``key`` with its folder's trailing
    ``-seedN`` removed (``saelab sweep --seeds`` names seeds so)."""
    if info.get("group"):
        return str(info["group"])
    return _SEED_SUFFIX.sub("", key.rstrip("/"))


def seed_of(key: str, info: dict[str, Any]) -> int | None:
    """The seed of a result: ``info["seed"]``, else the ``-seedN`` suffix of its key."""
    if info.get("seed") is not None:
        return int(info["seed"])
    found = _SEED_SUFFIX.search(key.rstrip("/"))
    return int(found.group(1)) if found else None


def _clean(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def merge_results(
    bench: dict[str, Any] | None, result: dict[str, Any], options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``bench`` (a bench document, or None for a new one) with one suite's ``result`` folded in
    and the groups and summary recomputed. Returns a new document; ``bench`` is not changed."""
    doc: dict[str, Any] = json.loads(json.dumps(bench)) if bench else {}
    doc.setdefault("suites", {})
    doc.setdefault("saes", {})
    suite = str(result["suite"])
    names = list(dict.fromkeys(m for e in result["saes"].values() for m in e["metrics"]))
    doc["suites"][suite] = _clean({"options": dict(options or {}), "metrics": names})
    for key, entry in result["saes"].items():
        into = doc["saes"].setdefault(str(key), {"info": {}, "metrics": {}, "details": {}})
        into.setdefault("suites", [])
        if suite not in into["suites"]:
            into["suites"].append(suite)
        into["info"].update(_clean(dict(entry.get("info") or {})))
        into["metrics"].update(_clean({m: float(v) for m, v in entry["metrics"].items()}))
        if entry.get("details"):
            into["details"][suite] = _clean(entry["details"])
    return summarise(doc)


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``groups`` and ``summary`` recomputed from its ``saes`` (see the module)."""
    groups: dict[str, dict[str, Any]] = {}
    for key, entry in doc["saes"].items():
        name = group_of(key, entry["info"])
        group = groups.setdefault(name, {"members": [], "seeds": [], "info": {}, "metrics": {}})
        group["members"].append(key)
        group["seeds"].append(seed_of(key, entry["info"]))
        for field in ("architecture", "hook", "d_sae", "d_in", "model"):
            if field in entry["info"] and field not in group["info"]:
                group["info"][field] = entry["info"][field]
    metric_names = list(dict.fromkeys(m for e in doc["saes"].values() for m in e["metrics"]))
    values_of: dict[str, list[list[float]]] = {m: [] for m in metric_names}
    for group in groups.values():
        for metric in metric_names:
            values = [
                doc["saes"][k]["metrics"][metric]
                for k in group["members"]
                if doc["saes"][k]["metrics"].get(metric) is not None
            ]
            if not values:
                continue
            mean, half = mean_interval(values)
            group["metrics"][metric] = _clean(
                {"mean": mean, "half_width": half, "n": len(values), "values": values}
            )
            values_of[metric].append(values)
    summary = {}
    for metric, per_group in values_of.items():
        sizes = sorted(len(v) for v in per_group)
        summary[metric] = _clean(
            {
                "groups": len(per_group),
                "seeds_per_group": sizes[0] if sizes else 0,
                "smallest_resolvable_difference": smallest_resolvable_difference(*per_group),
            }
        )
    doc["saelab_version"] = __version__
    doc["groups"] = groups
    doc["summary"] = summary
    return doc


def read_bench(path: str | Path) -> dict[str, Any]:
    """A ``bench.json`` (a folder means the file in it); one-line error if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / BENCH_FILENAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SaelabError(f"{path}: no such file; run `saelab bench` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaelabError(f"{path}: not a bench.json ({exc}); remove it or pass another") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("saes"), dict):
        raise SaelabError(f"{path}: not a bench.json (no 'saes' table); remove it or pass another")
    return doc


def write_bench(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to ``path`` atomically (temp file beside it, then a rename)."""
    return write_json(path, _clean(doc))


def default_bench_path(sae_dirs: Sequence[Path]) -> Path:
    """Where ``bench.json`` goes by default: the SAE folders' common parent (the current folder
    when there are none)."""
    if not sae_dirs:
        return Path(BENCH_FILENAME)
    parent = os.path.commonpath([str(Path(d).resolve().parent) for d in sae_dirs])
    return Path(parent) / BENCH_FILENAME


def run_suites(
    names: Iterable[str],
    sae_dirs: Sequence[str | Path],
    *,
    options: dict[str, Any] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the suites ``names`` on ``sae_dirs`` (folders, globs or run folders), each with its
    options (``options[name]``, default its options class's defaults), merge their results into
    ``out`` (default :func:`default_bench_path`; an existing bench.json there is extended) and
    write it after each suite. Returns the bench document (``doc["path"]``: where it went)."""
    import dataclasses

    from saelab.evaluation.bench.registry import load_suites
    from saelab.outputs import check_output_location
    from saelab.saes.storage import find_sae_dirs

    suites = load_suites()
    chosen = [suites.lookup(name) for name in names]
    needs_dirs = any(s.needs_sae_dirs for s in chosen)
    dirs = find_sae_dirs(sae_dirs) if needs_dirs or sae_dirs else []
    path = Path(out) if out else default_bench_path(dirs)
    path = path / BENCH_FILENAME if path.is_dir() else path
    check_output_location(path, kind="file", what="--out")
    doc = read_bench(path) if path.exists() else None
    for suite in chosen:
        opts = (options or {}).get(suite.name) or suite.options()
        result = suite.run(dirs if suite.needs_sae_dirs else [], opts, progress=progress)
        doc = merge_results(doc, result, dataclasses.asdict(opts))
        write_bench(path, doc)
    assert doc is not None
    doc["path"] = str(path)
    return doc


def format_bench_table(doc: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """Groups as rows, metrics as columns: ``mean ± half-width`` (``±`` omitted for one seed),
    then a line per metric with the smallest difference the seeds resolve."""
    groups = doc["groups"]
    names = list(metrics or doc["summary"])
    labels = [f"#{i}" for i in range(1, len(groups) + 1)]
    lines = [
        f"{label} {name} (seeds: {len(g['members'])})"
        for label, (name, g) in zip(labels, groups.items(), strict=True)
    ]
    width = max((len(m) for m in names), default=6)
    lines.append(
        f"{'metric':<{width}}" + "".join(f"{label:>20}" for label in labels) + f"{'resolves':>12}"
    )
    for metric in names:
        cells = []
        for group in groups.values():
            stat = group["metrics"].get(metric)
            if stat is None or stat["mean"] is None:
                cells.append(f"{'-':>20}")
            elif stat["half_width"] is None:
                cells.append(f"{stat['mean']:>20.4g}")
            else:
                cells.append(f"{stat['mean']:>11.4g} ± {stat['half_width']:<6.2g}")
        resolves = doc["summary"][metric]["smallest_resolvable_difference"]
        lines.append(
            f"{metric:<{width}}"
            + "".join(cells)
            + (f"{resolves:>12.3g}" if resolves is not None else f"{'-':>12}")
        )
    return "\n".join(lines)
