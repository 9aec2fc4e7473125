"""Whole pages of the static site: ``features/<id>.html`` around a feature's fragment, and
``index.html``, a sortable table of every feature with a search box. Pure functions returning
strings; :mod:`saelab.analysis.dashboard.site` writes them.

JSON embedded in a ``<script>`` block passes through :func:`script_json`, so no data string can
close the script element. Pages hold their CSS and script inline and load nothing else.

Example:
    >>> html_text = feature_page(stats, 3, title="demo", prev_id=2, next_id=4)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from saelab.analysis.dashboard.render import (
    esc,
    feature_fragment,
    feature_id,
    feature_ids,
    fmt,
    log10_density,
    token_html,
)

INDEX_FILENAME = "index.html"
"""The site's index page, at its top."""
PAGES_DIRNAME = "features"
"""The site's folder of feature pages: ``features/<id>.html``."""

if TYPE_CHECKING:  # annotations only: importing features at run time loads the model stack
    from saelab.analysis.features import Example, FeatureStats


def shown_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata worth showing: scalars and short lists (not e.g. a vocabulary)."""
    return {
        str(k): v
        for k, v in meta.items()
        if v is None
        or isinstance(v, str | int | float | bool)
        or (isinstance(v, list | tuple) and len(v) <= 8)
    }


def script_json(obj: Any) -> str:
    """Compact JSON that is safe inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` become ``\\u003c`` etc. (and the JS line separators are escaped), so no
    data string can close the script element or start a comment; ``JSON.parse`` reads it back
    unchanged.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for char, code in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, code)
    return text


PAGE_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:14px;color:#222;
margin:16px auto;max-width:1100px;padding:0 12px}
nav{margin-bottom:8px}nav a{margin-right:14px}
table.features{border-collapse:collapse;width:100%}
table.features th,table.features td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
table.features td.preview,table.features th.preview{text-align:left}
table.features th[data-key]{cursor:pointer;user-select:none;white-space:nowrap}
table.features th[aria-sort=descending]::after{content:" ▼"}
table.features th[aria-sort=ascending]::after{content:" ▲"}
tr.dead td{color:#999}
code.t{background:#f3f3f3;border-radius:3px;padding:0 3px;margin-right:4px;white-space:pre}
table.meta td{padding:1px 10px 1px 0;vertical-align:top}
#search{font-size:14px;padding:4px 8px;width:320px}
""".strip()

INDEX_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("search-data").textContent);
  // Per feature: its tokens one a line, for substring terms; and trimmed, for "exact" terms.
  var text = data.search.map(function (s) { return s.toLowerCase(); });
  var whole = text.map(function (s) {
    return "\n" + s.split("\n").map(function (t) { return t.trim(); }).join("\n") + "\n";
  });
  function parse(query) {
    var terms = [], re = /"([^"]*)"|(\S+)/g, m;
    while ((m = re.exec(query.toLowerCase())) !== null) {
      if (m[1] === undefined) terms.push({ hay: text, needle: m[2] });
      else if (m[1].trim()) terms.push({ hay: whole, needle: "\n" + m[1].trim() + "\n" });
    }
    return terms;
  }
  var tbody = document.querySelector("#features tbody");
  var rows = Array.prototype.slice.call(tbody.rows);
  var box = document.getElementById("search");
  var shown = document.getElementById("shown");
  function filter() {
    var terms = parse(box.value);
    var n = 0;
    rows.forEach(function (row) {
      var r = +row.dataset.row;
      var ok = terms.every(function (t) { return t.hay[r].indexOf(t.needle) !== -1; });
      row.hidden = !ok;
      if (ok) n += 1;
    });
    shown.textContent = n + " of " + rows.length + " features";
  }
  var sortKey = "id", descending = false;
  function sortBy(th) {
    var key = th.dataset.key;
    descending = key === sortKey ? !descending : key !== "id";
    sortKey = key;
    var sign = descending ? -1 : 1;
    rows.sort(function (a, b) {
      return sign * (parseFloat(a.dataset[key]) - parseFloat(b.dataset[key])) ||
        (a.dataset.id - b.dataset.id);
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (row) { frag.appendChild(row); });
    tbody.appendChild(frag);
    document.querySelectorAll("th[data-key]").forEach(function (h) {
      h.setAttribute("aria-sort", h === th ? (descending ? "descending" : "ascending") : "none");
    });
  }
  document.querySelectorAll("th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  box.addEventListener("input", filter);
  filter();
})();
""".strip()


def page(title: str, body: str, script: str = "", css: str = PAGE_CSS) -> str:
    """A whole HTML document: inline CSS (the site's unless ``css`` is given) and script, no
    external resources."""
    js = f"<script>{script}</script>" if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: nothing outside the folder
        f"<title>{esc(title)}</title><style>{css}</style></head>"
        f"<body>{body}{js}</body></html>\n"
    )


def feature_page(
    stats: FeatureStats,
    i: int,
    title: str,
    prev_id: int | None = None,
    next_id: int | None = None,
    top: Sequence[Example] | None = None,
) -> str:
    """The page of row ``i``, ``features/<feature id>.html``: links back to the index and to the
    neighbouring pages (``prev_id``, ``next_id``: feature ids), then the fragment."""
    links = [f'<a href="../{INDEX_FILENAME}">↑ all features</a>']
    if prev_id is not None:
        links.append(f'<a class="prev" href="{int(prev_id)}.html">← feature {int(prev_id)}</a>')
    if next_id is not None:
        links.append(f'<a class="next" href="{int(next_id)}.html">feature {int(next_id)} →</a>')
    body = (
        f'<nav>{"".join(links)}<span style="color:#777">{esc(title)}</span></nav>'
        f"{feature_fragment(stats, i, top)}"
    )
    return page(f"Feature {feature_id(stats, i)} · {title}", body)


def preview_and_search_tokens(
    examples: Sequence[Example], preview: int = 5, window: int = 4
) -> tuple[list[str], list[str]]:
    """The distinct max tokens of ``examples`` (at most ``preview``), and the distinct tokens
    within ``window`` positions of each example's max token, which the index search looks in.

    A window rather than whole contexts keeps the index small (16k features × 20 examples × 64
    tokens would be tens of MB) while still finding a feature by what it fires on and just before.
    """
    tops: dict[str, None] = {}
    near: dict[str, None] = {}
    for ex in examples:
        if 0 <= ex.max_index < len(ex.tokens):
            tops.setdefault(ex.tokens[ex.max_index])
        lo = max(ex.max_index - window, 0)
        for token in ex.tokens[lo : ex.max_index + window + 1]:
            near.setdefault(token)
    return list(tops)[:preview], list(near)


def search_text(tokens: Iterable[str]) -> str:
    """What the index search matches against: the tokens, one a line, blank ones dropped.

    A newline inside a token becomes a space, so lines stay tokens; a query (which cannot hold a
    newline) never matches across two tokens.
    """
    return "\n".join(t.replace("\n", " ").replace("\r", " ") for t in tokens if t.strip())


def index_page(
    stats: FeatureStats,
    previews: Sequence[Sequence[str]],
    search: Sequence[Sequence[str]],
    pages: Iterable[int],
    title: str,
    meta: dict[str, Any] | None = None,
) -> str:
    """``index.html``: a sortable table of every feature, a search box over ``search[i]``.

    ``previews[i]`` are the tokens shown in feature ``i``'s row and ``search[i]`` the tokens its
    row is found by; ``pages`` are the rows whose feature has a page to link to.
    """
    n = int(stats.n_features)
    if len(previews) != n or len(search) != n:
        raise ValueError(f"need previews and search text for all {n} features")
    pages = set(pages)
    density, mean_act, max_act = (
        [float(v) for v in values.tolist()]
        for values in (stats.density, stats.mean_act, stats.max_act)
    )
    ids = feature_ids(stats)
    rows = []
    for i in range(n):
        dead = not density[i] > 0
        fid = ids[i]
        ident = f'<a href="{PAGES_DIRNAME}/{fid}.html">{fid}</a>' if i in pages else str(fid)
        tokens = "".join(f'<code class="t">{token_html(t)}</code>' for t in previews[i])
        rows.append(
            f'<tr data-row="{i}" data-id="{fid}" data-density="{density[i]!r}" '
            f'data-max="{max_act[i]!r}" data-mean="{mean_act[i]!r}"{" class=dead" if dead else ""}>'
            f"<td>{ident}</td><td>{fmt(density[i])}</td><td>{log10_density(density[i])}</td>"
            f"<td>{fmt(max_act[i])}</td><td>{fmt(mean_act[i])}</td>"
            f'<td class="preview">{"dead (never fired)" if dead else tokens}</td></tr>'
        )
    n_dead = sum(1 for d in density if not d > 0)
    meta_rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in shown_meta(meta if meta is not None else stats.meta).items()
    )
    head = (
        '<th data-key="id" aria-sort="ascending">feature</th>'
        '<th data-key="density" aria-sort="none">density</th>'
        '<th data-key="density" aria-sort="none" title="sorts by density">log10 density</th>'
        '<th data-key="max" aria-sort="none">max act</th>'
        '<th data-key="mean" aria-sort="none">mean act</th>'
        '<th class="preview">top tokens</th>'
    )
    search_json = script_json({"search": [search_text(tokens) for tokens in search]})
    body = (
        f"<h2>{esc(title)}</h2>"
        f'<table class="meta">{meta_rows}</table>'
        f"<p>{n:,} features ({n_dead:,} dead) over {int(stats.n_tokens):,} tokens; "
        f"{len(pages):,} with a page. Click a column to sort. The search finds features by the "
        "tokens near the maxima of their top contexts: each word must occur in one of them, a "
        "&quot;quoted&quot; word must be a whole token (spaces around it aside).</p>"
        '<p><input id="search" type="search" size="40" '
        'placeholder="search tokens in top contexts (&quot;the&quot;: whole token)" '
        'autocomplete="off"> <span id="shown"></span></p>'
        f'<table id="features" class="features"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<script type="application/json" id="search-data">{search_json}</script>'
    )
    return page(title, body, INDEX_JS)
