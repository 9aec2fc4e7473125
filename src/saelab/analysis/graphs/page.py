"""The attribution graph as one self-contained page: ``DIR/index.html`` beside ``DIR/graph.json``.

The page holds the whole graph (the ``graph.json`` dict, embedded with :func:`script_json` in a
``<script type="application/json">``), its CSS and its script inline, and loads nothing. The
script draws the graph as an SVG of layers × prompt positions: embeddings on the bottom row,
then layers 0..n-1, logits on top; one column per prompt token, labelled with it. A feature node
is a circle, an error node a grey square, an embedding a square, a logit a diamond. Edges are
drawn with width by ``|weight|`` (relative to the largest drawn edge) and colour by sign
(green positive, red negative).

Two sliders prune what is drawn:

* **node threshold** ``t_n`` starts at the graph's ``metadata.node_threshold`` (the builder's,
  on the slider's 0.01 grid: ``t_0``), where exactly the nodes with ``kept: true`` are drawn
  (the builder also drops nodes left without edges). A feature or error node's ``influence`` is
  its place on the cumulative-influence curve (the share of the total influence carried by the
  nodes ranked above it: pruning at ``t`` keeps those below ``t``); below ``t_0`` the kept nodes
  with influence < ``t_n`` are drawn, above it the kept ones and every node with influence
  < ``t_n`` (at 1 all but those that carry no influence).
  Embeddings and logits are drawn when kept, at any threshold.
* **edge share** ``t_e`` starts at 1. The candidate links join two drawn nodes and are kept,
  or were pruned only with a pruned node (one of their ends is not kept); of those, the
  strongest by ``|weight|`` that together carry the share ``t_e`` of their total ``|weight|``
  are drawn: all of them at 1, none at 0.

Above the graph: the prompt and its tokens, the score line (replacement and completeness scores of
the full and the pruned graph) and, when ``metadata.intervention`` holds one, the intervention's
predicted and measured logit changes. Clicking a node shows what the graph knows of it in a side
panel (type, layer, position and token, feature id, activation, influence, its strongest inputs and
outputs, and, when the node has ``details`` from ``saelab features`` output, density, top examples
and logit effects).

Every data string reaches the page as text: in the HTML written here through :func:`esc`
(:func:`html.escape`), in the script only through ``textContent`` and ``setAttribute``, never
``innerHTML``; the embedded JSON cannot close its script element (``<``, ``>``, ``&`` are
``\\u003c``...; NaN and infinities become ``null``, which ``JSON.parse`` accepts). The page's look
follows the dashboard's (:mod:`saelab.analysis.dashboard.pages`).

Example:
    >>> graph = json.loads(Path("runs/graph/graph.json").read_text())
    >>> write_graph_page(Path("runs/graph"), graph)      # runs/graph/index.html
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from saelab.analysis.dashboard.pages import page, script_json
from saelab.analysis.dashboard.render import esc, fmt, token_html
from saelab.atomic import write_text
from saelab.errors import SaelabError

GRAPH_FORMAT = "saelab-graph"
"""The ``format`` field of a ``graph.json`` dict."""
PAGE_FILENAME = "index.html"
"""The graph's page inside its folder."""
DATA_ID = "graph-data"
"""Id of the ``<script type="application/json">`` element holding the graph."""
DEFAULT_NODE_THRESHOLD = 0.8
"""The node slider's start when the graph's metadata names no node threshold."""

