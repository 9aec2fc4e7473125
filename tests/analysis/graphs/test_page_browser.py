"""The attribution graph page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, ``make browser``) driven by Selenium (the ``browser`` fixture of
``tests/conftest.py``, as the dashboard's browser tests use it) opens ``index.html`` from a
``file://`` URL, so nothing could be fetched even if the page tried.

The graph is :func:`test_page.fake_graph`: hostile prompt tokens, feature details and metadata,
pruned and unpruned nodes, kept and dropped links. What the page draws is checked against the
rule its module docstring states, written again in ``test_page`` (``drawn_nodes``,
``drawn_links``). The last test draws a real graph: ``saelab graph``'s job
(:func:`~saelab.analysis.graphs.run_graph`) on the tiny Llama with random transcoders, one layer
with ``saelab features`` output. Screenshots go to ``test-artifacts/graph_page*.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from selenium.webdriver.common.keys import Keys
from test_details import tiny_replacement
from test_page import (
    ALERT,
    EVIL,
    EVIL_ATTR,
    EVIL_CLOSE,
    NODE_THRESHOLD,
    PROMPT_TOKENS,
    drawn_links,
    drawn_nodes,
    fake_graph,
)

from saelab.analysis.graphs.page import write_graph_page

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
DETAILED = "0_1_1"
"""The fake graph's feature node with details (layer 0, feature 1, position 1)."""


@pytest.fixture(scope="module")
def graph() -> dict:
    return fake_graph()


@pytest.fixture(scope="module")
def page_url(graph, tmp_path_factory) -> str:
    return write_graph_page(tmp_path_factory.mktemp("graph"), graph).as_uri()


@pytest.fixture
def opened(browser, page_url):
    """The page freshly loaded (sliders at their start, nothing selected)."""
    browser.get(page_url)
    return browser


def drawn_node_ids(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#graph g.node')).map(g => g.dataset.node)"
    )


def drawn_edges(driver) -> list[tuple[str, str]]:
    return [
        tuple(pair)
        for pair in driver.execute_script(
            "return Array.from(document.querySelectorAll('#graph path.edge'))"
            ".map(p => [p.dataset.source, p.dataset.target])"
        )
    ]


def pairs(links: list[dict]) -> list[tuple[str, str]]:
    return [(e["source"], e["target"]) for e in links]


def slider(driver, element_id: str, *keys: str) -> float:
    box = driver.find_element("id", element_id)
    box.send_keys(*keys)
    return float(box.get_attribute("value"))


def assert_clean(driver) -> None:
    """Nothing hostile ran or became an element or attribute, nothing was fetched, and no
    script failed."""
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.execute_script("return document.querySelectorAll('[onmouseover]').length") == 0
    assert driver.execute_script("return document.scripts.length") == 2
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors


def test_draws_the_kept_nodes_and_links_with_prompt_tokens_as_text(opened, graph):
    kept = {n["node_id"] for n in graph["nodes"] if n["kept"]}
    assert len(kept) < len(graph["nodes"])  # the fake graph has pruned nodes
    ids = drawn_node_ids(opened)
    assert len(ids) == len(set(ids)) and set(ids) == kept
    links = drawn_links(graph, NODE_THRESHOLD, 1.0)
    assert 0 < len(links) < len(graph["links"])
    assert sorted(drawn_edges(opened)) == sorted(pairs(links))
    counts = opened.find_element("id", "counts").text
    assert counts.startswith(f"{len(kept)} nodes · {len(links)} edges drawn")
    # Column labels: each prompt token, as text (the full token in the label's tooltip).
    titles = opened.execute_script(
        "return Array.from(document.querySelectorAll('text.tok-label title'))"
        ".map(t => t.textContent)"
    )
    shown = [t.replace("\n", "⏎") for t in PROMPT_TOKENS]
    assert titles == [f"position {p}: {tok}" for p, tok in enumerate(shown)]
    heading = opened.find_element("tag name", "h2").text
    assert EVIL in heading and EVIL_CLOSE in heading and EVIL_ATTR in heading
    assert EVIL in opened.find_element("css selector", "p.about").text  # the model name
    # Edge colour by sign, width growing with |weight|.
    strokes = opened.execute_script(
        "return Array.from(document.querySelectorAll('#graph path.edge'))"
        ".map(p => [p.getAttribute('stroke'), +p.getAttribute('stroke-width')])"
    )
    weight = {(e["source"], e["target"]): e["weight"] for e in graph["links"]}
    edges = drawn_edges(opened)
    for (colour, _), pair in zip(strokes, edges, strict=True):
        assert colour == ("#1a7f37" if weight[pair] >= 0 else "#b3261e")
    by_size = sorted(zip(edges, strokes, strict=True), key=lambda item: abs(weight[item[0]]))
    widths = [w for _, (_, w) in by_size]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert_clean(opened)


