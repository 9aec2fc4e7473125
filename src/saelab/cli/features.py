"""``saelab features``, ``dashboard`` and ``serve``: per-feature statistics of a saved SAE, the
static site built from them, and a local server for it."""

from __future__ import annotations

import argparse
import dataclasses

from saelab.analysis.dashboard.config import DashboardConfig, ServeConfig
from saelab.analysis.features.config import FeaturesConfig
from saelab.cli.command import Command
from saelab.cli.options import DEVICES, add_options, given_options, options_from
from saelab.outputs import check_output_location

_FEATURES = {"aliases": {"data": ("--dataset",)}, "choices": {"device": DEVICES}}
"""How the fields of FeaturesConfig become flags (``--data`` is also ``--dataset``)."""


def _add_features(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae_dir", metavar="SAE_DIR", help="saved SAE folder (cfg.json + weights)")
    parser.add_argument("--out", help="output folder (default: SAE_DIR/features)")
    add_options(parser, FeaturesConfig, **_FEATURES)


def _run_features(args: argparse.Namespace) -> int:
    from saelab.analysis.features import write_feature_stats

    cfg = options_from(args, FeaturesConfig)
    stats, out = write_feature_stats(
        args.sae_dir, args.out, **dataclasses.asdict(cfg), progress=not args.quiet
    )
    summary = stats.summary()
    print(f"wrote {out / 'feature_stats.safetensors'} and feature_stats.json")
    print(
        f"{summary['n_features']} features over {summary['n_tokens']:,} tokens: "
        f"dead {summary['frac_dead']:.1%}, mean density {summary['mean_density']:.3g}, "
        f"mean L0 {summary['mean_l0']:.1f}"
    )
    return 0


def _add_dashboard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sae_dir", metavar="SAE_DIR", help="saved SAE folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="site folder to write")
    add_options(
        parser,
        DashboardConfig,
        ("stats_dir", "recompute"),
        rename={"stats_dir": "--stats"},
        metavars={"stats_dir": "STATS_DIR"},
    )
    pages = parser.add_mutually_exclusive_group()
    add_options(
        pages, DashboardConfig, ("features", "top"), metavars={"features": "IDS", "top": "N"}
    )
    # Statistics flags stay None unless given: the library warns about those it ignores.
    computing = parser.add_argument_group("when the statistics are computed")
    add_options(computing, FeaturesConfig, **_FEATURES, keep_unset=True)


def _run_dashboard(args: argparse.Namespace) -> int:
    check_output_location(args.out, replaced=True)
    from saelab.analysis.dashboard.site import build_dashboard

    cfg = options_from(args, DashboardConfig)
    options_from(args, FeaturesConfig)  # checks the statistics flags before any work
    index, stats = build_dashboard(
        args.sae_dir,
        args.out,
        **dataclasses.asdict(cfg),
        progress=not args.quiet,
        **given_options(args, FeaturesConfig),
    )
    print(f"dashboard of {stats.n_features} features ({stats.n_tokens:,} tokens): {index}")
    print(f"browse it with: saelab serve {args.out}")
    return 0


def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="dashboard folder (saelab dashboard --out)")
    add_options(parser, ServeConfig)


def _run_serve(args: argparse.Namespace) -> int:
    from saelab.analysis.dashboard.serve import serve, server_url

    def ready(server: object) -> None:
        print(f"serving {args.dir} at {server_url(server)} (Ctrl-C to stop)", flush=True)

    cfg = options_from(args, ServeConfig)
    serve(args.dir, host=cfg.host, port=cfg.port, ready=ready)
    print("stopped")
    return 0


COMMANDS = {
    "features": Command(
        "per-feature statistics of a saved SAE over a text (for the dashboard)",
        _add_features,
        _run_features,
    ),
    "dashboard": Command(
        "static HTML site of an SAE's features (index + one page per feature)",
        _add_dashboard,
        _run_dashboard,
    ),
    "serve": Command("serve a dashboard folder on localhost", _add_serve, _run_serve),
}
