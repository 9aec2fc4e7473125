"""Feature details of a graph from real ``saelab features`` output: a replacement set of two
tiny random TopK transcoders on the tiny Llama (layers 0 and 1), statistics written for layer 0
only by :func:`write_feature_stats` into the member's ``features`` folder. The details must be
what :class:`FeatureStats` itself returns for those features (the oracle), the other layer none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from saelab.analysis.features import FeatureStats, write_feature_stats
from saelab.analysis.graphs.details import add_feature_details_, feature_details
from saelab.config import SAEConfig
from saelab.saes import TopKTranscoder, save_sae
from saelab.saes.replacement import write_replacement_manifest
from tiny_models import D_MODEL, N_LAYERS, build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

IN_HOOK, OUT_HOOK = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"
D_SAE = 32
COVERED = slice(0, 24)
"""The features layer 0's statistics were computed for (the rest are left out)."""


def tiny_replacement(folder: Path, words_file: Path, stats_layers=(0,)) -> Path:
    """A per-layer set of random TopK transcoders on layers 0 and 1 of the tiny Llama in
    ``folder``, with ``saelab features`` output (features :data:`COVERED`) for
    ``stats_layers``."""
    members = []
    for layer in (0, 1):
        cfg = SAEConfig(
            architecture="topk_transcoder",
            hook=IN_HOOK.format(layer=layer),
            output_hook=OUT_HOOK.format(layer=layer),
            k=4,
            width=D_SAE,
        )
        name = f"layer{layer}"
        save_sae(TopKTranscoder(cfg, d_in=D_MODEL, d_out=D_MODEL, seed=layer), folder / name)
        members.append((layer, name))
    write_replacement_manifest(
        folder,
        kind="per_layer",
        model="tiny-llama",
        n_layers=N_LAYERS,
        layers=[0, 1],
        input_hook=IN_HOOK,
        output_hook=OUT_HOOK,
        members=members,
    )
    for layer in stats_layers:
        write_feature_stats(
            folder / f"layer{layer}",
            model=build_tiny_model("llama"),
            tokenizer=build_tiny_tokenizer(),
            data=str(words_file),
            tokens=384,
            context=32,
            batch_size=4,
            top_k=8,
            n_quantile_examples=2,
            window=(4, 2),
            features=COVERED,
            progress=False,
        )
    return folder


@pytest.fixture(scope="module")
def replacement(tmp_path_factory, words_file):
    """(set folder, statistics of layer 0)."""
    folder = tiny_replacement(tmp_path_factory.mktemp("replacement") / "set", words_file)
    return folder, FeatureStats.load(folder / "layer0" / "features")


def test_details_are_what_the_statistics_say(replacement):
    folder, stats = replacement
    live = [f for f in range(COVERED.stop) if stats.fired[f] > 0]
    assert len(live) >= 3
    asked = [live[0], live[-1], live[0], 30]  # a repeat, and one the statistics do not cover
    details = feature_details(folder, 0, asked)
    assert sorted(details) == sorted({live[0], live[-1]})
    for f, d in details.items():
        row = stats.feature_ids.tolist().index(f)
        assert d["density"] == pytest.approx(float(stats.density[row]))
        assert d["max_act"] == pytest.approx(float(stats.max_act[row]))
        top = stats.top_examples(row)
        assert len(top) > 5 and len(d["top_examples"]) == 5
        for got, ex in zip(d["top_examples"], top[:5], strict=True):
            assert got["tokens"] == ex.tokens and got["max_index"] == ex.max_index
            assert got["acts"] == pytest.approx(ex.acts)
            assert got["value"] == pytest.approx(ex.value) == got["acts"][ex.max_index]
        values = [ex["value"] for ex in d["top_examples"]]
        assert values == sorted(values, reverse=True)
        promoted, suppressed = stats.logit_effects(row)
        assert len(promoted) == 10 == len(d["logit_effects"]["promoted"])
        assert d["logit_effects"] == {
            "promoted": [[t, pytest.approx(v)] for t, v in promoted],
            "suppressed": [[t, pytest.approx(v)] for t, v in suppressed],
        }
        assert json.loads(json.dumps(d)) == d  # plain JSON, ready for graph.json


def test_layers_without_statistics_have_no_details(replacement, tmp_path):
    folder, stats = replacement
    assert feature_details(folder, 1, [0, 1]) == {}  # a member with no features folder
    assert feature_details(folder, 2, [0]) == {}  # no member at all
    # Statistics of another hook (layer 0's copied into layer 1's member) are not used.
    other = tmp_path / "set"
    shutil.copytree(folder, other)
    shutil.copytree(other / "layer0" / "features", other / "layer1" / "features")
    assert feature_details(other, 1, [0, 1]) == {}
    assert feature_details(other, 0, [0]).keys() == ({0} if stats.fired[0] else set())


def test_add_feature_details_fills_the_nodes_of_covered_layers(replacement):
    folder, stats = replacement
    live = next(f for f in range(COVERED.stop) if stats.fired[f] > 0)

    def node(node_id, layer, feature, kind="transcoder"):
        return {"node_id": node_id, "feature_type": kind, "layer": layer, "feature": feature}

    graph = {
        "nodes": [
            node(f"0_{live}_1", 0, live),
            node(f"0_{live}_3", 0, live),
            node("0_30_2", 0, 30),  # not covered by the statistics
            node(f"1_{live}_1", 1, live),  # layer 1 has none
            node("E_0_1", 0, None, "mlp reconstruction error"),
            node("T_0", -1, None, "embedding"),
        ],
        "links": [],
    }
    assert add_feature_details_(graph, folder) == 2
    with_details = [n["node_id"] for n in graph["nodes"] if "details" in n]
    assert with_details == [f"0_{live}_1", f"0_{live}_3"]
    assert graph["nodes"][0]["details"] == feature_details(folder, 0, [live])[live]