def test_clicking_a_node_shows_that_feature_with_its_examples(opened, graph):
    node = next(n for n in graph["nodes"] if n["node_id"] == DETAILED)
    opened.find_element("css selector", f'g.node[data-node="{DETAILED}"]').click()
    panel = opened.find_element("id", "panel")
    assert panel.find_element("tag name", "h3").text == "Feature 1 · layer 0 · position 1"

    def cell(key: str) -> str:
        return panel.find_element("css selector", f'td[data-key="{key}"]').text

    assert cell("feature") == "1" and cell("layer") == "0" and cell("position") == "1"
    assert cell("type") == "transcoder" and cell("token") == EVIL
    assert float(cell("activation")) == pytest.approx(node["activation"], rel=1e-3)
    assert float(cell("influence")) == pytest.approx(node["influence"], rel=1e-3)
    assert cell("kept") == "yes"
    contexts = panel.find_elements("css selector", ".examples .ctx")
    examples = node["details"]["top_examples"]
    assert [c.text for c in contexts] == ["".join(ex["tokens"]) for ex in examples]
    on = panel.find_elements("css selector", ".tok.on")
    assert [float(s.get_attribute("title")) for s in on] == [
        a for ex in examples for a in ex["acts"] if a > 0
    ]
    assert len(panel.find_elements("css selector", ".tok.mx")) == 1  # the one with max_index
    logits = panel.find_elements("css selector", "table.logits")
    assert [t.text.split("\n") for t in logits] == [
        ["promoted", f"{ALERT} 1.5", "·a 1.25"],
        ["suppressed", f"{EVIL_ATTR.replace(' ', '·')} -0.75"],
    ]
    assert "density 0.0123" in panel.text
    # The selected node's own edges stand out; the inputs list leads to its sources.
    hot = opened.find_elements("css selector", "#graph path.edge.hot")
    own = [e for e in drawn_edges(opened) if DETAILED in e]
    assert len(hot) == len(own)
    assert_clean(opened)
    ARTIFACTS.mkdir(exist_ok=True)
    assert opened.save_screenshot(str(ARTIFACTS / "graph_page.png"))

    other = next(
        n
        for n in graph["nodes"]
        if n["kept"] and n["feature_type"] == "transcoder" and "details" not in n
    )
    opened.find_element("css selector", f'g.node[data-node="{other["node_id"]}"]').click()
    h3 = panel.find_element("tag name", "h3").text
    assert (
        h3 == f"Feature {other['feature']} · layer {other['layer']} · position {other['ctx_idx']}"
    )
    assert "No saelab features output" in panel.text
    assert not panel.find_elements("css selector", ".examples")
    logit = next(n for n in graph["nodes"] if n["feature_type"] == "logit" and n["token"] == ALERT)
    opened.find_element("css selector", f'g.node[data-node="{logit["node_id"]}"]').click()
    assert panel.find_element("tag name", "h3").text.startswith(f"Logit {ALERT}")
    assert float(panel.find_element("css selector", 'td[data-key="probability"]').text) == 0.2
    assert_clean(opened)


