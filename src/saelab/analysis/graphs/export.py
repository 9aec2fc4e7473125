"""A graph as ``graph.json`` (schema in ``docs/formats.md#graphjson``): close to the public
attribution-graph viewers' schema, so exporting to them is a field mapping."""

from __future__ import annotations

from typing import Any

from saelab.analysis.graphs.build import Graph
from saelab.analysis.graphs.prune import Pruned

FORMAT = "saelab-graph"
VERSION = 1


def graph_json(
    graph: Graph,
    pruned: Pruned,
    scores: dict[str, float],
    *,
    tokens: list[str],
    logit_strings: list[str],
    model: str,
    replacement: str,
    node_threshold: float,
    edge_threshold: float,
    details: dict[tuple[int, int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``graph.json`` dict. ``details``: ``{(layer, feature): details}`` from ``saelab
    features`` output. Nodes: all of the graph's; links: the edges that survived pruning."""
    rank = pruned.rank
    nodes: list[dict[str, Any]] = []
    ids: list[str] = []
    probs = graph.logit_probs.tolist()
    for j in range(graph.adjacency.shape[0]):
        node: dict[str, Any] = {"influence": float(rank[j]), "kept": bool(pruned.node_mask[j])}
        if j < graph.n_features:
            layer, pos, fid = (int(v) for v in graph.features[j])
            node_id = f"{layer}_{fid}_{pos}"
            node |= {
                "feature_type": "transcoder",
                "layer": layer,
                "ctx_idx": pos,
                "feature": fid,
                "token": tokens[pos],
                "activation": float(graph.activations[j]),
            }
            if details and (layer, fid) in details:
                node["details"] = details[(layer, fid)]
        elif j < graph.token_index(0):
            layer, pos = divmod(j - graph.n_features, graph.n_pos)
            node_id = f"E_{layer}_{pos}"
            node |= {
                "feature_type": "mlp reconstruction error",
                "layer": layer,
                "ctx_idx": pos,
                "feature": None,
                "token": tokens[pos],
                "activation": float(graph.error_norms[layer, pos]),
            }
        elif j < graph.logit_index(0):
            pos = j - graph.token_index(0)
            node_id = f"T_{pos}"
            node |= {
                "feature_type": "embedding",
                "layer": -1,
                "ctx_idx": pos,
                "feature": None,
                "token": tokens[pos],
                "activation": 1.0,
            }
        else:
            i = j - graph.logit_index(0)
            node_id = f"L_{graph.logit_tokens[i]}_{graph.n_pos - 1}"
            node |= {
                "feature_type": "logit",
                "layer": graph.n_layers,
                "ctx_idx": graph.n_pos - 1,
                "feature": None,
                "token": logit_strings[i],
                "activation": float(graph.logit_values[i]),
                "token_prob": float(probs[i]),
                "is_target_logit": True,
            }
        nodes.append({"node_id": node_id, **node})
        ids.append(node_id)
    targets, sources = (pruned.edge_mask & (graph.adjacency != 0)).nonzero(as_tuple=True)
    links = [
        {
            "source": ids[s],
            "target": ids[t],
            "weight": float(graph.adjacency[t, s]),
            "kept": bool(pruned.edge_mask[t, s]),
        }
        for t, s in zip(targets.tolist(), sources.tolist(), strict=True)
    ]
    metadata = {
        "prompt": graph.prompt,
        "prompt_tokens": tokens,
        "model": model,
        "replacement": replacement,
        "kind": graph.kind,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "scores": scores,
        "n_layers": graph.n_layers,
        "layers": graph.layers,
        "n_active_features": graph.n_active,
        "n_features": graph.n_features,
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "metadata": metadata,
        "nodes": nodes,
        "links": links,
    }
