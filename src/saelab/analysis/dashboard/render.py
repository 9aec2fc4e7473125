"""Feature statistics → HTML strings. Pure functions: no files, no torch maths, no globals.

Every string that comes from data (tokens, model names, paths, metadata) passes through
:func:`html.escape` on its way into the page, and JSON embedded in a ``<script>`` block passes
through :func:`script_json`, so a token such as ``</script><script>alert(1)</script>`` is shown as
text and never runs. Styles are inline in :func:`feature_fragment`, so a fragment renders the
same in a Jupyter cell as on the dashboard's feature page.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

WHITESPACE_SIGNS = {"\n": "⏎", "\r": "↵", "\t": "⇥"}
"""How invisible characters of a token are shown, so that contexts stay readable."""

HIGHLIGHT_RGB = (255, 110, 0)
"""Token background colour; its opacity is the activation over the feature's maximum."""

FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:14px;color:#222"
MONO = "font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:13px"


class ExampleLike(Protocol):
    """What rendering needs of ``saelab.analysis.features.Example``."""

    tokens: list[str]
    acts: list[float]
    max_index: int
    value: float
    sequence: int
    position: int


class StatsLike(Protocol):
    """What rendering needs of ``saelab.analysis.features.FeatureStats``."""

    n_features: int
    n_tokens: int
    meta: dict

    @property
    def density(self) -> Any: ...  # Tensor[F]

    @property
    def mean_act(self) -> Any: ...  # Tensor[F]

    @property
    def max_act(self) -> Any: ...  # Tensor[F]

    def histogram(self, i: int) -> tuple[list[float], list[int]]: ...

    def top_examples(self, i: int, n: int | None = None) -> list[ExampleLike]: ...

    def quantile_examples(self, i: int) -> list[tuple[str, list[ExampleLike]]]: ...

    def logit_effects(
        self, i: int, n: int = 10
    ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]: ...


def esc(value: object) -> str:
    """Any value as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def visible_token(token: str, spaces: bool = False) -> str:
    """``token`` with newlines, tabs and other control characters drawn as visible signs.

    A token made only of spaces is drawn as middle dots (it would be invisible otherwise); with
    ``spaces=True`` every space is, which tables of single tokens use so that ``" the"`` and
    ``"the"`` differ on screen.
    """
    if spaces or (token and not token.strip(" ")):
        token = token.replace(" ", "·")
    out = []
    for char in token:
        if char in WHITESPACE_SIGNS:
            out.append(WHITESPACE_SIGNS[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out) or "∅"


def token_html(token: str, spaces: bool = False) -> str:
    """A token escaped for HTML, whitespace made visible."""
    return esc(visible_token(token, spaces=spaces))


def highlight_alpha(act: float, max_act: float) -> float:
    """Opacity of a token's background: ``act / max_act`` clipped to [0, 1]; 0 for no maximum."""
    if not max_act > 0 or not math.isfinite(act):
        return 0.0
    return min(max(act / max_act, 0.0), 1.0)


def highlight_colour(act: float, max_act: float) -> str | None:
    """CSS background for a token with activation ``act``; None where the feature is off."""
    alpha = highlight_alpha(act, max_act)
    if alpha <= 0:
        return None
    # Never fully transparent once on: the faintest firing stays visible beside a zero.
    r, g, b = HIGHLIGHT_RGB
    # #rrggbbaa is a third of rgba(...)'s length, which matters across 16k pages of spans.
    return f"#{r:02x}{g:02x}{b:02x}{round(255 * max(alpha, 0.08)):02x}"


def fmt(value: float, digits: int = 4) -> str:
    """A number for people: 4 significant digits, plain or scientific."""
    value = float(value)
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def log10_density(density: float) -> str:
    return fmt(math.log10(density), 3) if density > 0 else "-inf"


EDGE = "margin-right:1px"
"""A 1-pixel gap after each shaded token, so that neighbouring firing tokens stay apart."""
CONTEXTS_STYLE = f"{MONO};line-height:1.9;white-space:pre-wrap;word-break:break-word"
"""Inline style of the ``<div>`` around a list of contexts (inherited by each context)."""