def test_sliders_change_what_is_drawn(opened, graph):
    all_kept = drawn_links(graph, NODE_THRESHOLD, 1.0)
    assert slider(opened, "edge-share", Keys.HOME) == 0
    assert drawn_edges(opened) == []
    share = slider(opened, "edge-share", *[Keys.ARROW_RIGHT] * 50)
    assert share == pytest.approx(0.5)
    half = pairs(drawn_links(graph, NODE_THRESHOLD, share))
    assert 0 < len(half) < len(all_kept)
    assert sorted(drawn_edges(opened)) == sorted(half)
    assert slider(opened, "edge-share", Keys.END) == 1
    assert sorted(drawn_edges(opened)) == sorted(pairs(all_kept))

    # The node threshold: lower draws fewer nodes (and their edges), higher more.
    low = slider(opened, "node-threshold", *[Keys.ARROW_LEFT] * 40)
    assert low == pytest.approx(NODE_THRESHOLD - 0.4)
    assert set(drawn_node_ids(opened)) == drawn_nodes(graph, low)
    assert sorted(drawn_edges(opened)) == sorted(pairs(drawn_links(graph, low, 1.0)))
    assert len(drawn_links(graph, low, 1.0)) < len(all_kept)
    kept = {n["node_id"] for n in graph["nodes"] if n["kept"]}
    high = slider(opened, "node-threshold", *[Keys.ARROW_RIGHT] * 45)
    assert high == pytest.approx(NODE_THRESHOLD + 0.05)
    assert set(drawn_node_ids(opened)) == drawn_nodes(graph, high) > kept  # pruned ones back
    assert sorted(drawn_edges(opened)) == sorted(pairs(drawn_links(graph, high, 1.0)))
    assert len(drawn_edges(opened)) > len(all_kept)  # with the links pruned with them
    assert slider(opened, "node-threshold", *[Keys.ARROW_LEFT] * 5) == NODE_THRESHOLD
    assert set(drawn_node_ids(opened)) == kept  # the saved threshold: the builder's nodes
    assert slider(opened, "node-threshold", Keys.END) == 1
    assert set(drawn_node_ids(opened)) == {n["node_id"] for n in graph["nodes"]}
    pruned = next(n["node_id"] for n in graph["nodes"] if not n["kept"])
    opened.find_element("css selector", f'g.node[data-node="{pruned}"]').click()
    assert opened.find_element("css selector", 'td[data-key="kept"]').text == "no (pruned)"
    assert slider(opened, "node-threshold", Keys.HOME) == 0
    only_ends = {
        n["node_id"] for n in graph["nodes"] if n["feature_type"] in ("embedding", "logit")
    }
    assert set(drawn_node_ids(opened)) == only_ends
    assert opened.find_element("id", "counts").text.startswith(f"{len(only_ends)} nodes · ")
    assert_clean(opened)


@pytest.fixture(scope="module")
def real_graph(tmp_path_factory, words_file, tiny_model_dir) -> Path:
    """The folder ``run_graph`` wrote (``graph.json``, ``index.html``) for a tiny prompt."""
    from saelab.analysis.graphs import GraphConfig, run_graph

    tmp = tmp_path_factory.mktemp("real-graph")
    replacement = tiny_replacement(tmp / "set", words_file)
    cfg = GraphConfig(prompt="w5 w17 w33 w8 w40")
    run_graph(replacement, cfg, model_name=str(tiny_model_dir), out=tmp / "graph", progress=False)
    return tmp / "graph"


def test_a_real_graph_from_the_builder_is_drawn_as_saved(browser, real_graph):
    graph = json.loads((real_graph / "graph.json").read_text())
    browser.get((real_graph / "index.html").as_uri())
    kept = {n["node_id"] for n in graph["nodes"] if n["kept"]}
    assert set(drawn_node_ids(browser)) == kept and len(drawn_node_ids(browser)) == len(kept)
    links = drawn_links(graph, graph["metadata"]["node_threshold"], 1.0)
    assert len(links) == sum(e["kept"] for e in graph["links"]) > 0
    assert sorted(drawn_edges(browser)) == sorted(pairs(links))
    detailed = [n for n in graph["nodes"] if n["kept"] and "details" in n]
    assert detailed and {n["layer"] for n in detailed} == {0}  # only layer 0 has statistics
    node = detailed[0]
    browser.find_element("css selector", f'g.node[data-node="{node["node_id"]}"]').click()
    panel = browser.find_element("id", "panel")
    where = f"layer {node['layer']} · position {node['ctx_idx']}"
    assert panel.find_element("tag name", "h3").text == f"Feature {node['feature']} · {where}"
    contexts = panel.find_elements("css selector", ".examples .ctx")
    assert [c.text for c in contexts] == [
        "".join(ex["tokens"]) for ex in node["details"]["top_examples"]
    ]
    assert len(panel.find_elements("css selector", "table.logits tr")) == 2 + 2 * 10
    for share in (Keys.HOME, Keys.END):
        slider(browser, "edge-share", share)
    assert slider(browser, "node-threshold", Keys.END) == 1
    assert set(drawn_node_ids(browser)) == drawn_nodes(graph, 1.0)
    assert_clean(browser)
    assert browser.save_screenshot(str(ARTIFACTS / "graph_page_tiny.png"))
