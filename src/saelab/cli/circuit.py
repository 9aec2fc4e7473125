"""``saelab circuit``: feature attributions, top-k keeping and a faithfulness curve on a task, or
(``--compare``) two SAEs of one hook side by side. The options are the fields of
:class:`~saelab.analysis.circuits.config.CircuitConfig` and of :class:`CircuitRun`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from saelab.analysis.circuits.config import (
    ABLATIONS,
    CIRCUIT_METHODS,
    KEEP_PER,
    RANK_BY,
    CircuitConfig,
)
from saelab.cli.command import Command
from saelab.cli.options import DEVICES, add_options, options_from
from saelab.outputs import check_output_location


@dataclass(frozen=True)
class CircuitRun:
    """Where a circuit run happens; the keywords of ``run_circuit`` and ``run_compare``."""

    model_name: str | None = None
    """Model the SAEs are spliced into. Default: the one the SAE was trained on."""
    device: str = "cpu"
    """Where the model and the SAEs run: cpu or cuda."""


def _add_circuit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sae", nargs="+", required=True, metavar="SAE_DIR", help="SAE folder(s), one per hook"
    )
    add_options(
        parser,
        CircuitConfig,
        choices={
            "method": CIRCUIT_METHODS,
            "ablation": ABLATIONS,
            "keep_per": KEEP_PER,
            "rank_by": RANK_BY,
        },
    )
    add_options(parser, CircuitRun, rename={"model_name": "--model"}, choices={"device": DEVICES})
    parser.add_argument(
        "--compare",
        action="store_true",
        help="two SAEs at one hook: top-k of the larger-L0 one vs the one with L0 ~ k",
    )
    parser.add_argument(
        "--out", default="runs/circuit", help="output folder (default: runs/circuit)"
    )


def _run_circuit(args: argparse.Namespace) -> int:
    check_output_location(args.out)
    from saelab.analysis.circuits.run import (
        CIRCUIT_FILES,
        COMPARE_FILES,
        format_circuit_report,
        format_compare_report,
        run_circuit,
        run_compare,
    )

    cfg, where = options_from(args, CircuitConfig), options_from(args, CircuitRun)
    run, report, files = (
        (run_compare, format_compare_report, COMPARE_FILES)
        if args.compare
        else (run_circuit, format_circuit_report, CIRCUIT_FILES)
    )
    result = run(
        args.sae,
        cfg,
        model_name=where.model_name,
        device=where.device,
        out=args.out,
        progress=not args.quiet,
    )
    print(report(result))
    print(f"{', '.join(files)} in {args.out}")
    return 0


COMMANDS = {
    "circuit": Command(
        "feature attributions, top-k keeping and faithfulness on a task (IOI)",
        _add_circuit,
        _run_circuit,
    ),
}
