"""Influence, pruning and the graph scores of Ameisen et al. 2025 ("Circuit Tracing", §Appendix:
graph pruning and graph evaluation), written from the published definitions.

- ``Â``: ``|adjacency|`` with each row (a target's incoming edges) normalised to sum to 1.
- Influence: ``B = Â + Â² + … = (I − Â)⁻¹ − I`` (the graph is acyclic, so the series ends);
  a node's influence on the output is ``w B`` with ``w`` the target logits' probabilities.
- Node pruning keeps the nodes of highest influence that together carry ``node_threshold`` of
  the total (logit and embedding nodes always stay); edge pruning scores each edge by its
  normalised weight times its target's influence (plus the target's logit weight) and keeps the
  highest that carry ``edge_threshold``; nodes left without edges are then dropped.
- Replacement score: of the influence reaching the logits from the graph's inputs (embedding
  and error nodes), the fraction from embeddings. Completeness score: the fraction of every
  node's normalised input that comes from non-error nodes, averaged with weights influence +
  logit weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.analysis.graphs.build import Graph


def normalised(adjacency: Tensor) -> Tensor:
    """``|A|`` with each row scaled to sum 1 (rows with no incoming edges stay zero), float64."""
    A = adjacency.double().abs()
    return A / A.sum(1, keepdim=True).clamp_min(1e-300)


def influence(A_hat: Tensor, weights: Tensor) -> Tensor:
    """``w ((I − Â)⁻¹ − I)``: each node's influence through paths of every length, summed by
    iterating ``x ← x Â`` until nothing flows (at most N steps on an acyclic graph)."""
    x = weights.double()
    total = torch.zeros_like(x)
    for _ in range(A_hat.shape[0] + 1):
        x = x @ A_hat
        if not bool(x.any()):
            break
        total += x
    return total


def threshold_mask(scores: Tensor, threshold: float) -> Tensor:
    """The smallest set of highest ``scores`` whose sum reaches ``threshold`` of the total (ties
    at the cut all kept)."""
    flat = scores.flatten().double()
    total = float(flat.sum())
    if total <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    ordered = flat.sort(descending=True).values
    reach = ordered.cumsum(0) / total
    cut = int(torch.searchsorted(reach, torch.tensor(threshold, dtype=reach.dtype)))
    cut = min(cut, len(ordered) - 1)
    return scores >= ordered[cut]


@dataclass
class Pruned:
    """What survives pruning, and the influences it was decided by."""

    node_mask: Tensor
    """``[N]`` bool."""
    edge_mask: Tensor
    """``[N, N]`` bool (``[target, source]``)."""
    node_influence: Tensor
    """``[N]`` each node's influence on the logits (logit nodes: their probability)."""
    rank: Tensor
    """``[N]`` each feature or error node's place on the cumulative-influence curve (the share
    of the total carried by the nodes ranked above it): node pruning at threshold ``t`` keeps
    those below ``t``. Embeddings and logits (always kept): 0."""


def cumulative_rank(scores: Tensor) -> Tensor:
    """The share of ``scores``' total carried by the entries ranked above each one."""
    s = scores.double().clamp_min(0)
    total = float(s.sum()) or 1.0
    order = s.argsort(descending=True)
    before = torch.zeros_like(s)
    before[order] = (s[order].cumsum(0) - s[order]) / total
    return before


def node_influence(graph: Graph) -> Tensor:
    """``[N]`` influence on the target logits, logit nodes counted by their probability."""
    w = graph.logit_weights
    return influence(normalised(graph.adjacency), w) + w


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Node and edge masks for the given cumulative-influence thresholds (module docstring)."""
    w = graph.logit_weights
    scores = node_influence(graph)
    always = torch.zeros_like(scores, dtype=torch.bool)
    always[graph.token_index(0) :] = True  # embeddings and logits
    inner_scores = scores.masked_fill(always, 0)
    node_mask = threshold_mask(inner_scores, node_threshold) | always
    rank = cumulative_rank(inner_scores).masked_fill(always, 0)
    kept = graph.adjacency.double() * node_mask[:, None] * node_mask[None, :]
    A_hat = normalised(kept)
    edge_scores = A_hat * (influence(A_hat, w) + w)[:, None]
    edge_mask = threshold_mask(edge_scores, edge_threshold) & (kept != 0)
    inner = ~always  # features and errors need an edge out; features also one in
    is_feature = torch.zeros_like(node_mask)
    is_feature[: graph.n_features] = True
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        new = node_mask.clone()
        new[inner] &= edge_mask.any(0)[inner]
        new[is_feature] &= edge_mask.any(1)[is_feature]
        if bool((new == node_mask).all()):
            break
        node_mask = new
    return Pruned(node_mask, edge_mask, scores, rank)


def graph_scores(graph: Graph, adjacency: Tensor | None = None) -> dict[str, float]:
    """``{"replacement", "completeness"}`` of ``graph`` (or of the same nodes with
    ``adjacency``, e.g. the pruned one)."""
    A_hat = normalised(graph.adjacency if adjacency is None else adjacency)
    w = graph.logit_weights
    infl = influence(A_hat, w)
    errors = slice(graph.error_index(0, 0), graph.token_index(0))
    tokens = slice(graph.token_index(0), graph.logit_index(0))
    from_tokens, from_errors = float(infl[tokens].sum()), float(infl[errors].sum())
    replacement = from_tokens / max(from_tokens + from_errors, 1e-300)
    has_input = A_hat.sum(1) > 0
    non_error = torch.where(has_input, 1 - A_hat[:, errors].sum(1), torch.zeros_like(w))
    weight = (infl + w) * has_input
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-300))
    return {"replacement": replacement, "completeness": completeness}


def scores_with_pruning(graph: Graph, pruned: Pruned) -> dict[str, float]:
    """The two scores of the full graph and of the pruned one (``pruned_*``)."""
    full = graph_scores(graph)
    kept = graph.adjacency.double() * pruned.edge_mask
    cut = graph_scores(graph, kept)
    return {**full, **{f"pruned_{k}": v for k, v in cut.items()}}
