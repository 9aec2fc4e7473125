"""``saelab eval``, ``transfer``, ``report``, ``convert`` and ``hooks``: saved SAEs measured,
compared, converted; a model's hook points listed."""

from __future__ import annotations

import argparse
import dataclasses

from saelab.cli.command import Command
from saelab.cli.options import DEVICES, add_options, options_from
from saelab.evaluation.config import EvalConfig, TransferConfig
from saelab.outputs import check_output_location

_SAE_RUN = {"rename": {"model_name": "--model"}, "choices": {"device": DEVICES}}
"""How the fields shared by EvalConfig and TransferConfig become flags."""


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sae_dirs",
        nargs="+",
        metavar="SAE_DIR",
        help="SAE folder(s) (cfg.json + weights), glob pattern(s) or run/sweep folder(s); one "
        "replacement set folder (replacement.json) is measured member by member and with all "
        "members spliced at once",
    )
    parser.add_argument(
        "--summary", help="where to write eval_summary.json (default: the folders' common parent)"
    )
    add_options(parser, EvalConfig, **_SAE_RUN)


def _run_eval(args: argparse.Namespace) -> int:
    from saelab.evaluation.evaluate import evaluate_sae_dirs, format_summary_table
    from saelab.saes.replacement import holds_replacement

    cfg = options_from(args, EvalConfig)
    if len(args.sae_dirs) == 1 and holds_replacement(args.sae_dirs[0]):
        return _run_eval_replacement(args.sae_dirs[0], cfg, progress=not args.quiet)
    summary = evaluate_sae_dirs(
        args.sae_dirs,
        **dataclasses.asdict(cfg),
        progress=not args.quiet,
        summary_path=args.summary,
    )
    seen = set()
    for entry in summary["saes"]:
        setting = (entry["model"], entry["dataset"], entry["context"])
        if setting not in seen:
            seen.add(setting)
            ref = entry["reference_ce"]
            print(
                f"clean CE of {entry['model']} on {entry['dataset']} at context "
                f"{entry['context']}: {entry['metrics']['ce_loss_clean']:.4f} nats"
                f" (default text: {'n/a' if ref is None else f'{ref:.4f}'})"
            )
    print(format_summary_table(summary))
    _print_seed_intervals(summary)
    # The warnings themselves were logged as they arose; here only how many, and where.
    if n_warnings := sum(len(entry["warnings"]) for entry in summary["saes"]):
        print(f"{n_warnings} sanity warning(s) above, also under 'warnings' in the summary")
    print(f"metrics.json and eval_info.json in each SAE folder; summary in {summary['path']}")
    return 0


def _print_seed_intervals(summary: dict) -> None:
    """With SAEs that differ only by seed (``saelab sweep --seeds``): every metric as mean ± 95 %
    interval per group of seeds, and the smallest difference the seeds resolve."""
    from saelab.evaluation.bench.results import format_bench_table, merge_results

    saes = {
        entry["sae_dir"]: {
            "metrics": {k: v for k, v in entry["metrics"].items() if isinstance(v, int | float)},
            "info": {},
        }
        for entry in summary["saes"]
    }
    doc = merge_results(None, {"suite": "eval", "saes": saes})
    if any(len(group["members"]) > 1 for group in doc["groups"].values()):
        print("over seeds (mean ± 95 % interval; last column: smallest difference resolved):")
        print(format_bench_table(doc))


def _run_eval_replacement(path: str, cfg: EvalConfig, *, progress: bool) -> int:
    """A replacement set: each member and all of them spliced at once."""
    from saelab.evaluation.replacement_eval import (
        evaluate_replacement_dir,
        format_replacement_table,
    )

    result = evaluate_replacement_dir(path, **dataclasses.asdict(cfg), progress=progress)
    print(format_replacement_table(result))
    print(f"metrics in {result['path']}")
    return 0


def _add_transfer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR", help="saved SAE folders")
    add_options(parser, TransferConfig, **_SAE_RUN)
    parser.add_argument(
        "--out",
        default="runs/transfer",
        help="folder for transfer.json and heatmaps (default: runs/transfer)",
    )


def _run_transfer(args: argparse.Namespace) -> int:
    check_output_location(args.out)
    from saelab.evaluation.transfer import PLOTTED_KEYS, format_transfer_table, transfer_saes

    cfg = options_from(args, TransferConfig)
    result = transfer_saes(
        args.sae_dirs, **dataclasses.asdict(cfg), out=args.out, progress=not args.quiet
    )
    for metric in PLOTTED_KEYS:
        print(format_transfer_table(result, metric))
        print()
    print(f"transfer.json and heatmaps in {args.out} (* = the SAE's own layer)")
    return 0


def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="SAE folders or run/sweep folders")
    parser.add_argument(
        "--out", default="report", metavar="REPORT_DIR", help="report folder (default: report)"
    )


def _run_report(args: argparse.Namespace) -> int:
    check_output_location(args.out)
    from saelab.evaluation.report import write_report

    index = write_report(args.dirs, args.out)
    print(f"report written to {index}")
    return 0


def _add_convert(parser: argparse.ArgumentParser) -> None:
    from saelab.saes.convert_config import AUTO, ConvertConfig
    from saelab.saes.formats import FORMATS

    parser.add_argument("src", help="folder of the SAE to read (its layout is detected)")
    parser.add_argument("dst", help="new folder to write the converted SAE to")
    add_options(
        parser,
        ConvertConfig,
        rename={"from_": "--from"},
        choices={"to": list(FORMATS), "from_": [AUTO, *FORMATS]},
    )


def _run_convert(args: argparse.Namespace) -> int:
    check_output_location(args.dst, what="DST", replaced=True)
    from saelab.saes.convert_config import ConvertConfig
    from saelab.saes.formats import convert_sae

    cfg = options_from(args, ConvertConfig)
    done = convert_sae(args.src, args.dst, **dataclasses.asdict(cfg))
    sae = done.sae
    print(
        f"converted {args.src} ({done.source_format}) to {args.dst} ({done.target_format}): "
        f"{sae.architecture}, d_in={sae.d_in}, d_sae={sae.d_sae}, hook {sae.cfg.hook or '(none)'}"
    )
    for note in done.notes:
        print(f"  note: {note}")
    return 0


def _add_hooks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="default", help="model (default: default)")


def _run_hooks(args: argparse.Namespace) -> int:
    from saelab.models.hookpoints import hook_dim, list_hooks
    from saelab.models.loading import load_model

    model, _ = load_model(args.model)
    for name in list_hooks(model):
        print(f"{name}\t{hook_dim(model, name)}")
    return 0


COMMANDS = {
    "eval": Command(
        "metrics of saved SAEs; writes metrics.json beside each, eval_summary.json",
        _add_eval,
        _run_eval,
    ),
    "convert": Command(
        "convert an SAE between saelens (saelab), sparsify, dictionary_learning",
        _add_convert,
        _run_convert,
    ),
    "transfer": Command(
        "evaluate SAEs on the same hook type at other layers; heatmaps",
        _add_transfer,
        _run_transfer,
    ),
    "report": Command(
        "plots and an HTML page comparing saved SAEs (metrics, density, curves)",
        _add_report,
        _run_report,
    ),
    "hooks": Command("list a model's hook points with their widths", _add_hooks, _run_hooks),
}
