"""One feature's statistics → an HTML fragment, and its parts. Pure functions: no files, no torch
maths, no globals.

Every string that comes from data (tokens, model names, paths, metadata) passes through
:func:`html.escape` on its way into the page, so a token such as ``</script><script>alert(1)
</script>`` is shown as text and never runs. Styles are inline in :func:`feature_fragment`, so a
fragment renders the same in a Jupyter cell as on the dashboard's feature page (whole pages of the
site are :mod:`saelab.analysis.dashboard.pages`).

Example:
    >>> from IPython.display import HTML
    >>> HTML(feature_fragment(FeatureStats.load("runs/demo/SAE/features"), 3))
"""

from __future__ import annotations

import html
import math
import shlex
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing features at run time loads the model stack
    from saelab.analysis.features import Example, FeatureStats

WHITESPACE_SIGNS = {"\n": "⏎", "\r": "↵", "\t": "⇥"}
"""How invisible characters of a token are shown, so that contexts stay readable."""

HIGHLIGHT_RGB = (255, 110, 0)
"""Token background colour; its opacity is the activation over the feature's maximum."""

FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:14px;color:#222"
MONO = "font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:13px"


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


def context_html(example: Example, max_act: float) -> str:
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


def contexts_html(examples: Iterable[Example], max_act: float, css_class: str) -> str:
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


def feature_ids(stats: FeatureStats) -> list[int]:
    """The SAE feature id of each row of ``stats`` (not the row itself for statistics of a slice
    of the features)."""
    return [int(f) for f in stats.feature_ids.tolist()]


def feature_id(stats: FeatureStats, i: int) -> int:
    """The SAE feature id of row ``i`` of ``stats``."""
    return int(stats.feature_ids[i])


def is_dead(stats: FeatureStats, i: int) -> bool:
    """A feature that never fired on the tokens the statistics were gathered over."""
    return not float(stats.density[i]) > 0


def summary_line(stats: FeatureStats, i: int) -> str:
    """Density, log10 density, mean and max activation of feature ``i`` as one line of HTML."""
    density, mean_act, max_act = (
        float(v[i]) for v in (stats.density, stats.mean_act, stats.max_act)
    )
    return (
        f'<span class="summary">density {esc(fmt(density))} '
        f"(log10 {esc(log10_density(density))}) · mean act {esc(fmt(mean_act))}"
        f" · max act {esc(fmt(max_act))} · over {int(stats.n_tokens):,} tokens"
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


def steer_line(stats: FeatureStats, i: int) -> str:
    """The "Steer with this feature" line: row ``i``'s :func:`steer_command` as HTML."""
    command = steer_command(stats.meta, feature_id(stats, i), dead=is_dead(stats, i))
    return (
        '<p class="steer" style="margin:6px 0;color:#555">Steer with this feature: '
        f'<code style="{MONO};background:#f3f3f3;padding:1px 4px;user-select:all;'
        f'overflow-wrap:anywhere">{esc(command)}</code></p>'
    )


def _section(title: str, body: str) -> str:
    return f'<h4 style="margin:14px 0 4px;font-size:14px">{esc(title)}</h4>{body}'


def feature_fragment(stats: FeatureStats, i: int, top: Sequence[Example] | None = None) -> str:
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
    max_act = float(stats.max_act[i])
    fid = feature_id(stats, i)
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
