"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``make browser``) driven by Selenium loads a site written from
real feature statistics of a tiny Llama and a TopK SAE, served by
``saelab.analysis.dashboard.serve``.

Two vocabulary entries of the tiny tokenizer are hostile strings, so they are real tokens of the
corpus: they reach contexts, previews, the search data and (through the model name) the metadata.
Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
from feature_fixtures import CONTEXT, tiny_sae
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saelab.analysis.dashboard.pages import preview_and_search_tokens
from saelab.analysis.dashboard.serve import serve, server_url
from saelab.analysis.dashboard.site import write_dashboard
from saelab.analysis.features import compute_feature_stats
from tiny_models import VOCAB_SIZE, build_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
EVIL = "<script>window.__pwned=1</script>"
EVIL_ATTR = '"onmouseover="window.__pwned=1"'  # no spaces: it is one whitespace-split word
HOSTILE = {5: EVIL, 6: EVIL_ATTR}
"""Vocabulary ids whose word ``w5`` / ``w6`` is replaced by a hostile string."""
AS_HOSTILE = {5: (5, 7, 9, 11, 13), 6: (6, 8, 10, 12, 14)}
"""Words of the corpus written as each hostile token, so that ~2% of tokens are each."""
DEAD = 0
"""Feature whose encoder is switched off, so the site has a real dead feature."""


def hostile_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with :data:`HOSTILE` words, split on whitespace only (the usual
    pre-tokenizer would cut ``<script>`` into pieces)."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2} | {
        HOSTILE.get(i, f"w{i}"): i for i in range(3, VOCAB_SIZE)
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>"
    )


@pytest.fixture(scope="module")
def stats(words_file, tmp_path_factory):
    text = words_file.read_text()
    for i, word in HOSTILE.items():
        words = "|".join(str(w) for w in AS_HOSTILE[i])
        text = re.sub(rf"\bw({words})\b", lambda _, word=word: word, text)
    corpus = tmp_path_factory.mktemp("hostile") / "hostile.txt"
    corpus.write_text(text)
    model = build_tiny_model("llama")
    model.config._name_or_path = f"tiny-llama {EVIL}"  # recorded as the model name
    sae = tiny_sae(d_sae=48, k=4)
    with torch.no_grad():  # never selected by TopK, never positive: a dead feature
        sae.W_enc[:, DEAD] = 0
        sae.b_enc[DEAD] = -1e4
    return compute_feature_stats(
        sae,
        model,
        hostile_tokenizer(),
        data=str(corpus),
        tokens=768,
        context=CONTEXT,
        batch_size=8,
        top_k=6,
        n_quantile_examples=2,
        window=(6, 3),
        progress=False,
    )


@pytest.fixture(scope="module")
def site(stats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dashboard") / "site"
    write_dashboard(stats, out, progress=False)
    return out


@pytest.fixture(scope="module")
def url(site):
    """The site served by :func:`serve` on a free port, in a thread, for the module."""
    bound: list = []
    ready = threading.Event()

    def on_ready(server):
        bound.append(server)
        ready.set()

    thread = threading.Thread(
        target=serve, args=(site,), kwargs={"port": 0, "ready": on_ready}, daemon=True
    )
    thread.start()
    assert ready.wait(10), "the server did not start"
    yield server_url(bound[0])
    bound[0].shutdown()
    thread.join(10)
    assert not thread.is_alive()


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / name))


def visible_ids(driver) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#features tbody tr'))"
        ".filter(r => !r.hidden && r.offsetParent !== null).map(r => +r.dataset.id)"
    )


def assert_not_injected(driver) -> None:
    """Nothing hostile ran or became an attribute, and no script failed."""
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.execute_script("return document.querySelectorAll('[onmouseover]').length") == 0
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors


def search_sets(stats) -> list[set[str]]:
    """The tokens each feature is found by, by the rule the index documents (a naive oracle)."""
    return [
        set(preview_and_search_tokens(stats.top_examples(i))[1]) if stats.fired[i] else set()
        for i in range(stats.n_features)
    ]


def test_index_lists_every_feature_and_sorts_by_clicked_column(browser, url, stats):
    browser.get(url)
    assert visible_ids(browser) == list(range(stats.n_features))
    rows = browser.find_elements("css selector", "#features tbody tr")
    assert "dead" in rows[DEAD].get_attribute("class")
    assert "never fired" in rows[DEAD].text

    max_act, density = stats.max_act.tolist(), stats.density.tolist()
    by_max = sorted(range(stats.n_features), key=lambda f: (-max_act[f], f))
    browser.find_element("css selector", 'th[data-key="max"]').click()
    assert visible_ids(browser) == by_max
    browser.find_element("css selector", 'th[data-key="max"]').click()  # again: ascending
    assert visible_ids(browser) == sorted(range(stats.n_features), key=lambda f: (max_act[f], f))
    browser.find_element("css selector", 'th[data-key="density"]').click()
    assert visible_ids(browser) == sorted(range(stats.n_features), key=lambda f: (-density[f], f))
    assert_not_injected(browser)
    assert EVIL in browser.find_element("tag name", "body").text  # the model name, as text
    screenshot(browser, "dashboard_index.png")


