"""The attribution graph page as text: escaping of hostile token strings, the embedded JSON read
back unchanged, the score line, bad graphs refused with nothing written. Graphs are made by hand
(:func:`fake_graph`) with the ``graph.json`` schema, so these tests need no model; the browser
tests (``test_page_browser.py``) use the same fake graph."""

from __future__ import annotations

import html
import json
import random
import re
from html.parser import HTMLParser

import pytest

from saelab.analysis.graphs.page import DATA_ID, graph_page, write_graph_page
from saelab.errors import SaelabError

EVIL = "<script>window.__pwned=1</script>"
EVIL_CLOSE = '"</script>"'
EVIL_ATTR = '" onmouseover="window.__pwned=1" x="'
ALERT = "<script>alert(1)</script>"
PROMPT_TOKENS = ["<bos>", EVIL, EVIL_CLOSE, " the", EVIL_ATTR, "\n", " a"]
N_LAYERS = 4
NODE_THRESHOLD = 0.8


def fake_graph(seed: int = 0, n_features: int = 36, n_links: int = 140) -> dict:
    """A graph in the ``graph.json`` schema over :data:`PROMPT_TOKENS` and :data:`N_LAYERS`
    layers: an embedding per position, random features and an error node per (layer, position)
    with influence in [0, 1] (kept iff ≤ :data:`NODE_THRESHOLD`, but every seventh feature
    is not), two logits at the last
    position (one a hostile token), random links from lower to higher rows with weights of both
    signs (kept iff both ends are kept, but every tenth is not). Feature ``0_1_1``'s details
    hold hostile tokens."""
    rng = random.Random(seed)
    last = len(PROMPT_TOKENS) - 1
    nodes = [
        {
            "node_id": f"T_{p}",
            "feature_type": "embedding",
            "layer": -1,
            "ctx_idx": p,
            "feature": None,
            "token": tok,
            "activation": None,
            "influence": None,
            "kept": True,
        }
        for p, tok in enumerate(PROMPT_TOKENS)
    ]
    seen = set()
    features = [(0, 1, 1)]  # layer, feature id, position: one with details
    while len(features) < n_features:
        f = (rng.randrange(N_LAYERS), rng.randrange(100), rng.randrange(len(PROMPT_TOKENS)))
        if f not in seen and f != features[0]:
            seen.add(f)
            features.append(f)
    for i, (layer, fid, pos) in enumerate(features):
        influence = 0.05 if i == 0 else round(rng.random(), 4)
        node = {
            "node_id": f"{layer}_{fid}_{pos}",
            "feature_type": "transcoder",
            "layer": layer,
            "ctx_idx": pos,
            "feature": fid,
            "token": PROMPT_TOKENS[pos],
            "activation": round(rng.uniform(0.1, 5), 4),
            "influence": influence,
            # Every seventh within the threshold dropped, as the builder drops a node left
            # without edges.
            "kept": influence < NODE_THRESHOLD and i % 7 != 6,
        }
        if i == 0:
            node["details"] = {
                "density": 0.0123,
                "max_act": 4.5,
                "top_examples": [
                    {"tokens": ["x", ALERT, EVIL_ATTR, " y"], "acts": [0.0, 4.5, 1.0, 0.0]},
                    {"tokens": [EVIL_CLOSE, " z"], "acts": [2.0, 0.5], "max_index": 0},
                ],
                "logit_effects": {
                    "promoted": [[ALERT, 1.5], [" a", 1.25]],
                    "suppressed": [[EVIL_ATTR, -0.75]],
                },
            }
        nodes.append(node)
    for layer in range(N_LAYERS):
        for pos in range(0, len(PROMPT_TOKENS), 2):
            influence = round(rng.random(), 4)
            nodes.append(
                {
                    "node_id": f"E_{layer}_{pos}",
                    "feature_type": "mlp reconstruction error",
                    "layer": layer,
                    "ctx_idx": pos,
                    "feature": None,
                    "token": PROMPT_TOKENS[pos],
                    "activation": round(rng.uniform(0.1, 2), 4),
                    "influence": influence,
                    "kept": influence < NODE_THRESHOLD,
                }
            )
    for token_id, token, prob in ((7, " a", 0.4), (9, ALERT, 0.2)):
        nodes.append(
            {
                "node_id": f"L_{token_id}_{last}",
                "feature_type": "logit",
                "layer": N_LAYERS,
                "ctx_idx": last,
                "feature": None,
                "token": token,
                "activation": round(prob * 10, 3),
                "influence": None,
                "token_prob": prob,
                "is_target_logit": True,
                "kept": True,
            }
        )
    links, pairs = [], set()
    while len(links) < n_links:
        a, b = rng.sample(nodes, 2)
        if a["layer"] > b["layer"]:
            a, b = b, a
        if a["layer"] == b["layer"] or a["ctx_idx"] > b["ctx_idx"]:
            continue
        if (a["node_id"], b["node_id"]) in pairs:
            continue
        pairs.add((a["node_id"], b["node_id"]))
        weight = round(rng.choice((-1, 1)) * rng.uniform(0.01, 2), 4)
        kept = a["kept"] and b["kept"] and len(links) % 10 != 9
        links.append(
            {"source": a["node_id"], "target": b["node_id"], "weight": weight, "kept": kept}
        )
    return {
        "format": "saelab-graph",
        "version": 1,
        "metadata": {
            "prompt": "".join(PROMPT_TOKENS[1:]),
            "prompt_tokens": PROMPT_TOKENS,
            "model": f"tiny {EVIL}",
            "replacement": f"runs/{EVIL_ATTR}",
            "kind": "per_layer",
            "node_threshold": NODE_THRESHOLD,
            "edge_threshold": 0.98,
            "scores": {
                "replacement": 0.6123,
                "completeness": 0.8346,
                "pruned_replacement": 0.5,
                "pruned_completeness": 0.75,
            },
            "n_layers": N_LAYERS,
        },
        "nodes": nodes,
        "links": links,
    }


