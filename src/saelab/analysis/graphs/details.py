"""What ``saelab features`` found about a graph's features, as the ``details`` of its nodes.

A replacement set's member folder is an SAE folder, so ``saelab features MEMBER_DIR`` saves its
statistics in ``MEMBER_DIR/features`` (:data:`~saelab.analysis.features.DEFAULT_STATS_DIRNAME`).
When they exist for a layer, :func:`feature_details` reads them (no model needed) and gives, per
feature: density, mean and max activation, its top examples (tokens and activations of each
context window) and the tokens its decoder direction promotes and suppresses. The graph page
(:mod:`saelab.analysis.graphs.page`) shows them when a node is clicked.

Statistics are used only when they were computed at the layer's input hook (the manifest's
``input_hook``): for a cross-layer set that is its one member's first layer.

Example:
    >>> feature_details("runs/replacement-30", 12, [345, 7])
    {345: {"density": 0.0021, "top_examples": [{"tokens": [...], "acts": [...], ...}], ...}, 7: ...}
    >>> add_feature_details_(graph, "runs/replacement-30")    # fills node["details"]; a count
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from saelab.analysis.features.stats import DEFAULT_STATS_DIRNAME, META_FILENAME, FeatureStats
from saelab.saes.replacement import find_replacement_dir, read_manifest

log = logging.getLogger(__name__)

N_EXAMPLES = 5
"""Top examples kept per feature."""
N_LOGITS = 10
"""Promoted and suppressed tokens kept per feature."""


def stats_dir(replacement_dir: str | Path, layer: int) -> tuple[Path | None, str]:
    """Where ``saelab features`` output for the features read at ``layer`` would be (the
    layer's member folder's ``features``; None when the set has no member at ``layer``), and
    the hook those features read."""
    folder = find_replacement_dir(replacement_dir)
    manifest = read_manifest(folder)
    members = {int(m["layer"]): m["folder"] for m in manifest["members"]}
    member = members.get(int(layer))
    hook = manifest["input_hook"].format(layer=int(layer))
    return (None if member is None else folder / member / DEFAULT_STATS_DIRNAME), hook


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _details(stats: FeatureStats, row: int, n_examples: int, n_logits: int) -> dict[str, Any]:
    promoted, suppressed = stats.logit_effects(row, n=n_logits)
    return {
        "density": _finite(stats.density[row]),
        "mean_act": _finite(stats.mean_act[row]),
        "max_act": _finite(stats.max_act[row]),
        "top_examples": [
            {
                "tokens": list(ex.tokens),
                "acts": [_finite(a) for a in ex.acts],
                "max_index": int(ex.max_index),
                "value": _finite(ex.value),
            }
            for ex in stats.top_examples(row, n=n_examples)
        ],
        "logit_effects": {
            "promoted": [[tok, _finite(v)] for tok, v in promoted],
            "suppressed": [[tok, _finite(v)] for tok, v in suppressed],
        },
    }


def feature_details(
    replacement_dir: str | Path,
    layer: int,
    feature_ids: Iterable[int],
    *,
    n_examples: int = N_EXAMPLES,
    n_logits: int = N_LOGITS,
) -> dict[int, dict[str, Any]]:
    """``{feature id: details}`` for the features of ``feature_ids`` read at ``layer``, from the
    ``saelab features`` output of that layer's member; ``{}`` when there is none (or it was
    computed at another hook). Features the statistics do not cover are left out.

    Details: ``density``, ``mean_act``, ``max_act``, ``top_examples`` (up to ``n_examples``
    dicts of ``tokens``, ``acts``, ``max_index``, ``value``, largest first) and
    ``logit_effects`` (``{"promoted": [[token, value], ...], "suppressed": [...]}``, up to
    ``n_logits`` each; empty lists when the member does not write to the residual stream).
    """
    where, hook = stats_dir(replacement_dir, layer)
    if where is None or not (where / META_FILENAME).is_file():
        return {}
    stats = FeatureStats.load(where)
    if stats.meta.get("hook") not in (None, hook):
        log.warning(
            "%s holds statistics of %s, not of %s: no feature details for layer %d",
            where,
            stats.meta.get("hook"),
            hook,
            layer,
        )
        return {}
    row_of = {int(f): i for i, f in enumerate(stats.feature_ids.tolist())}
    return {
        int(f): _details(stats, row_of[int(f)], n_examples, n_logits)
        for f in dict.fromkeys(int(f) for f in feature_ids)
        if int(f) in row_of
    }


def add_feature_details_(graph: dict[str, Any], replacement_dir: str | Path) -> int:
    """Set ``details`` on every feature node of ``graph`` (a ``graph.json`` dict) whose layer
    has ``saelab features`` output; returns how many nodes got them. Each layer's statistics
    are read once."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for node in graph["nodes"]:
        if node.get("feature") is not None and node.get("layer") is not None:
            by_layer.setdefault(int(node["layer"]), []).append(node)
    count = 0
    for layer, nodes in sorted(by_layer.items()):
        found = feature_details(replacement_dir, layer, (int(n["feature"]) for n in nodes))
        for node in nodes:
            details = found.get(int(node["feature"]))
            if details is not None:
                node["details"] = details
                count += 1
    return count