GRAPH_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:14px;color:#222;
margin:12px 16px;padding:0}
h2{margin:4px 0 6px;font-size:18px}
p{margin:4px 0}
table.intervention td,table.intervention th{padding:1px 10px 1px 0;text-align:right}
code.t{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:13px;
background:#f3f3f3;border-radius:3px;padding:0 3px;margin-right:3px;white-space:pre}
.scores{color:#333}.scores b{font-weight:600}
.controls{margin:8px 0;display:flex;flex-wrap:wrap;gap:18px;align-items:center}
.controls input[type=range]{width:220px;vertical-align:middle}
#counts{color:#555}
.layout{display:flex;gap:12px;align-items:flex-start}
#graph-box{flex:1 1 auto;overflow:auto;border:1px solid #ddd;max-height:82vh;background:#fff}
#panel{flex:0 0 360px;max-height:82vh;overflow:auto;border:1px solid #ddd;padding:8px 10px;
background:#fafafa}
#panel h3{margin:2px 0 6px;font-size:15px}
#panel h4{margin:12px 0 4px;font-size:13px}
#panel table{border-collapse:collapse}
#panel td{padding:1px 8px 1px 0;vertical-align:top}
#panel .ctx{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:12px;
line-height:1.8;white-space:pre-wrap;word-break:break-word;border-bottom:1px solid #eee;
padding:2px 0}
#panel .tok.on{margin-right:1px}
#panel .tok.mx{outline:1px solid #b34700}
#panel .link{cursor:pointer;color:#0550ae}
#panel table.logits{vertical-align:top}#panel table.logits th{text-align:left}
#panel table.logits td:first-child{max-width:170px;overflow-wrap:anywhere;white-space:pre-wrap}
#panel .link:hover{text-decoration:underline}
.mono{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:12px}
.pos{color:#1a7f37}.neg{color:#b3261e}
svg text{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,monospace;font-size:11px}
g.node{cursor:pointer}
g.node.sel circle,g.node.sel rect,g.node.sel path{stroke:#000;stroke-width:2.5}
path.edge{fill:none}
svg.dim path.edge{opacity:.12}
svg.dim path.edge.hot{opacity:.95}
""".strip()

GRAPH_JS = r"""
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var graph = JSON.parse(document.getElementById("graph-data").textContent);
  var meta = graph.metadata || {};
  var nodes = graph.nodes || [], links = graph.links || [];
  var byId = {}, inputs = {}, outputs = {};
  nodes.forEach(function (n) {
    byId[n.node_id] = n;
    inputs[n.node_id] = [];
    outputs[n.node_id] = [];
  });
  links.forEach(function (l) {
    if (inputs[l.target]) inputs[l.target].push(l);
    if (outputs[l.source]) outputs[l.source].push(l);
  });
  var tokens = meta.prompt_tokens || [];
  var maxLayer = 0, maxPos = tokens.length - 1;
  nodes.forEach(function (n) {
    if (typeof n.layer === "number") maxLayer = Math.max(maxLayer, n.layer);
    if (typeof n.ctx_idx === "number") maxPos = Math.max(maxPos, n.ctx_idx);
  });
  var nLayers = typeof meta.n_layers === "number" ? meta.n_layers : maxLayer;
  var nPos = maxPos + 1;
  var nodeSlider = document.getElementById("node-threshold");
  var edgeSlider = document.getElementById("edge-share");
  var svg = document.getElementById("graph");
  var panel = document.getElementById("panel");
  var selected = null;

  var SIGNS = { "\n": "\u23ce", "\r": "\u21b5", "\t": "\u21e5" };
  // A token as the dashboard shows it: invisible characters as signs, a blank token (or with
  // `spaces`, every space) as dots.
  function visible(token, spaces) {
    var t = token === null || token === undefined ? "" : String(token), out = "";
    if (spaces || (t && !t.replace(/ /g, "").length)) t = t.replace(/ /g, "\u00b7");
    for (var i = 0; i < t.length; i++) {
      var c = t[i], code = t.charCodeAt(i);
      if (SIGNS[c]) out += SIGNS[c];
      else if (code < 0x20 || code === 0x7f) out += "\\x" + ("0" + code.toString(16)).slice(-2);
      else out += c;
    }
    return out || "\u2205";
  }
  function fmt(v) {
    if (v === null || v === undefined || v === "") return "\u2013";
    var x = Number(v);
    if (!isFinite(x)) return String(v);
    return x === 0 ? "0" : String(parseFloat(x.toPrecision(4)));
  }
  function kind(n) {
    var t = String(n.feature_type || "");
    if (t === "embedding") return "embedding";
    if (t === "logit") return "logit";
    if (t.indexOf("error") !== -1) return "error";
    return "feature";
  }
  // The module docstring of saelab.analysis.graphs.page states these rules.
  var savedThreshold = parseFloat(nodeSlider.value);
  function isDrawn(n, tn) {
    var k = kind(n), kept = n.kept !== false;
    if (k === "embedding" || k === "logit" || Math.abs(tn - savedThreshold) < 1e-9) return kept;
    var within = typeof n.influence === "number" && n.influence < tn;
    return tn < savedThreshold ? kept && within : kept || within;
  }
  function linkCandidate(l) {
    // A link between two kept nodes that is not kept was pruned for itself; one from or to
    // a node the builder pruned was pruned with it, and shows when the node is drawn.
    return l.kept !== false || byId[l.source].kept === false || byId[l.target].kept === false;
  }
  function el(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function h(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function rowLabel(layer) {
    if (layer < 0) return "Emb";
    if (layer >= nLayers) return "Logit";
    return "L" + layer;
  }
  function nodeTitle(n) {
    var k = kind(n);
    var dot = " \u00b7 ", where = dot + "position " + n.ctx_idx;
    if (k === "feature") return "Feature " + n.feature + dot + "layer " + n.layer + where;
    if (k === "error") return "Error" + dot + "layer " + n.layer + where;
    if (k === "embedding") return "Embedding" + where + dot + visible(n.token);
    return "Logit " + visible(n.token) + where;
  }
  function nodeLabel(n) {
    var k = kind(n);
    if (k === "feature") return String(n.feature);
    if (k === "error") return "err";
    return visible(n.token);
  }

  var NODE_COLOUR = {
    feature: "#f6c28b", error: "#c8c8c8", embedding: "#9ecae1", logit: "#b7dfb0"
  };
  var STROKE = { feature: "#b35a00", error: "#777", embedding: "#2b6c99", logit: "#2f7d32" };

  function shape(n, x, y) {
    var k = kind(n), fill = NODE_COLOUR[k], stroke = STROKE[k];
    if (k === "feature") return el("circle", { cx: x, cy: y, r: 5.5, fill: fill, stroke: stroke });
    if (k === "logit") {
      return el("path", { d: "M" + x + " " + (y - 7) + "L" + (x + 7) + " " + y + "L" + x + " " +
        (y + 7) + "L" + (x - 7) + " " + y + "Z", fill: fill, stroke: stroke });
    }
    var s = k === "error" ? 9 : 11;
    return el("rect", {
      x: x - s / 2, y: y - s / 2, width: s, height: s, fill: fill, stroke: stroke
    });
  }
  function cellOrder(a, b) {
    var ka = kind(a), kb = kind(b);
    if (ka !== kb) return ka < kb ? -1 : 1;
    if (ka === "logit") return (b.token_prob || 0) - (a.token_prob || 0);
    var d = (a.influence || 0) - (b.influence || 0);
    if (d) return d;
    return String(a.node_id) < String(b.node_id) ? -1 : 1;
  }
  function drawnLinks(drawn, share) {
    var cand = links.filter(function (l) {
      return drawn[l.source] && drawn[l.target] && linkCandidate(l);
    });
    cand.sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); });
    if (share >= 1) return cand;
    var total = 0;
    cand.forEach(function (l) { total += Math.abs(l.weight); });
    var out = [], cum = 0;
    for (var i = 0; i < cand.length && share > 0 && cum < share * total; i++) {
      out.push(cand[i]);
      cum += Math.abs(cand[i].weight);
    }
    return out;
  }

  function render() {
    var tn = parseFloat(nodeSlider.value), te = parseFloat(edgeSlider.value);
    document.getElementById("node-threshold-value").textContent = tn.toFixed(2);
    document.getElementById("edge-share-value").textContent = te.toFixed(2);
    var drawn = {}, cells = {}, maxCell = 1;
    nodes.forEach(function (n) {
      if (!isDrawn(n, tn)) return;
      drawn[n.node_id] = true;
      var key = n.layer + ":" + n.ctx_idx;
      (cells[key] = cells[key] || []).push(n);
      maxCell = Math.max(maxCell, cells[key].length);
    });
    var shown = drawnLinks(drawn, te);
    var colW = Math.max(84, Math.min(maxCell, 24) * 16 + 16);
    var rowH = Math.max(26, Math.min(56, Math.floor(720 / (nLayers + 2))));
    var left = 56, top = 18, bottom = 46;
    var width = left + nPos * colW + 10, height = top + (nLayers + 2) * rowH + bottom;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    function rowY(layer) {
      return top + (nLayers - Math.max(-1, Math.min(nLayers, layer))) * rowH + rowH / 2;
    }
    var grid = el("g", { "class": "grid" });
    for (var layer = -1; layer <= nLayers; layer++) {
      var y = rowY(layer);
      grid.appendChild(el("line", { x1: left, y1: y, x2: width - 10, y2: y, stroke: "#eee" }));
      grid.appendChild(el("text", { x: 4, y: y + 4, fill: "#666" }, rowLabel(layer)));
    }
    for (var p = 0; p < nPos; p++) {
      var x0 = left + p * colW;
      grid.appendChild(el("line", {
        x1: x0, y1: top, x2: x0, y2: height - bottom, stroke: "#f3f3f3"
      }));
      var tok = visible(tokens[p]);
      var fits = Math.max(3, Math.floor(colW / 7) - 1);
      var lab = el("text", {
        "class": "tok-label", x: x0 + colW / 2, y: height - bottom + 16,
        "text-anchor": "middle", fill: "#222"
      }, tok.length > fits ? tok.slice(0, fits - 1) + "\u2026" : tok);
      lab.appendChild(el("title", {}, "position " + p + ": " + tok));
      grid.appendChild(lab);
      grid.appendChild(el("text", {
        x: x0 + colW / 2, y: height - bottom + 32, "text-anchor": "middle", fill: "#999"
      }, String(p)));
    }
    svg.appendChild(grid);
    var at = {};
    var room = {};
    Object.keys(cells).forEach(function (key) {
      var cell = cells[key].sort(cellOrder);
      cell.forEach(function (n, j) {
        var pos = typeof n.ctx_idx === "number" ? n.ctx_idx : 0;
        var x = left + pos * colW + 8 + (j + 0.5) * (colW - 16) / cell.length;
        at[n.node_id] = [x, rowY(typeof n.layer === "number" ? n.layer : 0)];
        room[n.node_id] = Math.max(2, Math.floor((colW - 16) / cell.length / 6.6));
      });
    });
    var maxW = 0;
    shown.forEach(function (l) { maxW = Math.max(maxW, Math.abs(l.weight)); });
    var edges = el("g", { "class": "edges" });
    shown.forEach(function (l) {
      var a = at[l.source], b = at[l.target], dy = (b[1] - a[1]) / 2;
      var rel = maxW > 0 ? Math.abs(l.weight) / maxW : 0;
      var hot = selected && (l.source === selected || l.target === selected);
      var path = el("path", {
        "class": hot ? "edge hot" : "edge",
        d: "M" + a[0] + " " + a[1] + "C" + a[0] + " " + (a[1] + dy) + " " + b[0] + " " +
          (b[1] - dy) + " " + b[0] + " " + b[1],
        stroke: l.weight >= 0 ? "#1a7f37" : "#b3261e",
        "stroke-width": (0.4 + 4.6 * rel).toFixed(2),
        "stroke-opacity": (0.2 + 0.6 * rel).toFixed(2)
      });
      path.setAttribute("data-source", l.source);
      path.setAttribute("data-target", l.target);
      path.appendChild(el("title", {}, fmt(l.weight)));
      edges.appendChild(path);
    });
    svg.appendChild(edges);
    var group = el("g", { "class": "nodes" });
    nodes.forEach(function (n) {
      if (!drawn[n.node_id]) return;
      var xy = at[n.node_id];
      var g = el("g", { "class": "node " + kind(n) + (n.node_id === selected ? " sel" : "") });
      g.setAttribute("data-node", n.node_id);
      g.appendChild(shape(n, xy[0], xy[1]));
      var label = nodeLabel(n), fit = room[n.node_id];
      if (kind(n) !== "error" && (kind(n) !== "feature" || label.length <= fit)) {
        g.appendChild(el("text", { x: xy[0], y: xy[1] - 9, "text-anchor": "middle", fill: "#444",
          "font-size": "9" }, label.length > fit ? label.slice(0, fit - 1) + "\u2026" : label));
      }
      g.appendChild(el("title", {}, nodeTitle(n)));
      g.addEventListener("click", function () { select(n.node_id); });
      group.appendChild(g);
    });
    svg.appendChild(group);
    svg.setAttribute("class", selected && drawn[selected] ? "dim" : "");
    document.getElementById("counts").textContent =
      Object.keys(drawn).length + " nodes \u00b7 " + shown.length + " edges drawn (of " +
      nodes.length + " nodes, " + links.length + " links)";
  }

  function row(table, key, value) {
    var tr = document.createElement("tr");
    tr.appendChild(h("td", key));
    var td = h("td", value);
    td.setAttribute("data-key", key);
    tr.appendChild(td);
    table.appendChild(tr);
  }
  function linkList(title, list, other) {
    var box = h("div");
    box.appendChild(h("h4", title));
    var sorted = list.slice().sort(function (a, b) {
      return Math.abs(b.weight) - Math.abs(a.weight);
    });
    if (!sorted.length) box.appendChild(h("p", "none"));
    sorted.slice(0, 8).forEach(function (l) {
      var n = byId[l[other]], p = h("div", null, "mono");
      var w = h("span", (l.weight >= 0 ? "+" : "") + fmt(l.weight), l.weight >= 0 ? "pos" : "neg");
      p.appendChild(w);
      p.appendChild(document.createTextNode(" "));
      var a = h("span", n ? nodeTitle(n) : String(l[other]), "link");
      a.addEventListener("click", function () { if (n) select(n.node_id); });
      p.appendChild(a);
      box.appendChild(p);
    });
    return box;
  }
  function examples(list) {
    var box = h("div", null, "examples");
    var top = 0;
    list.forEach(function (ex) {
      (ex.acts || []).forEach(function (a) { top = Math.max(top, Number(a) || 0); });
    });
    list.forEach(function (ex) {
      var div = h("div", null, "ctx");
      var acts = ex.acts || [], best = typeof ex.max_index === "number" ? ex.max_index : -1;
      (ex.tokens || []).forEach(function (t, j) {
        var a = Number(acts[j] || 0), span = h("span", visible(t), "tok");
        if (a > 0 && top > 0) {
          span.className = "tok on" + (j === best ? " mx" : "");
          var alpha = Math.max(Math.min(a / top, 1), 0.08);
          span.style.background = "rgba(255,110,0," + alpha.toFixed(3) + ")";
          span.setAttribute("title", fmt(a));
        }
        div.appendChild(span);
      });
      box.appendChild(div);
    });
    return box;
  }
  function logitTable(title, rows, cls) {
    var t = document.createElement("table");
    t.className = "logits mono";
    var head = document.createElement("tr");
    head.appendChild(h("th", title));
    t.appendChild(head);
    (rows || []).forEach(function (r) {
      var tr = document.createElement("tr");
      tr.appendChild(h("td", visible(r[0], true)));
      tr.appendChild(h("td", fmt(r[1]), cls));
      t.appendChild(tr);
    });
    return t;
  }
  function select(id) {
    selected = id;
    var n = byId[id];
    while (panel.firstChild) panel.removeChild(panel.firstChild);
    panel.appendChild(h("h3", nodeTitle(n)));
    var table = document.createElement("table");
    table.className = "node-info";
    row(table, "node", n.node_id);
    row(table, "type", n.feature_type);
    row(table, "layer", n.layer);
    row(table, "position", n.ctx_idx);
    row(table, "token", visible(n.token));
    if (kind(n) === "feature") row(table, "feature", n.feature);
    var actName = { error: "norm", logit: "logit" }[kind(n)] || "activation";
    row(table, actName, fmt(n.activation));
    row(table, "influence", fmt(n.influence));
    row(table, "kept", n.kept === false ? "no (pruned)" : "yes");
    if (kind(n) === "logit") row(table, "probability", fmt(n.token_prob));
    panel.appendChild(table);
    var d = n.details;
    if (d) {
      if (d.density !== undefined) panel.appendChild(h("p", "density " + fmt(d.density) +
        (d.max_act !== undefined ? " \u00b7 max act " + fmt(d.max_act) : ""), "density"));
      if (d.top_examples && d.top_examples.length) {
        panel.appendChild(h("h4", "Top examples"));
        panel.appendChild(examples(d.top_examples));
      }
      var le = d.logit_effects;
      if (le && ((le.promoted || []).length || (le.suppressed || []).length)) {
        panel.appendChild(h("h4", "Logit effects"));
        var flex = h("div");
        flex.style.display = "flex";
        flex.style.gap = "16px";
        flex.style.alignItems = "flex-start";
        flex.appendChild(logitTable("promoted", le.promoted, "pos"));
        flex.appendChild(logitTable("suppressed", le.suppressed, "neg"));
        panel.appendChild(flex);
      }
    } else if (kind(n) === "feature") {
      panel.appendChild(h("p", "No saelab features output for this layer: run saelab " +
        "features on its transcoder for examples and logit effects.", "no-details"));
    }
    panel.appendChild(linkList("Strongest inputs", inputs[id] || [], "source"));
    panel.appendChild(linkList("Strongest outputs", outputs[id] || [], "target"));
    render();
  }
  nodeSlider.addEventListener("input", render);
  edgeSlider.addEventListener("input", render);
  render();
})();
""".strip()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def score_line(metadata: dict[str, Any]) -> str:
    """The graph's replacement and completeness scores (full and pruned graph) as HTML."""
    scores = metadata.get("scores") or {}
    if not isinstance(scores, dict):
        scores = {}

    def score(key: str) -> str:
        value = _number(scores.get(key))
        return f'<b data-score="{esc(key)}">{esc(fmt(value, 3)) if value is not None else "–"}</b>'

    return (
        '<p class="scores">replacement score '
        f"{score('replacement')} · completeness score {score('completeness')} · pruned graph: "
        f"replacement {score('pruned_replacement')} · completeness "
        f"{score('pruned_completeness')}</p>"
    )