def drawn_nodes(graph: dict, node_threshold: float) -> set[str]:
    """The nodes the page draws at ``node_threshold``, by the rule its docstring states (the
    saved threshold is the graph's)."""
    saved = graph["metadata"].get("node_threshold", 0.8)
    out = set()
    for n in graph["nodes"]:
        kept = n.get("kept", True)
        within = n.get("influence") is not None and n["influence"] < node_threshold
        if n["feature_type"] in ("embedding", "logit") or abs(node_threshold - saved) < 1e-9:
            drawn = kept
        else:
            drawn = (kept and within) if node_threshold < saved else (kept or within)
        if drawn:
            out.add(n["node_id"])
    return out


def drawn_links(graph: dict, node_threshold: float, share: float) -> list[dict]:
    """The links the page draws: both ends drawn, kept or with an end not kept, the strongest
    carrying ``share`` of their total |weight|."""
    nodes = drawn_nodes(graph, node_threshold)
    kept = {n["node_id"]: n.get("kept", True) for n in graph["nodes"]}
    cand = [
        e
        for e in graph["links"]
        if e["source"] in nodes
        and e["target"] in nodes
        and (e.get("kept", True) or not kept[e["source"]] or not kept[e["target"]])
    ]
    cand.sort(key=lambda e: -abs(e["weight"]))
    if share >= 1:
        return cand
    total, out, cum = sum(abs(e["weight"]) for e in cand), [], 0.0
    for e in cand:
        if share <= 0 or cum >= share * total:
            break
        out.append(e)
        cum += abs(e["weight"])
    return out


