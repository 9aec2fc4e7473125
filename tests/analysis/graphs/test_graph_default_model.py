"""The identities on the real SmolLM2-135M (float64) with a small set of random transcoders at
two of its 30 layers (the other layers' MLPs are error nodes): the frozen replacement model
reproduces the logits, and every target's edges plus its bias equal it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from graph_fixtures import tiny_replacement  # noqa: E402

from saelab.analysis.graphs.build import LocalReplacement, build_graph  # noqa: E402
from saelab.analysis.graphs.frozen import frozen_model  # noqa: E402
from saelab.models.loading import load_model  # noqa: E402

pytestmark = pytest.mark.slow


def test_smollm2_graph_identities_hold_in_float64():
    model, tokenizer = load_model("default")
    model = model.double()
    rep = tiny_replacement(model, layers=[3, 27])
    graph = build_graph(
        model, tokenizer, rep, "The function returns a", biases=True, target_tokens=2, batch_size=64
    )
    rows = list(range(graph.n_features)) + list(
        range(graph.logit_index(0), graph.adjacency.shape[0])
    )
    assert graph.n_features == graph.n_active == 2 * (graph.n_pos - 1) * 4
    total = graph.adjacency[rows].sum(1) + graph.biases[rows]
    assert (total - graph.values[rows]).abs().max() < 1e-8
    ids = torch.tensor([graph.input_ids])
    local = LocalReplacement(model, rep, ids)
    writes = local.writes()
    with torch.no_grad():
        clean = model(ids).logits
        with frozen_model(model, local.clean, lambda layer, x: writes[layer][None]):
            frozen = model(inputs_embeds=local.clean.embeds, use_cache=False).logits
    assert (frozen - clean).abs().max() < 1e-4  # SmolLM2's norms round through float32