def _json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinity as ``null``: ``JSON.parse`` refuses them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def intervention_table(metadata: dict[str, Any]) -> str:
    """The intervention ``saelab graph --ablate/--scale/--clamp`` ran (``metadata.intervention``):
    each target token's predicted and measured logit change, as HTML; "" when there was none."""
    info = metadata.get("intervention")
    if not isinstance(info, dict):
        return ""
    rows = "".join(
        f"<tr><td><code class=t>{token_html(str(tok), spaces=True)}</code></td>"
        f"<td>{esc(fmt(p, 3)) if _number(p) is not None else '–'}</td>"
        f"<td>{esc(fmt(m, 3)) if _number(m) is not None else '–'}</td></tr>"
        for tok, p, m in zip(
            info.get("tokens") or [],
            info.get("predicted") or [],
            info.get("measured") or [],
            strict=False,  # a shorter list shows fewer rows, not an error
        )
    )
    edits = ", ".join(str(e) for e in info.get("edits") or [])
    return (
        f'<details class="intervention"><summary>intervention {esc(edits)}: predicted and '
        "measured change of the target logits</summary>"
        '<table class="intervention"><tr><th>token</th><th>predicted</th><th>measured</th></tr>'
        f"{rows}</table></details>"
    )


def _check_graph(graph: Any) -> None:
    fix = "pass the dict of a graph.json written by saelab graph"
    if not isinstance(graph, dict) or graph.get("format") != GRAPH_FORMAT:
        raise SaelabError(f"not an attribution graph (format {GRAPH_FORMAT!r} expected); {fix}")
    if not isinstance(graph.get("nodes"), list) or not isinstance(graph.get("links"), list):
        raise SaelabError(f"the graph lacks its 'nodes' and 'links' lists; {fix}")
    if not isinstance(graph.get("metadata", {}), dict):
        raise SaelabError(f"the graph's 'metadata' is not an object; {fix}")
    ids = set()
    for node in graph["nodes"]:
        if not isinstance(node, dict) or "node_id" not in node:
            raise SaelabError(f"a node of the graph has no node_id; {fix}")
        ids.add(node["node_id"])
    for link in graph["links"]:
        if not isinstance(link, dict) or _number(link.get("weight")) is None:
            raise SaelabError(f"a link of the graph has no finite weight; {fix}")
        missing = {link.get("source"), link.get("target")} - ids
        if missing:
            names = sorted(map(str, missing))
            raise SaelabError(f"a link of the graph names unknown nodes {names}; {fix}")


