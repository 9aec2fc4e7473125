"""``saelab bench SUITE``: benchmark suites beyond reconstruction (one sub-command per suite of
:data:`~saelab.evaluation.bench.registry.SUITES`, its flags the fields of the suite's options
class; ``all`` runs every suite at its defaults), merged into ``bench.json`` with mean ± 95 %
interval over seeds."""

from __future__ import annotations

import argparse
import dataclasses

from saelab.cli.command import Command, OneLineErrors
from saelab.cli.options import DEVICES, add_options, options_from
from saelab.outputs import check_output_location

_OUT_HELP = (
    "bench.json to write or extend (default: bench.json in the SAE folders' common parent, or "
    "in the current folder for suites that train their own SAEs)"
)


def _option_keywords(options: type) -> dict:
    """How a suite's options become flags: ``model_name`` is ``--model``, ``device`` is one of
    :data:`DEVICES`; a suite may add renames and choices as class attributes ``FLAGS`` and
    ``CHOICES`` (field → flag, field → choices)."""
    names = {f.name for f in dataclasses.fields(options)}
    rename = {"model_name": "--model"} if "model_name" in names else {}
    rename.update(getattr(options, "FLAGS", {}))
    choices = {"device": DEVICES} if "device" in names else {}
    choices.update(getattr(options, "CHOICES", {}))
    return {"rename": rename, "choices": choices}


def _add_sae_dirs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sae_dirs",
        nargs="+",
        metavar="SAE_DIR",
        help="SAE folder(s) (cfg.json + weights), glob pattern(s) or run/sweep folder(s)",
    )


def _add_bench(parser: argparse.ArgumentParser) -> None:
    from saelab.evaluation.bench.registry import load_suites

    sub = parser.add_subparsers(
        dest="suite", required=True, metavar="SUITE", parser_class=OneLineErrors
    )
    suites = load_suites()
    for suite in suites.values():
        p = sub.add_parser(suite.name, help=suite.help, description=suite.help)
        if suite.needs_sae_dirs:
            _add_sae_dirs(p)
        add_options(p, suite.options, **_option_keywords(suite.options))
        p.add_argument("--out", help=_OUT_HELP)
    every = sub.add_parser(
        "all",
        help=f"every suite ({', '.join(suites)}) at its default options",
        description=f"every suite ({', '.join(suites)}) at its default options",
    )
    _add_sae_dirs(every)
    every.add_argument("--device", choices=DEVICES, help="where every suite runs (default: cpu)")
    every.add_argument("--out", help=_OUT_HELP)


def _run_bench(args: argparse.Namespace) -> int:
    from saelab.evaluation.bench.registry import load_suites
    from saelab.evaluation.bench.results import format_bench_table, run_suites

    if args.out:
        check_output_location(args.out, kind="file")
    suites = load_suites()
    if args.suite == "all":
        names = list(suites)
        options = {}
        for name in names:
            opts = suites[name].options()
            if args.device and "device" in {f.name for f in dataclasses.fields(opts)}:
                opts = dataclasses.replace(opts, device=args.device)
            options[name] = opts
    else:
        names = [args.suite]
        options = {args.suite: options_from(args, suites[args.suite].options)}
    doc = run_suites(
        names,
        getattr(args, "sae_dirs", None) or [],
        options=options,
        out=args.out,
        progress=not args.quiet,
    )
    measured = [m for name in names for m in doc["suites"][name]["metrics"]]
    print(format_bench_table(doc, list(dict.fromkeys(measured)) or None))
    print(f"bench.json: {doc['path']}")
    return 0


COMMANDS = {
    "bench": Command(
        "benchmark SAEs (core, synth, absorption, probing): bench.json with seed intervals",
        _add_bench,
        _run_bench,
    ),
}
