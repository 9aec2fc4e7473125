"""Rendering feature statistics to HTML: escaping, visible whitespace, colour scale, SVG."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import pytest
from dashboard_fakes import EVIL, EVIL_ATTR, FakeExample, FakeStats

from saelab.analysis.dashboard.pages import (
    feature_page,
    index_page,
    preview_and_search_tokens,
    script_json,
)
from saelab.analysis.dashboard.render import (
    context_html,
    feature_fragment,
    highlight_alpha,
    highlight_colour,
    histogram_svg,
    visible_token,
)


class Tree(HTMLParser):
    """Every start tag with its attributes, and the text, as a browser's parser would see them."""

    def __init__(self, html_text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.script_bodies: list[str] = []
        self._in_script = False
        self.feed(html_text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.script_bodies if self._in_script else self.text).append(data)

    def with_class(self, *names: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.tags if set(names) <= set((a.get("class") or "").split())]


def test_whitespace_and_control_characters_are_visible():
    assert visible_token("\n") == "⏎"
    assert visible_token("a\tb\r") == "a⇥b↵"
    assert visible_token("   ") == "···"  # a space-only token would be invisible
    assert visible_token(" the") == " the"  # inside running text the space is just a space
    assert visible_token(" the", spaces=True) == "·the"  # in tables of single tokens it is not
    assert visible_token("\x01") == "\\x01"
    assert visible_token("") == "∅"


def test_colour_scale_is_act_over_max_clipped():
    max_act = 4.0
    acts = [0.0, 0.5, 1.0, 2.0, 3.99, 4.0, 9.0]
    alphas = [highlight_alpha(a, max_act) for a in acts]
    assert alphas == sorted(alphas)
    assert alphas[0] == 0 and alphas[-2] == alphas[-1] == 1
    assert alphas[3] == pytest.approx(0.5)
    assert highlight_alpha(-1.0, max_act) == 0
    assert highlight_alpha(1.0, 0.0) == 0  # a dead feature has no scale
    assert highlight_colour(0.0, max_act) is None
    for act in acts[1:]:
        colour = re.fullmatch(r"#ff6e00([0-9a-f]{2})", highlight_colour(act, max_act))
        alpha = int(colour[1], 16) / 255
        assert alpha == pytest.approx(max(min(act / max_act, 1), 0.08), abs=0.5 / 255)


def test_context_marks_firing_tokens_with_their_values_and_the_max():
    ex = FakeExample(["a", " b", "\n", "<c>", " d"], [0.0, 1.5, 0.0, 3.0, 0.25], 3, 3.0, 7, 3)
    tree = Tree(context_html(ex, max_act=6.0))
    on = tree.with_class("tok", "on")
    assert [float(a["title"]) for a in on] == [a for a in ex.acts if a > 0]
    (mx,) = tree.with_class("mx")
    assert float(mx["title"]) == max(ex.acts)
    text = "".join(tree.text)
    assert text == "a b⏎<c> d"  # every token, in order, whitespace visible, markup as text


def test_histogram_svg_has_one_bar_per_bin_with_heights_ordered_like_counts():
    counts = [5, 0, 100, 1, 30, 0, 2]
    edges = [k / 7 for k in range(8)]
    tree = Tree(histogram_svg(edges, counts, log_counts=True))
    bars = [a for tag, a in tree.tags if tag == "rect" and a.get("class") == "bar"]
    assert len(bars) == len(counts)
    heights = [float(b["height"]) for b in bars]
    assert [h == 0 for h in heights] == [c == 0 for c in counts]
    order = sorted(range(len(counts)), key=counts.__getitem__)
    assert [heights[k] for k in order] == sorted(heights)
    ratio = heights[2] / heights[4]
    assert ratio == pytest.approx(math.log1p(100) / math.log1p(30), rel=1e-3)
    linear = Tree(histogram_svg(edges, counts, log_counts=False))
    lin = [float(a["height"]) for t, a in linear.tags if t == "rect"]
    assert lin[2] / lin[4] == pytest.approx(100 / 30, rel=1e-3)
    with pytest.raises(ValueError, match="len"):
        histogram_svg(edges, counts[:-1])


@pytest.mark.parametrize("hostile", [EVIL, EVIL_ATTR, "</script><!--", "&amp;\u2028"])
def test_script_json_round_trips_and_cannot_close_the_script(hostile):
    obj = {"search": [hostile, "x\n" + hostile]}
    text = script_json(obj)
    assert not set("<>&\u2028") & set(text)
    assert json.loads(text) == obj
    html_text = f'<script type="application/json" id="d">{text}</script><p>after</p>'
    tree = Tree(html_text)
    assert json.loads("".join(tree.script_bodies)) == obj
    assert "".join(tree.text) == "after"


def _assert_inert(html_text: str) -> Tree:
    """No data string became a tag or an attribute; the hostile tokens are there as text."""
    tree = Tree(html_text)
    assert all(not k.startswith("on") for _, attrs in tree.tags for k in attrs)
    scripts = [a for tag, a in tree.tags if tag == "script"]
    assert all(a.get("type") == "application/json" for a in scripts[:-1])
    text = "".join(tree.text)
    assert EVIL in text
    assert EVIL_ATTR.replace(" ", "·") in text or EVIL_ATTR in text
    return tree


def test_feature_fragment_escapes_every_data_string():
    stats = FakeStats()
    tree = _assert_inert(feature_fragment(stats, 2))
    assert not [t for t, _ in tree.tags if t == "script"]
    # Feature 2: three top examples + two quantile samples, two firing tokens each.
    assert len(tree.with_class("tok", "on")) == 2 * (3 + 2)
    assert len(tree.with_class("mx")) == 3 + 2
    assert len([a for t, a in tree.tags if t == "rect" and a.get("class") == "bar"]) == 8


def test_feature_page_and_index_escape_metadata_and_tokens():
    stats = FakeStats()
    page = feature_page(stats, 1, title=stats.meta["model"], prev_id=0, next_id=2)
    tree = _assert_inert(page)
    hrefs = [a["href"] for t, a in tree.tags if t == "a"]
    assert hrefs == ["../index.html", "0.html", "2.html"]

    tops = [stats.top_examples(i) for i in range(stats.n)]
    previews, search = zip(*(preview_and_search_tokens(t) for t in tops), strict=True)
    index = index_page(stats, previews, search, pages=[0, 1], title=stats.meta["model"])
    tree = Tree(index)
    assert all(not k.startswith("on") for _, attrs in tree.tags for k in attrs)
    assert EVIL in "".join(tree.text)
    (data_block, code) = tree.script_bodies
    expected = [t for t in search[2] if t.strip()]
    assert json.loads(data_block)["search"][2].split("\n") == expected
    assert "__pwned" not in code
    rows = [a for t, a in tree.tags if t == "tr" and "data-id" in a]
    assert [int(r["data-id"]) for r in rows] == list(range(stats.n))
    assert [r.get("class") == "dead" for r in rows] == [i in stats.dead for i in range(stats.n)]
    linked = [a["href"] for t, a in tree.tags if t == "a"]
    assert linked == ["features/0.html", "features/1.html"]


def test_dead_feature_says_never_fired_and_has_no_contexts():
    stats = FakeStats()
    tree = Tree(feature_fragment(stats, stats.dead[0]))
    assert "never fired" in "".join(tree.text)
    assert not tree.with_class("ctx") and not [t for t, _ in tree.tags if t == "svg"]
    with pytest.raises(IndexError):
        feature_fragment(stats, stats.n)


def test_search_tokens_are_a_window_around_each_max_token():
    ex = FakeExample([str(k) for k in range(20)], [0.0] * 20, 10, 1.0, 0, 10)
    ex2 = FakeExample(["x", "10", "y"], [0.0, 0.0, 1.0], 2, 1.0, 1, 2)
    preview, near = preview_and_search_tokens([ex, ex2], window=2)
    assert preview == ["10", "y"]
    assert near == ["8", "9", "10", "11", "12", "x", "y"]


def test_feature_page_shows_the_steer_command_escaped_and_parseable():
    import shlex

    from saelab.cli import build_parser

    sae_dir = f"runs/{EVIL} it's"
    stats = FakeStats(meta={"model": "default", "hook": "blocks.0.x", "sae_dir": sae_dir})
    for i in range(stats.n):
        tree = Tree(feature_page(stats, i, title="t"))
        assert not [t for t, _ in tree.tags if t == "script"]
        assert all(not k.startswith("on") for _, attrs in tree.tags for k in attrs)
        argv = shlex.split(tree.text[tree.text.index("Steer with this feature: ") + 1])
        args = build_parser().parse_args(argv[1:])
        assert argv[0] == "saelab" and args.command == "steer" and args.method == "sae-feature"
        assert (args.sae, args.hook, args.feature) == (sae_dir, "blocks.0.x", i)
        assert args.model == "default"
        # A dead feature has no max activation to be the unit: it steers in residual norms.
        assert args.sae_units == ("resid_norm" if i in stats.dead else "max_act")