def parsed_tags(text: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every start tag of ``text`` with its attributes, as :mod:`html.parser` reads them."""
    tags = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, attrs))

    Tags().feed(text)
    return tags


def embedded(text: str) -> dict:
    found = re.findall(
        rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S
    )
    assert len(found) == 1
    return json.loads(found[0])


def test_embedded_json_reads_back_as_the_graph():
    graph = fake_graph()
    text = graph_page(graph)
    back = embedded(text)
    assert back == graph
    assert len(back["nodes"]) == len(graph["nodes"])
    assert sum(n["kept"] for n in back["nodes"]) == len(drawn_nodes(graph, NODE_THRESHOLD))


def test_hostile_tokens_never_reach_the_page_as_markup():
    graph = fake_graph()
    text = graph_page(graph)
    # The page's own two scripts (the data and the code) are the only script elements.
    assert text.count("<script") == 2
    assert text.count("</script") == 2
    for bad in (EVIL, EVIL_CLOSE, EVIL_ATTR, ALERT):
        assert bad not in text
    # As a browser's parser reads it: no event-handler attribute, no extra element.
    tags = parsed_tags(text)
    assert not [(tag, name) for tag, attrs in tags for name, _ in attrs if name.startswith("on")]
    assert [tag for tag, _ in tags].count("script") == 2
    # Shown as text where the server writes them: title, prompt, tokens, metadata.
    assert html.escape(EVIL) in text
    assert html.escape(f"tiny {EVIL}") in text
    assert html.escape(f"runs/{EVIL_ATTR}", quote=True) in text
    assert text.count(f"<code class=t>{html.escape(EVIL)}</code>") == 1
    assert "<code class=t>⏎</code>" in text  # a newline token is drawn visibly
    # The code builds the DOM from data with textContent / setAttribute only.
    script = text.rsplit("<script>", 1)[1]
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "document.write" not in script and "eval(" not in script


def test_score_line_and_sliders_come_from_the_metadata():
    graph = fake_graph()
    text = graph_page(graph)
    for key, value in (
        ("replacement", "0.612"),
        ("completeness", "0.835"),
        ("pruned_replacement", "0.5"),
        ("pruned_completeness", "0.75"),
    ):
        assert f'<b data-score="{key}">{value}</b>' in text
    assert 'id="node-threshold" type="range" min="0" max="1" step="0.01" value="0.80"' in text
    kept_nodes = sum(n["kept"] for n in graph["nodes"])
    kept_links = sum(e["kept"] for e in graph["links"])
    assert f"{kept_nodes} of {len(graph['nodes'])} nodes and {kept_links} of" in text
    del graph["metadata"]["scores"]
    del graph["metadata"]["node_threshold"]
    text = graph_page(graph)
    assert '<b data-score="replacement">–</b>' in text
    assert 'value="0.80"' in text  # the default threshold


def test_write_graph_page_writes_index_html_atomically(tmp_path):
    graph = fake_graph()
    out = write_graph_page(tmp_path / "graph", graph)
    assert out == tmp_path / "graph" / "index.html"
    assert embedded(out.read_text()) == graph
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]  # no temp left
    graph["metadata"]["prompt"] = "again"
    write_graph_page(tmp_path / "graph", graph)
    assert embedded(out.read_text())["metadata"]["prompt"] == "again"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda g: g.update(format="saelab-circuit"), "not an attribution graph"),
        (lambda g: g.pop("links"), "lacks its 'nodes' and 'links'"),
        (lambda g: g["nodes"][0].pop("node_id"), "has no node_id"),
        (lambda g: g["links"][0].update(weight=float("nan")), "no finite weight"),
        (lambda g: g["links"][0].update(source="nowhere"), "unknown nodes ['nowhere']"),
    ],
)
def test_bad_graphs_are_one_line_errors_and_nothing_is_written(tmp_path, edit, message):
    graph = fake_graph(n_features=4, n_links=10)
    edit(graph)
    with pytest.raises(SaelabError, match=re.escape(message)) as info:
        write_graph_page(tmp_path / "graph", graph)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "graph").exists()


def test_non_finite_numbers_are_embedded_as_null_so_the_script_can_parse_them():
    graph = fake_graph(n_features=4, n_links=10)
    graph["nodes"][-1]["activation"] = float("nan")
    graph["metadata"]["scores"]["completeness"] = float("inf")
    text = graph_page(graph)
    data = re.search(rf'id="{DATA_ID}">(.*?)</script>', text, re.S).group(1)

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    back = json.loads(data, parse_constant=refuse)  # as strict as JSON.parse
    assert back["nodes"][-1]["activation"] is None
    assert back["metadata"]["scores"]["completeness"] is None
    assert '<b data-score="completeness">–</b>' in text


def test_intervention_is_shown_with_predicted_and_measured_changes():
    graph = fake_graph(n_features=4, n_links=10)
    assert '<details class="intervention">' not in graph_page(graph)
    graph["metadata"]["intervention"] = {
        "edits": [f"0:1:1=0 {EVIL}"],
        "tokens": [" a", ALERT],
        "predicted": [-1.25, 0.5],
        "measured": [-1.0, 0.25],
    }
    text = graph_page(graph)
    assert ALERT not in text and EVIL not in text
    assert f"intervention 0:1:1=0 {html.escape(EVIL)}:" in text
    assert "<tr><td><code class=t>·a</code></td><td>-1.25</td><td>-1</td></tr>" in text
    assert f"<tr><td><code class=t>{html.escape(ALERT)}</code></td><td>0.5</td>" in text