def context_html(example: ExampleLike, max_act: float) -> str:
    """One context: a ``<div>`` of tokens, those where the feature fired shaded by activation.

    Firing tokens are ``<span class="tok on">`` with their value (4 significant digits) in a
    ``title`` tooltip; the example's maximum also has the class ``mx`` and an outline. Tokens
    where it did not fire are plain text: most tokens of a sparse feature's context are off, and
    a span each would multiply the size of a 16k-page site. Put contexts inside
    :func:`contexts_html` (or a ``<div>`` with :data:`CONTEXTS_STYLE`) for their font.
    """
    parts = [
        f'<div class="ctx" data-value="{float(example.value):.6g}" '
        f'title="sequence {int(example.sequence)}, position {int(example.position)}" '
        'style="padding:2px 6px;border-bottom:1px solid #eee">'
    ]
    for j, (token, act) in enumerate(zip(example.tokens, example.acts, strict=True)):
        text = token_html(token)
        colour = highlight_colour(float(act), max_act)
        if colour is None:
            parts.append(text)
        elif j == example.max_index:
            parts.append(
                f'<span class="tok on mx" title="{fmt(act)}" '
                f'style="background:{colour};{EDGE};outline:1px solid #b34700">{text}</span>'
            )
        else:
            parts.append(
                f'<span class="tok on" title="{fmt(act)}" '
                f'style="background:{colour};{EDGE}">{text}</span>'
            )
    parts.append("</div>")
    return "".join(parts)


def contexts_html(examples: Iterable[ExampleLike], max_act: float, css_class: str) -> str:
    """Several contexts in one ``<div class="{css_class}">`` that sets their font."""
    body = "".join(context_html(ex, max_act) for ex in examples)
    return f'<div class="{esc(css_class)}" style="{CONTEXTS_STYLE}">{body}</div>'


def histogram_svg(
    edges: Sequence[float],
    counts: Sequence[int],
    width: int = 420,
    height: int = 120,
    log_counts: bool = True,
) -> str:
    """An inline SVG bar chart: one ``<rect class="bar">`` per bin, a tooltip with its range.

    Heights use log(1 + count) by default, because activation histograms have a long tail that a
    linear axis flattens to nothing.
    """
    if len(edges) != len(counts) + 1:
        raise ValueError(
            f"histogram needs len(edges) = len(counts) + 1, got {len(edges)}, {len(counts)}"
        )
    pad_bottom, pad_top = 16, 4
    plot_h = height - pad_bottom - pad_top
    n = len(counts)
    scale = (lambda c: math.log1p(c)) if log_counts else float
    top = max((scale(c) for c in counts), default=0.0) or 1.0
    bar_w = width / max(n, 1)
    bars = []
    for k, count in enumerate(counts):
        h = plot_h * scale(count) / top
        bars.append(
            f'<rect class="bar" x="{k * bar_w:.1f}" y="{pad_top + plot_h - h:.2f}" '
            f'width="{max(bar_w - 1, 0.5):.1f}" height="{h:.2f}">'
            f"<title>[{esc(fmt(edges[k]))}, {esc(fmt(edges[k + 1]))}): {int(count)}</title></rect>"
        )
    lo, hi = (fmt(edges[0]), fmt(edges[-1])) if len(edges) else ("", "")
    axis = (
        f'<line x1="0" y1="{height - pad_bottom}" x2="{width}" y2="{height - pad_bottom}" '
        f'stroke="#999"/>'
        f'<text x="0" y="{height - 3}" font-size="10" fill="#555">{esc(lo)}</text>'
        f'<text x="{width}" y="{height - 3}" font-size="10" fill="#555" '
        f'text-anchor="end">{esc(hi)}</text>'
    )
    label = "activation histogram" + (" (log counts)" if log_counts else "")
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{label}">'
        f'<g fill="#e06c00">{"".join(bars)}</g>{axis}</svg>'
    )