def graph_page(graph: dict[str, Any]) -> str:
    """The whole page of ``graph`` (a ``graph.json`` dict) as a string; see the module docstring."""
    _check_graph(graph)
    meta = graph.get("metadata", {})
    prompt = str(meta.get("prompt", ""))
    tokens = meta.get("prompt_tokens") or []
    node_t = _number(meta.get("node_threshold"))
    node_t = DEFAULT_NODE_THRESHOLD if node_t is None else min(max(node_t, 0.0), 1.0)
    edge_t = _number(meta.get("edge_threshold"))
    data = script_json(_json_safe(graph))
    about = " · ".join(
        f"{esc(key)} <code>{esc(meta[key])}</code>"
        for key in ("model", "kind", "replacement")
        if meta.get(key) is not None
    )
    thresholds = (
        f"pruned at node threshold {esc(fmt(node_t, 3))}"
        + (f", edge threshold {esc(fmt(edge_t, 3))}" if edge_t is not None else "")
        + f" · {sum(1 for n in graph['nodes'] if n.get('kept'))} of {len(graph['nodes'])} nodes "
        f"and {sum(1 for e in graph['links'] if e.get('kept'))} of {len(graph['links'])} links kept"
    )
    body = (
        f'<h2>Attribution graph: <span class="prompt">{esc(prompt)}</span></h2>'
        f'<p class="tokens">{"".join(f"<code class=t>{token_html(str(t))}</code>" for t in tokens)}'
        "</p>"
        f"{score_line(meta)}"
        f'<p class="about" style="color:#555">{about}{" · " if about else ""}{thresholds}</p>'
        f"{intervention_table(meta)}"
        '<div class="controls">'
        '<label>node threshold <input id="node-threshold" type="range" min="0" max="1" '
        f'step="0.01" value="{node_t:.2f}"> <span id="node-threshold-value"></span></label>'
        '<label title="the strongest edges that carry this share of the drawn edges\' |weight|">'
        'edge share <input id="edge-share" type="range" min="0" max="1" step="0.01" value="1">'
        ' <span id="edge-share-value"></span></label>'
        '<span id="counts"></span></div>'
        '<div class="layout"><div id="graph-box">'
        '<svg id="graph" xmlns="http://www.w3.org/2000/svg" role="img" '
        'aria-label="attribution graph"></svg></div>'
        '<div id="panel"><p>Click a node to see it here. Rows are layers (embeddings at the '
        "bottom, logits on top), columns prompt positions; green edges excite, red inhibit, "
        "width by |weight|.</p></div></div>"
        f'<script type="application/json" id="{DATA_ID}">{data}</script>'
    )
    return page(f"Attribution graph · {prompt}", body, GRAPH_JS, css=GRAPH_CSS)


def write_graph_page(out_dir: Path, graph: dict[str, Any]) -> Path:
    """Write ``out_dir/index.html``, the page of ``graph`` (a ``graph.json`` dict), atomically.

    A graph that is not one is a one-line :class:`SaelabError` and nothing is written.

    >>> write_graph_page(Path("runs/graph"), graph)      # PosixPath('runs/graph/index.html')
    """
    text = graph_page(graph)
    return write_text(Path(out_dir) / PAGE_FILENAME, text)
