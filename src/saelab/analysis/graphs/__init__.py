"""Attribution graphs through a replacement set (issue 13; Ameisen et al. 2025): the public API.

``frozen`` (the model at a prompt with attention patterns and norm scales frozen), ``build``
(the local replacement model, batched backward passes, the adjacency), ``prune`` (influence,
node/edge thresholds, replacement and completeness scores), ``interventions`` (edits in the
unfrozen model and the graph's prediction), ``export`` (``graph.json``), ``run`` (the
``saelab graph`` job), ``config``; ``page`` and ``details`` draw the graph as ``index.html``.

Example:
    >>> from saelab.analysis.graphs import build_graph, prune, graph_scores
    >>> rep = load_replacement("runs/rep")
    >>> graph = build_graph(model, tokenizer, rep, "The function returns a")
    >>> pruned = prune(graph)                      # node 0.8, edge 0.98
    >>> graph_scores(graph)                        # {"replacement": ..., "completeness": ...}
"""

from saelab.analysis.graphs.build import Graph, LocalReplacement, Target, build_graph
from saelab.analysis.graphs.config import GraphConfig
from saelab.analysis.graphs.frozen import CleanRun, frozen_model, record_clean
from saelab.analysis.graphs.interventions import (
    FeatureEdit,
    measured_change,
    parse_edits,
    predicted_change,
)
from saelab.analysis.graphs.prune import (
    Pruned,
    graph_scores,
    influence,
    node_influence,
    normalised,
    prune,
    scores_with_pruning,
    threshold_mask,
)
from saelab.analysis.graphs.run import GraphResult, format_graph_report, run_graph

__all__ = [
    "CleanRun",
    "FeatureEdit",
    "Graph",
    "GraphConfig",
    "GraphResult",
    "LocalReplacement",
    "Pruned",
    "Target",
    "build_graph",
    "format_graph_report",
    "frozen_model",
    "graph_scores",
    "influence",
    "measured_change",
    "node_influence",
    "normalised",
    "parse_edits",
    "predicted_change",
    "prune",
    "record_clean",
    "run_graph",
    "scores_with_pruning",
    "threshold_mask",
]
