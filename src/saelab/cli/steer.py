"""``saelab steer``: build a steering vector (or load one), sweep its coefficient, report effect,
cost and generations. Every option is a field of
:class:`~saelab.analysis.steering.config.SteerVectorConfig` (how the vector is built) or
:class:`~saelab.analysis.steering.config.SteerConfig` (how it is applied and scored)."""

from __future__ import annotations

import argparse

from saelab.analysis.steering.config import (
    SAE_UNITS,
    STEERING_METHODS,
    STEERING_POSITIONS,
    SteerConfig,
    SteerVectorConfig,
)
from saelab.cli.command import Command
from saelab.cli.options import DEVICES, add_options, options_from
from saelab.errors import SaelabError
from saelab.outputs import check_output_location

_SHARED = ("context", "seed")
"""Fields of both configs: one flag each (declared with SteerConfig) sets both."""

_METAVARS = {
    "vector": "DIR",
    "pairs": "JSONL",
    "positive": "TEXT",
    "negative": "TEXT",
    "target": "SPEC",
    "general": "SPEC",
    "sae": "SAE_DIR",
    "stats": "DIR",
    "coefs": "C",
    "eval": "JSONL",
    "neutral": "SPEC",
    "generate": "PROMPT",
    "transfer_layers": "LAYERS",
    "transfer_model": "NAME",
    "explain_with": "SAE_DIR",
}


def _add_steer(parser: argparse.ArgumentParser) -> None:
    how = parser.add_argument_group("the vector (--method, or --vector)")
    # No --method means no vector is built: then --vector names a saved one.
    add_options(
        how,
        SteerVectorConfig,
        exclude=_SHARED,
        choices={"method": STEERING_METHODS, "sae_units": SAE_UNITS},
        metavars=_METAVARS,
        defaults={"method": None},
    )
    add_options(how, SteerConfig, ("vector",), metavars=_METAVARS)
    use = parser.add_argument_group("the sweep")
    add_options(
        use,
        SteerConfig,
        exclude=("build", "vector"),
        choices={"positions": STEERING_POSITIONS, "device": DEVICES},
        metavars=_METAVARS,
    )
    use.add_argument("--out", default="runs/steer", help="output folder (default: runs/steer)")


def _run_steer(args: argparse.Namespace) -> int:
    check_output_location(args.out)
    from saelab.analysis.steering.run import (
        format_generations,
        format_sweep_table,
        format_transfer_tables,
        run_steer,
    )

    if args.vector is not None and args.method is None and args.hook is not None:
        raise SaelabError(
            "--hook chooses where a vector is built; a saved vector (--vector) is applied at its "
            "own hook, and --transfer-layers applies it at others"
        )
    build = None if args.method is None else options_from(args, SteerVectorConfig)
    cfg = options_from(args, SteerConfig, build=build)
    result = run_steer(cfg, args.out, progress=not args.quiet)
    vector = result["vector"]
    print(
        f"{vector['method']} vector at {result['hook']} (norm {vector['norm']:.4g}, "
        f"{result['positions']} positions) on {result['model']}"
    )
    if result["eval"] is None:
        print("no --eval pairs: effect not measured")
    else:
        sample = " (the CAA pairs: in-sample)" if result["eval"]["in_sample"] else ""
        print(f"effect on {result['eval']['pairs']} pairs of {result['eval']['file']}{sample}")
    print(format_sweep_table(result))
    if result["transfer"]:
        print()
        print(format_transfer_tables(result))
    if result["generations"]:
        print()
        print(format_generations(result))
    if result.get("explain"):
        from saelab.analysis.steering.explain import format_explanation

        print()
        print(format_explanation(result["explain"]))
    print(f"steer.json, steer.png and the vector (vector/) in {args.out}")
    return 0


COMMANDS = {
    "steer": Command(
        "build a steering vector, sweep coefficients: effect, cost, generations",
        _add_steer,
        _run_steer,
    ),
}
