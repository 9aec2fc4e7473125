"""The ``saelab graph`` job: load a replacement set and its model, build, prune and score the
graph of one prompt, write ``graph.json`` and ``index.html``, and run interventions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.analysis.graphs.build import Graph, build_graph
from saelab.analysis.graphs.config import GraphConfig
from saelab.analysis.graphs.export import graph_json
from saelab.analysis.graphs.interventions import (
    FeatureEdit,
    check_edit_bounds,
    check_edits,
    generate,
    measured_change,
    parse_edits,
    predicted_change,
)
from saelab.analysis.graphs.prompts import prompt_input_ids, token_strings
from saelab.analysis.graphs.prune import prune, scores_with_pruning
from saelab.atomic import write_folder_atomically, write_json
from saelab.errors import SaelabError

GRAPH_FILES = ("graph.json", "index.html")


@dataclass
class GraphResult:
    """What ``run_graph`` measured."""

    out: Path
    graph: Graph
    scores: dict[str, float]
    n_kept_nodes: int
    n_kept_edges: int
    seconds: float
    logit_strings: list[str]
    edits: list[FeatureEdit] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)
    generated: dict[str, str] = field(default_factory=dict)


def _target_ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    ids = []
    for text in tokens:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise SaelabError(
                f"--target-logits token {text!r} is {len(encoded)} tokens, not one; give single "
                "tokens (a leading space is part of a token: ' a')"
            )
        ids.append(int(encoded[0]))
    return ids


def _details(replacement_dir: Path, graph: Graph, keep: torch.Tensor) -> dict:
    """``{(layer, feature): details}`` of the kept features, from ``saelab features`` output."""
    from saelab.analysis.graphs.details import feature_details

    by_layer: dict[int, list[int]] = {}
    for j in keep.nonzero().flatten().tolist():
        if j < graph.n_features:
            layer, _, fid = (int(v) for v in graph.features[j])
            by_layer.setdefault(layer, []).append(fid)
    out = {}
    for layer, fids in by_layer.items():
        for fid, info in feature_details(replacement_dir, layer, sorted(set(fids))).items():
            out[(layer, int(fid))] = info
    return out


def run_graph(
    replacement_dir: str | Path,
    cfg: GraphConfig,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    out: str | Path = "runs/graph",
    progress: bool = True,
) -> GraphResult:
    """Build, prune and score the graph of ``cfg.prompt``; write ``out/graph.json`` and
    ``out/index.html``; with edits, measure them in the unfrozen model (nothing is written when
    an input is bad)."""
    from saelab.models.loading import load_model
    from saelab.saes.replacement import load_replacement

    start = time.perf_counter()
    edits = parse_edits(cfg.ablate, cfg.scale, cfg.clamp)
    if cfg.generate and not edits:
        raise SaelabError("--generate needs an edit (--ablate, --scale or --clamp) to compare")
    replacement = load_replacement(replacement_dir, device=device)
    model, tokenizer = load_model(model_name or replacement.model, device=device)
    replacement.check_model(model)
    input_ids = prompt_input_ids(model, tokenizer, cfg.prompt)
    check_edit_bounds(replacement, input_ids.shape[1], edits)  # before the long work
    targets = cfg.n_target_logits
    target = targets if targets is not None else _target_ids(tokenizer, cfg.target_tokens)
    graph = build_graph(
        model,
        tokenizer,
        replacement,
        cfg.prompt,
        target_tokens=target,
        desired_prob=cfg.logit_prob,
        max_features=cfg.max_features,
        batch_size=cfg.batch_size,
        max_adjacency_mb=cfg.max_adjacency_mb,
        input_ids=input_ids,
        progress=progress,
    )
    check_edits(graph, replacement, edits)
    pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold)
    scores = scores_with_pruning(graph, pruned)
    tokens = token_strings(tokenizer, graph.input_ids)
    logit_strings = token_strings(tokenizer, graph.logit_tokens)
    details = _details(Path(replacement_dir), graph, pruned.node_mask)
    data = graph_json(
        graph,
        pruned,
        scores,
        tokens=tokens,
        logit_strings=logit_strings,
        model=model_name or replacement.model,
        replacement=str(replacement_dir),
        node_threshold=cfg.node_threshold,
        edge_threshold=cfg.edge_threshold,
        details=details,
    )
    result = GraphResult(
        Path(out),
        graph,
        scores,
        int(pruned.node_mask.sum()),
        int(pruned.edge_mask.sum()),
        0.0,
        logit_strings,
        edits,
    )
    if edits:
        result.predicted = predicted_change(graph, edits).tolist()
        change, _ = measured_change(model, replacement, graph, graph.errors, edits)
        result.measured = change.tolist()
        data["metadata"]["intervention"] = {
            "edits": [str(e) for e in edits],
            "tokens": logit_strings,
            "predicted": result.predicted,
            "measured": result.measured,
        }
        if cfg.generate:
            for name, chosen in (("clean", []), ("edited", edits)):
                new = generate(model, replacement, graph, graph.errors, chosen, cfg.generate)
                result.generated[name] = tokenizer.decode(new)
            data["metadata"]["intervention"]["generated"] = result.generated
    from saelab.analysis.graphs.page import write_graph_page

    with write_folder_atomically(out, "graph") as tmp:
        write_json(Path(tmp) / "graph.json", data)
        write_graph_page(Path(tmp), data)
    result.seconds = time.perf_counter() - start
    return result


def format_graph_report(result: GraphResult) -> str:
    """The lines ``saelab graph`` prints: size, the two scores, interventions."""
    g, s = result.graph, result.scores
    lines = [
        f"graph of {g.n_pos} tokens: {g.n_features} feature nodes (of {g.n_active} active), "
        f"{g.n_errors} error nodes, {g.n_logits} logits; kept {result.n_kept_nodes} nodes, "
        f"{result.n_kept_edges} edges ({result.seconds:.1f} s)",
        f"replacement score {s['replacement']:.3f}  completeness score {s['completeness']:.3f}"
        f"  (pruned: {s['pruned_replacement']:.3f} / {s['pruned_completeness']:.3f})",
    ]
    if result.edits:
        lines.append(f"intervention: {', '.join(str(e) for e in result.edits)}")
        lines.append(f"  {'token':>14}  {'predicted':>10}  {'measured':>10}")
        for tok, p, m in zip(result.logit_strings, result.predicted, result.measured, strict=True):
            lines.append(f"  {tok!r:>14}  {p:+10.3f}  {m:+10.3f}")
        for name, text in result.generated.items():
            lines.append(f"  generated ({name}): {text!r}")
    return "\n".join(lines)