def logit_table(title: str, rows: Iterable[tuple[str, float]], colour: str) -> str:
    """A two-column table of tokens and their logit effect."""
    body = "".join(
        f"<tr><td>{token_html(tok, spaces=True)}</td>"
        f'<td style="text-align:right;color:{colour}">{esc(fmt(value, 3))}</td></tr>'
        for tok, value in rows
    )
    return (
        f'<table class="logits" style="{MONO};margin-right:24px" cellpadding="1">'
        f'<tr><th colspan="2" style="{FONT};text-align:left">{esc(title)}</th></tr>{body}</table>'
    )


def feature_ids(stats: StatsLike) -> list[int]:
    """The SAE feature id of each row of ``stats`` (the row itself unless it says otherwise,
    as statistics of a slice of the features do)."""
    ids = getattr(stats, "feature_ids", None)
    return [int(f) for f in ids.tolist()] if ids is not None else list(range(stats.n_features))


def _feature_id(stats: StatsLike, i: int) -> int:
    ids = getattr(stats, "feature_ids", None)
    return int(ids[i]) if ids is not None else int(i)


def shown_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata worth showing: scalars and short lists (not e.g. a vocabulary)."""
    return {
        str(k): v
        for k, v in meta.items()
        if v is None
        or isinstance(v, str | int | float | bool)
        or (isinstance(v, list | tuple) and len(v) <= 8)
    }


def _stat(stats: StatsLike, name: str, i: int) -> float:
    return float(getattr(stats, name)[i])


def is_dead(stats: StatsLike, i: int) -> bool:
    """A feature that never fired on the tokens the statistics were gathered over."""
    return not _stat(stats, "density", i) > 0


def summary_line(stats: StatsLike, i: int) -> str:
    """Density, log10 density, mean and max activation of feature ``i`` as one line of HTML."""
    density = _stat(stats, "density", i)
    return (
        f'<span class="summary">density {esc(fmt(density))} '
        f"(log10 {esc(log10_density(density))}) · mean act {esc(fmt(_stat(stats, 'mean_act', i)))}"
        f" · max act {esc(fmt(_stat(stats, 'max_act', i)))} · over {int(stats.n_tokens):,} tokens"
        "</span>"
    )


def steer_command(meta: dict[str, Any], feature: int, dead: bool = False) -> str:
    """The ``saelab steer`` command that steers with SAE feature ``feature``, from the statistics'
    metadata (SAE folder, hook, model): a shell line, every value quoted as the shell needs.

    Coefficient 1 is then the feature's max activation, which ``saelab steer`` reads from the
    statistics in ``SAE_DIR/features``; a ``dead`` feature has none, so it steers in units of the
    residual norm instead.
    """
    sae_dir = str(meta.get("sae_dir") or "SAE_DIR")
    args = ["saelab", "steer", "--method", "sae-feature", "--sae", sae_dir]
    if meta.get("hook"):
        args += ["--hook", str(meta["hook"])]
    args += ["--feature", str(int(feature))]
    if meta.get("model") and meta["model"] != "default":
        args += ["--model", str(meta["model"])]
    if dead:
        args += ["--sae-units", "resid_norm"]
    return shlex.join(args)


def steer_line(stats: StatsLike, i: int) -> str:
    """The "Steer with this feature" line: row ``i``'s :func:`steer_command` as HTML."""
    command = steer_command(stats.meta, _feature_id(stats, i), dead=is_dead(stats, i))
    return (
        '<p class="steer" style="margin:6px 0;color:#555">Steer with this feature: '
        f'<code style="{MONO};background:#f3f3f3;padding:1px 4px;user-select:all;'
        f'overflow-wrap:anywhere">{esc(command)}</code></p>'
    )


def _section(title: str, body: str) -> str:
    return f'<h4 style="margin:14px 0 4px;font-size:14px">{esc(title)}</h4>{body}'


