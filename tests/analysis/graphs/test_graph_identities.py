"""The exact identities of the local replacement model (issue 13, deliverable 3), on tiny random
models of every supported family, in float64:

(a) with error nodes the frozen replacement model reproduces the clean logits;
(b) every target's incoming edges plus its constant term (a forward pass with every source at
    zero) equal its pre-activation or de-meaned logit;
(c) each edge equals a finite difference of its target through the frozen model;
(d) a node with no path to a logit has zero influence, and pruning keeps its promises;
and the graph's predicted intervention equals the change in the frozen, linearised model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from graph_fixtures import tiny_replacement  # noqa: E402

from saelab.analysis.graphs.build import LocalReplacement, Target, build_graph  # noqa: E402
from saelab.analysis.graphs.frozen import frozen_model  # noqa: E402
from saelab.analysis.graphs.interventions import (  # noqa: E402
    FeatureEdit,
    edited_model,
    predicted_change,
)
from saelab.analysis.graphs.prune import (  # noqa: E402
    influence,
    node_influence,
    normalised,
    prune,
    threshold_mask,
)
from saelab.errors import SaelabError  # noqa: E402
from tiny_models import build_tiny_model, tiny_input_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GRAPH_FAMILIES = ("gpt2", "gpt_neox", "llama", "gemma")
P = 6


def _rows(graph) -> list[int]:
    return list(range(graph.n_features)) + list(
        range(graph.logit_index(0), graph.adjacency.shape[0])
    )


@pytest.fixture(scope="module", params=GRAPH_FAMILIES)
def family_graph(request):
    model = build_tiny_model(request.param).double()
    rep = tiny_replacement(model)
    ids = tiny_input_ids(1, P, seed=3)
    graph = build_graph(model, None, rep, "w", input_ids=ids, biases=True, target_tokens=3)
    return model, rep, ids, graph


def test_frozen_replacement_with_errors_reproduces_the_clean_logits(family_graph):
    model, rep, ids, _ = family_graph
    local = LocalReplacement(model, rep, ids)
    writes = local.writes()  # b_dec + Σ a·decoder rows + error, rebuilt from the parts

    def mlp_fn(layer, x):
        skip = local._skip(layer, x)
        return writes[layer][None] if skip is None else writes[layer][None] + skip

    with torch.no_grad():
        clean = model(ids).logits  # the unpatched model (its own attention)
        with frozen_model(model, local.clean, mlp_fn):
            frozen = model(inputs_embeds=local.clean.embeds, use_cache=False).logits
        without_errors = local.writes(errors={k: 0 * v for k, v in local.errors.items()})
    assert (frozen - clean).abs().max() < 1e-6
    # the error nodes carry something: without them the writes differ
    assert max(float((writes[k] - without_errors[k]).abs().max()) for k in writes) > 1e-3


def test_incoming_edges_plus_bias_equal_every_target_exactly(family_graph):
    *_, graph = family_graph
    rows = _rows(graph)
    assert graph.n_features == graph.n_active > 20  # every active feature is a node
    total = graph.adjacency[rows].sum(1) + graph.biases[rows]
    assert (total - graph.values[rows]).abs().max() < 1e-10
    assert graph.adjacency[rows].abs().sum() > 1.0  # not trivially zero


def test_edges_equal_finite_differences_through_the_frozen_model(family_graph):
    model, rep, ids, graph = family_graph
    local = LocalReplacement(model, rep, ids)
    h = 1e-4

    def value(target: Target, acts=None, errors=None, embeds=None) -> float:
        writes = {k: v[None] for k, v in local.writes(acts, errors).items()}
        emb = local.clean.embeds if embeds is None else embeds
        with torch.no_grad():
            return float(local.forward([target], emb, writes)[0])

    last_feature = graph.n_features - 1  # a feature of the last layer: a target with inputs
    layer, pos, fid = (int(v) for v in graph.features[last_feature])
    targets = {
        last_feature: Target("feature", layer, pos, fid),
        graph.logit_index(0): Target("logit", graph.n_layers, P - 1, graph.logit_tokens[0]),
    }
    checked = 0
    for row, target in targets.items():
        # the strongest feature source, one error source and one token source of this row
        feats = graph.adjacency[row, : graph.n_features].abs().argmax().item()
        sl, sp, sf = (int(v) for v in graph.features[feats])
        up = {k: v.clone() for k, v in local.acts.items()}
        down = {k: v.clone() for k, v in local.acts.items()}
        a = float(local.acts[sl][sp, sf])
        up[sl][sp, sf] = a * (1 + h)
        down[sl][sp, sf] = a * (1 - h)
        fd = (value(target, acts=up) - value(target, acts=down)) / (2 * h)
        assert fd == pytest.approx(float(graph.adjacency[row, feats]), rel=1e-6, abs=1e-9)
        for el in range(graph.n_layers):
            col = graph.error_index(el, P - 2)
            if graph.adjacency[row, col] != 0:
                up = {k: v.clone() for k, v in local.errors.items()}
                down = {k: v.clone() for k, v in local.errors.items()}
                up[el][P - 2] *= 1 + h
                down[el][P - 2] *= 1 - h
                fd = (value(target, errors=up) - value(target, errors=down)) / (2 * h)
                assert fd == pytest.approx(float(graph.adjacency[row, col]), rel=1e-6, abs=1e-9)
                checked += 1
                break
        emb_up, emb_down = local.clean.embeds.clone(), local.clean.embeds.clone()
        emb_up[0, 1] *= 1 + h
        emb_down[0, 1] *= 1 - h
        fd = (value(target, embeds=emb_up) - value(target, embeds=emb_down)) / (2 * h)
        assert fd == pytest.approx(float(graph.adjacency[row, graph.token_index(1)]), rel=1e-6)
        checked += 2
    assert checked >= 5


def test_a_node_without_a_path_to_a_logit_has_zero_influence(family_graph):
    *_, graph = family_graph
    infl = node_influence(graph)
    last = graph.n_layers - 1
    dead = [
        j
        for j in range(graph.n_features)
        if graph.features[j, 0] == last and graph.features[j, 1] < P - 1
    ]
    dead += [graph.error_index(last, p) for p in range(P - 1)]
    assert dead and float(infl[dead].abs().max()) == 0.0
    live = [j for j in range(graph.n_features) if graph.features[j, 1] == P - 1]
    assert float(infl[live].max()) > 0
    # the series is (I − Â)⁻¹ − I
    A_hat = normalised(graph.adjacency)
    eye = torch.eye(A_hat.shape[0], dtype=torch.float64)
    exact = graph.logit_weights @ (torch.linalg.inv(eye - A_hat) - eye)
    assert torch.allclose(influence(A_hat, graph.logit_weights), exact, atol=1e-12)


def test_pruning_keeps_what_the_thresholds_promise(family_graph):
    *_, graph = family_graph
    scores = node_influence(graph)
    for t in (0.5, 0.8, 0.95):
        mask = threshold_mask(scores, t)
        kept, total = float(scores[mask].sum()), float(scores.sum())
        assert kept >= t * total - 1e-12
        smallest = scores[mask].min()  # without the weakest kept ones it would fall short
        assert kept - float(smallest) * int((scores[mask] == smallest).sum()) < t * total
    pruned = prune(graph, 0.8, 0.98)
    assert pruned.node_mask[graph.token_index(0) :].all()  # embeddings and logits stay
    assert not pruned.edge_mask[~pruned.node_mask].any()
    assert not pruned.edge_mask[:, ~pruned.node_mask].any()
    inner = graph.token_index(0)  # features and errors; the rest always stays
    at_threshold = threshold_mask(scores[:inner], 0.8)
    kept_inner = pruned.node_mask[:inner]
    assert not (kept_inner & ~at_threshold).any()
    assert bool((pruned.rank[: graph.token_index(0)][kept_inner] < 0.8).all())
    assert prune(graph, 1.0, 1.0).node_mask.sum() > prune(graph, 0.3, 0.5).node_mask.sum()


def test_left_out_features_fold_into_error_nodes_and_the_identity_holds():
    model = build_tiny_model("llama").double()
    rep = tiny_replacement(model)
    ids = tiny_input_ids(1, P, seed=3)
    graph = build_graph(
        model, None, rep, "w", input_ids=ids, biases=True, target_tokens=2, max_features=7
    )
    assert graph.n_features == 7 < graph.n_active
    rows = _rows(graph)
    total = graph.adjacency[rows].sum(1) + graph.biases[rows]
    assert (total - graph.values[rows]).abs().max() < 1e-10


@pytest.mark.parametrize("kind,skip", [("cross_layer", False), ("per_layer", True)])
def test_cross_layer_and_skip_transcoders_keep_the_identities(kind, skip):
    model = build_tiny_model("gpt2").double()
    rep = tiny_replacement(model, kind, skip=skip, layers=[0, 2] if kind == "per_layer" else None)
    ids = tiny_input_ids(1, P, seed=4)
    graph = build_graph(model, None, rep, "w", input_ids=ids, biases=True, target_tokens=2)
    rows = _rows(graph)
    total = graph.adjacency[rows].sum(1) + graph.biases[rows]
    assert (total - graph.values[rows]).abs().max() < 1e-10


def _frozen_linear_logits(local: LocalReplacement, graph, acts) -> torch.Tensor:
    """De-meaned target logits of the frozen model when each graph feature's activation follows
    its pre-activation (features in their linear region) and edited ones are held."""
    targets = [Target("logit", graph.n_layers, P - 1, t) for t in graph.logit_tokens]
    writes = {k: v[None].expand(len(targets), -1, -1) for k, v in local.writes(acts).items()}
    with torch.no_grad():
        return local.forward(targets, local.clean.embeds.expand(len(targets), -1, -1), writes)


def test_the_predicted_change_is_the_frozen_linear_models_change():
    model = build_tiny_model("gpt_neox").double()
    rep = tiny_replacement(model)
    ids = tiny_input_ids(1, P, seed=5)
    graph = build_graph(model, None, rep, "w", input_ids=ids, target_tokens=3)
    local = LocalReplacement(model, rep, ids)
    j = next(j for j in range(graph.n_features) if graph.features[j, 0] == 0)
    layer, pos, fid = (int(v) for v in graph.features[j])
    edit = FeatureEdit(layer, pos, fid, "scale", 0.3)
    predicted = predicted_change(graph, [edit])
    # propagate layer by layer: each later feature's activation = its new pre-activation
    acts = {k: v.clone() for k, v in local.acts.items()}
    acts[layer][pos, fid] *= 0.3
    for later in rep.layers[rep.layers.index(layer) + 1 :]:
        nodes = [i for i in range(graph.n_features) if graph.features[i, 0] == later]
        targets = [
            Target("feature", later, int(graph.features[i, 1]), int(graph.features[i, 2]))
            for i in nodes
        ]
        writes = {k: v[None].expand(len(targets), -1, -1) for k, v in local.writes(acts).items()}
        with torch.no_grad():
            pre = local.forward(targets, local.clean.embeds.expand(len(targets), -1, -1), writes)
        for t, v in zip(targets, pre, strict=True):
            acts[later][t.pos, t.index] = v
    actual = _frozen_linear_logits(local, graph, acts) - graph.logit_values
    assert actual.abs().max() > 1e-6
    assert torch.allclose(predicted, actual, atol=1e-9)


def test_the_edited_model_without_edits_is_the_clean_model_and_an_edit_moves_it():
    model = build_tiny_model("llama").double()
    rep = tiny_replacement(model)
    ids = tiny_input_ids(1, P, seed=5)
    graph = build_graph(model, None, rep, "w", input_ids=ids, target_tokens=3)
    with torch.no_grad():
        clean = model(ids).logits
        with edited_model(model, rep, graph.errors, P):
            same = model(ids).logits
        j = graph.n_features // 2
        edit = FeatureEdit(*(int(v) for v in graph.features[j]), "ablate")
        with edited_model(model, rep, graph.errors, P, [edit]):
            moved = model(ids).logits
    assert (same - clean).abs().max() < 1e-5  # Llama norms round through float32
    assert (moved - clean).abs().max() > 1e-6


def test_a_graph_over_the_memory_limit_is_built_in_chunks_and_keeps_the_identity():
    model = build_tiny_model("gemma").double()
    rep = tiny_replacement(model)
    ids = tiny_input_ids(1, P, seed=3)
    common = {"input_ids": ids, "biases": True, "target_tokens": 2, "max_features": 9}
    dense = build_graph(model, None, rep, "w", **common)
    rows_mb = (9 + 2) * (dense.n_active + dense.n_errors + P) * 4 / 2**20
    chunked = build_graph(model, None, rep, "w", max_adjacency_mb=rows_mb / 2, **common)
    assert chunked.n_features == 9 and chunked.adjacency.shape == dense.adjacency.shape
    rows = _rows(chunked)
    total = chunked.adjacency[rows].sum(1) + chunked.biases[rows]
    assert (total - chunked.values[rows]).abs().max() < 1e-10
    with pytest.raises(SaelabError, match="even folded"):
        build_graph(model, None, rep, "w", max_adjacency_mb=1e-6, **common)
