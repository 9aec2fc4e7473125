"""``saelab graph``: the attribution graph of one prompt through a replacement set, its scores,
``graph.json`` and ``index.html``, and interventions. The options are the fields of
:class:`~saelab.analysis.graphs.config.GraphConfig` and of :class:`GraphRun`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from saelab.cli.command import Command
from saelab.cli.options import DEVICES, add_options, options_from
from saelab.outputs import check_output_location

_MEMORY_RULE = (
    "Memory: dense rows where they fit, (max-features + logits) x (active features + layers x "
    "positions + positions) float32 numbers within --max-adjacency-mb, features chosen greedily "
    "by influence; otherwise chunked: the features are chosen up front by their direct effect "
    "on the logits and each batch of rows is folded to (max-features + layers x positions + "
    "positions) columns as it is computed. Plus one prompt copy's activations and gradients per "
    "target of a batch (--batch-size)."
)


@dataclass(frozen=True)
class GraphRun:
    """Where a graph is built; the keywords of ``run_graph``."""

    model_name: str | None = None
    """Model the set replaces the MLPs of. Default: the one its manifest names."""
    device: str = "cpu"
    """Where the model and the replacement run: cpu or cuda."""


def _add_graph(parser: argparse.ArgumentParser) -> None:
    from saelab.analysis.graphs.config import GraphConfig

    parser.description = f"{parser.description}. {_MEMORY_RULE}"
    parser.add_argument(
        "--replacement",
        required=True,
        metavar="DIR",
        help="replacement set folder (replacement.json), or a run folder holding one",
    )
    add_options(parser, GraphConfig)
    add_options(parser, GraphRun, rename={"model_name": "--model"}, choices={"device": DEVICES})
    parser.add_argument("--out", default="runs/graph", help="output folder (default: runs/graph)")


def _run_graph(args: argparse.Namespace) -> int:
    from saelab.analysis.graphs.config import GraphConfig

    cfg, where = options_from(args, GraphConfig), options_from(args, GraphRun)
    check_output_location(args.out, replaced=True)
    from saelab.analysis.graphs.run import GRAPH_FILES, format_graph_report, run_graph

    result = run_graph(
        args.replacement,
        cfg,
        model_name=where.model_name,
        device=where.device,
        out=args.out,
        progress=not args.quiet,
    )
    print(format_graph_report(result))
    print(f"{', '.join(GRAPH_FILES)} in {args.out}")
    return 0


COMMANDS = {
    "graph": Command(
        "attribution graph of a prompt through a replacement set (transcoders at every layer)",
        _add_graph,
        _run_graph,
    ),
}