def feature_fragment(stats: StatsLike, i: int, top: Sequence[ExampleLike] | None = None) -> str:
    """Everything about feature ``i`` as one self-contained ``<div>`` with inline styles.

    Summary numbers, the ``saelab steer`` command that steers with it, the activation histogram
    (inline SVG), top contexts, quantile samples and the tokens its decoder direction promotes and
    suppresses. Usable alone, e.g. in Jupyter::

        from IPython.display import HTML
        HTML(feature_fragment(stats, 3))

    ``top`` are ``stats.top_examples(i)`` when the caller already has them.
    """
    if not 0 <= i < stats.n_features:
        raise IndexError(f"feature {i} out of range 0..{stats.n_features - 1}")
    max_act = _stat(stats, "max_act", i)
    fid = _feature_id(stats, i)
    parts = [
        f'<div class="saelab-feature" data-feature="{fid}" style="{FONT};max-width:980px">',
        f'<h3 style="margin:4px 0">Feature {fid}</h3>',
        f'<div style="color:#555">{summary_line(stats, i)}</div>',
        steer_line(stats, i),
    ]
    if is_dead(stats, i):
        parts.append(
            '<p class="dead" style="color:#a00;font-weight:600">'
            f"Dead: this feature never fired on the {int(stats.n_tokens):,} tokens seen.</p>"
        )
    else:
        edges, counts = stats.histogram(i)
        parts.append(
            _section("Activation histogram (tokens where it fired)", histogram_svg(edges, counts))
        )
        top = stats.top_examples(i) if top is None else top
        parts.append(
            _section(
                f"Top {len(top)} contexts",
                contexts_html(top, max_act, "top"),
            )
        )
        for label, examples in stats.quantile_examples(i):
            if examples:
                parts.append(
                    _section(
                        f"Sample: {label}",
                        contexts_html(examples, max_act, "quantile"),
                    )
                )
    promoted, suppressed = stats.logit_effects(i)
    parts.append(
        _section(
            "Logit effects of the decoder direction",
            '<div style="display:flex;flex-wrap:wrap">'
            + logit_table("promoted", promoted, "#1a7f37")
            + logit_table("suppressed", suppressed, "#b3261e")
            + "</div>",
        )
    )
    parts.append("</div>")
    return "".join(parts)


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


# ---- whole pages of the static site -------------------------------------------------------------

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


def page(title: str, body: str, script: str = "") -> str:
    """A whole HTML document: inline CSS (and script), no external resources."""
    js = f"<script>{script}</script>" if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: nothing outside the folder
        f"<title>{esc(title)}</title><style>{PAGE_CSS}</style></head>"
        f"<body>{body}{js}</body></html>\n"
    )


def feature_page(
    stats: StatsLike,
    i: int,
    title: str,
    prev_id: int | None = None,
    next_id: int | None = None,
    top: Sequence[ExampleLike] | None = None,
) -> str:
    """The page of row ``i``, ``features/<feature id>.html``: links back to the index and to the
    neighbouring pages (``prev_id``, ``next_id``: feature ids), then the fragment."""
    links = ['<a href="../index.html">↑ all features</a>']
    if prev_id is not None:
        links.append(f'<a class="prev" href="{int(prev_id)}.html">← feature {int(prev_id)}</a>')
    if next_id is not None:
        links.append(f'<a class="next" href="{int(next_id)}.html">feature {int(next_id)} →</a>')
    body = (
        f'<nav>{"".join(links)}<span style="color:#777">{esc(title)}</span></nav>'
        f"{feature_fragment(stats, i, top)}"
    )
    return page(f"Feature {_feature_id(stats, i)} · {title}", body)


def preview_and_search_tokens(
    examples: Sequence[ExampleLike], preview: int = 5, window: int = 4
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
    stats: StatsLike,
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
        [float(v) for v in getattr(stats, name).tolist()]
        for name in ("density", "mean_act", "max_act")
    )
    ids = feature_ids(stats)
    rows = []
    for i in range(n):
        dead = not density[i] > 0
        fid = ids[i]
        ident = f'<a href="features/{fid}.html">{fid}</a>' if i in pages else str(fid)
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