def test_search_filters_rows_by_tokens_of_top_contexts(browser, url, stats):
    browser.get(url)
    sets = search_sets(stats)
    # A token found in some features but not all, so filtering is visible both ways.
    counts = {t: sum(t in s for s in sets) for s in sets for t in s}
    token = min((t for t, c in counts.items() if 1 < c < stats.n_features / 2), key=counts.get)
    box = browser.find_element("id", "search")
    for query in (token, token.upper(), EVIL, "no such token anywhere"):
        box.clear()
        box.send_keys(query)
        expected = [f for f, s in enumerate(sets) if any(query.lower() in t.lower() for t in s)]
        assert visible_ids(browser) == expected, query
        shown = browser.find_element("id", "shown").text
        assert shown == f"{len(expected)} of {stats.n_features} features"
    assert visible_ids(browser) == []
    # A quoted word is a whole token: "w1" finds w1 but not w10..w199, unlike w1.
    exact = [f for f, s in enumerate(sets) if "w1" in {t.strip().lower() for t in s}]
    partial = [f for f, s in enumerate(sets) if any("w1" in t.lower() for t in s)]
    assert set(exact) < set(partial)
    box.clear()
    box.send_keys('"W1" ')
    assert visible_ids(browser) == exact
    box.clear()
    box.send_keys(" ")
    assert len(visible_ids(browser)) == stats.n_features
    assert_not_injected(browser)


def hostile_feature(stats) -> int:
    """A live feature with the hostile tokens inside its top contexts."""
    for f in range(stats.n_features):
        tokens = {t for ex in stats.top_examples(f) for t in ex.tokens}
        if {EVIL, EVIL_ATTR} <= tokens:
            return f
    raise AssertionError("no feature has both hostile tokens in its top contexts")


def test_feature_page_highlights_firing_tokens_and_shows_markup_as_text(browser, url, stats):
    f = hostile_feature(stats)
    browser.get(f"{url}features/{f}.html")
    examples = stats.top_examples(f) + [e for _, ex in stats.quantile_examples(f) for e in ex]
    expected = [a for ex in examples for a in ex.acts if a > 0]
    spans = browser.find_elements("css selector", ".saelab-feature .tok.on")
    assert len(spans) == len(expected)
    values = [float(s.get_attribute("title")) for s in spans]  # the tooltip: 4 digits
    assert values == pytest.approx(expected, rel=1e-3)
    maxima = browser.find_elements("css selector", ".tok.mx")
    assert [float(s.get_attribute("title")) for s in maxima] == pytest.approx(
        [ex.value for ex in examples], rel=1e-3
    )
    # Shading: the strongest token is opaque, and the colour is really painted.
    painted = maxima[0].value_of_css_property("background-color")
    assert re.fullmatch(r"rgba?\(255, 110, 0(, 1)?\)", painted), painted
    bars = browser.find_elements("css selector", "svg.hist rect.bar")
    assert len(bars) == len(stats.histogram(f)[1])
    body = browser.find_element("tag name", "body").text
    assert EVIL in body and EVIL_ATTR in body
    assert_not_injected(browser)
    screenshot(browser, "dashboard_feature.png")

    step = "next" if f + 1 < stats.n_features else "prev"
    other = f + 1 if step == "next" else f - 1
    browser.find_element("css selector", f"a.{step}").click()
    assert browser.current_url.endswith(f"features/{other}.html")
    assert browser.find_element("tag name", "h3").text == f"Feature {other}"


def test_dead_feature_page_says_it_never_fired(browser, url):
    browser.get(f"{url}features/{DEAD}.html")
    assert "never fired" in browser.find_element("tag name", "body").text
    assert not browser.find_elements("css selector", ".tok.on")


def test_site_works_from_file_urls_without_fetching_anything(browser, site, stats):
    f = hostile_feature(stats)
    browser.get((site / "features" / f"{f}.html").as_uri())
    assert len(browser.find_elements("css selector", ".tok.on")) > 0
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    browser.find_element("link text", "↑ all features").click()
    assert browser.current_url == (site / "index.html").as_uri()
    assert len(visible_ids(browser)) == stats.n_features
    browser.find_element("id", "search").send_keys(EVIL)  # the script runs from file:// too
    assert 0 < len(visible_ids(browser)) < stats.n_features
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert_not_injected(browser)


def test_notebook_html_of_real_statistics_is_the_dashboard_fragment(stats, site):
    from saelab.analysis.dashboard import feature_fragment

    f = hostile_feature(stats)
    fragment = feature_fragment(stats, f)
    assert fragment in (site / "features" / f"{f}.html").read_text()
    assert fragment.startswith('<div class="saelab-feature"') and "<script" not in fragment
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in fragment
