"""The ``saelab`` command: parses flags, calls the library, prints results. No logic of its own.

Errors from bad input arrive as :class:`~saelab.errors.SaelabError` and are printed as one line
(``saelab: error: ...``) with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from saelab import __version__
from saelab.errors import SaelabError
from saelab.saes.registry import ARCHITECTURES

# CLI flag → (config key, type). One table drives the parser and the overrides.
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--model": ("model.name", str, "model: hub id, local dir, .gguf file or 'default'"),
    "--hook": ("sae.hook", str, "hook point, e.g. blocks.6.hook_resid_post"),
    "--output-hook": (
        "sae.output_hook",
        str,
        "transcoders: the hook they predict, e.g. blocks.6.hook_mlp_out (--hook is the input)",
    ),
    "--arch": ("sae.architecture", str, "SAE architecture"),
    "--expansion": ("sae.expansion", int, "d_sae = expansion * d_in"),
    "--k": ("sae.k", int, "TopK: active features per token"),
    "--l1": (
        "sae.l1_coefficient",
        float,
        "sparsity coefficient: L1 (relu, gated) or L0 (jumprelu)",
    ),
    "--tokens": ("train.tokens", int, "training tokens"),
    "--batch-size": ("train.batch_size", int, "activations per optimiser step"),
    "--lr": ("train.lr", float, "Adam learning rate (default: per architecture and width)"),
    "--dataset": ("data.dataset", str, "'default', a .txt/.jsonl/.parquet path or HF dataset"),
    "--context": ("data.context", int, "tokens per sequence, BOS included"),
    "--seed": ("seed", int, "seed for text order, shuffling and initialisation"),
    "--device": ("model.device", str, "cpu or cuda"),
    "--checkpoint-every": ("train.checkpoint_every_tokens", int, "checkpoint every N tokens"),
    "--activations": (
        "data.activations",
        str,
        "train from this activation cache (saelab cache) instead of running the model",
    ),
    "--dist-mode": (
        "train.distributed",
        str,
        "under torchrun: ddp (each process takes a share of every batch) or sae (of the SAEs)",
    ),
}

SWEEP_FLAGS = (
    "--activations",
    "--tokens",
    "--batch-size",
    "--seed",
    "--device",
    "--checkpoint-every",
    "--dist-mode",
)
"""Flags of ``train`` that ``sweep`` shares; its SAEs come from the [[sae]] tables."""


def _int(text: str) -> int:
    """Integers, also written as 2e5 or 200_000."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        return int(value)


class _OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes are reported like every other error: one line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"saelab: error: {message} (see: {self.prog} --help)\n")


def _add_config_flags(parser: argparse.ArgumentParser, flags: Iterable[str]) -> None:
    """One option per flag of :data:`TRAIN_FLAGS`, stored under its config key."""
    from saelab.config import DIST_MODES

    choices = {
        "--arch": sorted(ARCHITECTURES),
        "--device": ["cpu", "cuda"],
        "--dist-mode": list(DIST_MODES),
    }
    for flag in flags:
        key, kind, help_text = TRAIN_FLAGS[flag]
        parser.add_argument(
            flag,
            dest=key,
            metavar=None if flag in choices else flag.lstrip("-").upper().replace("-", "_"),
            type=_int if kind is int else kind,
            default=None,
            help=help_text,
            **({"choices": choices[flag]} if flag in choices else {}),
        )


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="saelab", description="Train, evaluate and use sparse autoencoders on LMs."
    )
    parser.add_argument("--version", action="version", version=f"saelab {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_OneLineErrors
    )

    train = sub.add_parser("train", help="train one or more SAEs on a model's activations")
    train.add_argument("config", nargs="?", help="TOML run file ([model] [data] [train] [[sae]])")
    _add_config_flags(train, TRAIN_FLAGS)
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set train.lr_decay_frac=0.1",
    )
    train.add_argument("--out", default="runs/sae", help="run folder (default runs/sae)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    ev = sub.add_parser(
        "eval", help="metrics of saved SAEs; writes metrics.json beside each, eval_summary.json"
    )
    ev.add_argument(
        "sae_dirs",
        nargs="+",
        metavar="SAE_DIR",
        help="SAE folder(s) (cfg.json + weights), glob pattern(s) or run/sweep folder(s)",
    )
    ev.add_argument(
        "--summary", help="where to write eval_summary.json (default: the folders' common parent)"
    )
    ev.add_argument("--model", help="model (default: the one the SAE was trained on)")
    ev.add_argument("--dataset", help="evaluation text (default: the training text spec)")
    ev.add_argument("--tokens", type=_int, default=8192, help="evaluation tokens (default 8192)")
    ev.add_argument("--context", type=_int, help="tokens per sequence (default: training's)")
    ev.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    sweep = sub.add_parser(
        "sweep", help="train every [[sae]] of a TOML file in one pass; compare them in a table"
    )
    sweep.add_argument("config", help="TOML run file with several [[sae]] tables")
    _add_config_flags(sweep, SWEEP_FLAGS)
    sweep.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="as for train"
    )
    sweep.add_argument(
        "--eval-tokens",
        type=_int,
        default=16_384,
        help="held-out activations each SAE is measured on after training (default 16384)",
    )
    sweep.add_argument("--out", default="runs/sweep", help="run folder (default runs/sweep)")
    sweep.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    from saelab.config import DataConfig, SAEConfig, TrainConfig

    default_hook, data = SAEConfig().hook, DataConfig()
    cache = sub.add_parser("cache", help="run a model once and store its activations on disk")
    cache.add_argument("--out", required=True, help="cache folder (shards + index.json)")
    cache.add_argument("--model", default="default", help=TRAIN_FLAGS["--model"][2])
    cache.add_argument(
        "--hook",
        action="append",
        dest="hooks",
        metavar="HOOK",
        default=[],
        help=f"hook point to cache; repeat for several (default {default_hook})",
    )
    cache.add_argument("--tokens", type=_int, default=TrainConfig().tokens, help="tokens to cache")
    cache.add_argument("--dataset", default=data.dataset, help=TRAIN_FLAGS["--dataset"][2])
    cache.add_argument("--context", type=_int, default=data.context, help="tokens per sequence")
    cache.add_argument(
        "--model-batch-size", type=_int, default=data.model_batch_size, help="sequences per forward"
    )
    cache.add_argument("--seed", type=_int, default=0, help="seed for the text order")
    cache.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    cache.add_argument("--shard-tokens", type=_int, default=65_536, help="rows per shard (65536)")
    cache.add_argument(
        "--dtype", default="float32", help="stored dtype: float32 (default), bfloat16 or float16"
    )
    cache.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished cache in --out (same arguments) where it stopped",
    )

    from saelab.saes.formats import FORMATS

    convert = sub.add_parser(
        "convert", help="convert an SAE between saelens (saelab), sparsify, dictionary_learning"
    )
    convert.add_argument("src", help="folder of the SAE to read (its layout is detected)")
    convert.add_argument("dst", help="new folder to write the converted SAE to")
    convert.add_argument("--to", required=True, choices=list(FORMATS), help="layout to write")
    convert.add_argument(
        "--from",
        dest="from_format",
        default="auto",
        choices=["auto", *FORMATS],
        help="layout of SRC (default: detected from its files)",
    )
    convert.add_argument("--hook", help="hook name to record, when SRC's is missing or raw")
    convert.add_argument("--output-hook", help="transcoders: the hook they predict")

    transfer = sub.add_parser(
        "transfer", help="evaluate SAEs on the same hook type at other layers; heatmaps"
    )
    transfer.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR", help="saved SAE folders")
    transfer.add_argument("--layers", required=True, help="layers to evaluate at: 2-10, 2,4,6 or 3")
    transfer.add_argument("--model", help="model (default: the one the first SAE was trained on)")
    transfer.add_argument("--dataset", help="evaluation text (default: the training text spec)")
    transfer.add_argument(
        "--tokens", type=_int, default=8192, help="evaluation tokens per cell (default 8192)"
    )
    transfer.add_argument("--context", type=_int, help="tokens per sequence (default: training's)")
    transfer.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    transfer.add_argument(
        "--out", default="runs/transfer", help="folder for transfer.json and heatmaps"
    )

    report = sub.add_parser(
        "report", help="plots and an HTML page comparing saved SAEs (metrics, density, curves)"
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="SAE folders or run/sweep folders")
    report.add_argument(
        "--out", default="report", metavar="REPORT_DIR", help="report folder (default report)"
    )

    feats = sub.add_parser(
        "features", help="per-feature statistics of a saved SAE over a text (for the dashboard)"
    )
    feats.add_argument("sae_dir", metavar="SAE_DIR", help="saved SAE folder (cfg.json + weights)")
    feats.add_argument("--tokens", type=_int, default=65_536, help="tokens to read (default 65536)")
    feats.add_argument("--out", help="output folder (default SAE_DIR/features)")
    feats.add_argument("--context", type=_int, default=128, help="tokens per sequence (128)")
    feats.add_argument("--top-k", type=_int, default=20, help="top examples per feature (20)")
    feats.add_argument("--model", help="model (default: the one the SAE was trained on)")
    feats.add_argument(
        "--data", "--dataset", dest="data", help="text (default: the SAE's training text spec)"
    )
    feats.add_argument("--batch-size", type=_int, default=16, help="sequences per forward (16)")
    feats.add_argument("--seed", type=_int, default=0, help="seed for text order and sampling")
    feats.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    dashboard = sub.add_parser(
        "dashboard", help="static HTML site of an SAE's features (index + one page per feature)"
    )
    dashboard.add_argument("sae_dir", metavar="SAE_DIR", help="saved SAE folder")
    dashboard.add_argument("--out", required=True, metavar="DIR", help="site folder to write")
    dashboard.add_argument(
        "--stats",
        metavar="STATS_DIR",
        help="use these feature statistics (default SAE_DIR/features, computed when missing)",
    )
    dashboard.add_argument(
        "--recompute", action="store_true", help="compute the statistics even where they exist"
    )
    pages = dashboard.add_mutually_exclusive_group()
    pages.add_argument(
        "--features", metavar="IDS", help="pages only for these features, e.g. 0-99,200"
    )
    pages.add_argument(
        "--top", type=_int, metavar="N", help="pages only for the N densest features"
    )
    dashboard.add_argument(
        "--tokens", type=_int, metavar="N", help="when computing statistics: tokens (65536)"
    )
    dashboard.add_argument(
        "--context", type=_int, metavar="N", help="when computing: tokens per sequence"
    )
    dashboard.add_argument("--model", metavar="NAME", help="when computing: model (the SAE's)")
    dashboard.add_argument(
        "--data", "--dataset", dest="data", metavar="SPEC", help="when computing: text (the SAE's)"
    )
    dashboard.add_argument("--top-k", type=_int, metavar="K", help="when computing: examples (20)")
    dashboard.add_argument(
        "--batch-size", type=_int, metavar="N", help="when computing: sequences per forward (16)"
    )
    dashboard.add_argument("--seed", type=_int, metavar="S", help="when computing: seed (0)")
    dashboard.add_argument("--device", choices=["cpu", "cuda"], help="when computing: device")

    serve = sub.add_parser("serve", help="serve a dashboard folder on localhost")
    serve.add_argument("dir", metavar="DIR", help="dashboard folder (saelab dashboard --out)")
    serve.add_argument("--port", type=_int, default=8000, help="port (default 8000; 0: any)")
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")

    from saelab.analysis.steering.config import SAE_UNITS, STEERING_METHODS, STEERING_POSITIONS

    steer = sub.add_parser(
        "steer", help="build a steering vector, sweep coefficients: effect, cost, generations"
    )
    how = steer.add_argument_group("the vector (--method, or --vector)")
    how.add_argument("--method", choices=STEERING_METHODS, help="how to build the vector")
    how.add_argument("--vector", metavar="DIR", help="use a saved vector (OUT/vector of a run)")
    how.add_argument(
        "--hook", help="where to build and apply it (blocks.6.hook_resid_post; SAE: its own)"
    )
    how.add_argument("--pairs", metavar="JSONL", help="caa: {prompt, positive, negative} lines")
    how.add_argument(
        "--answer-offset", type=int, default=-1, help="caa: answer token from the end (-1 = last)"
    )
    how.add_argument("--positive", metavar="TEXT", help="actadd: prompt steered towards")
    how.add_argument("--negative", metavar="TEXT", help="actadd: prompt steered away from")
    how.add_argument("--target", metavar="SPEC", help="mean: text whose mean activation is wanted")
    how.add_argument(
        "--general", default="default", metavar="SPEC", help="mean, SAE units: general text"
    )
    how.add_argument(
        "--tokens", type=_int, default=4096, help="mean, SAE units: tokens of each text (4096)"
    )
    how.add_argument("--sae", metavar="SAE_DIR", help="sae-feature, sae-clamp: the SAE folder")
    how.add_argument("--feature", type=int, help="sae-feature, sae-clamp: the feature index")
    how.add_argument(
        "--sae-units", choices=SAE_UNITS, default="max_act", help="what coefficient 1 means"
    )
    how.add_argument(
        "--max-act",
        type=float,
        help="the feature's max activation if known (else from --stats, else measured)",
    )
    how.add_argument(
        "--stats",
        metavar="DIR",
        help="max_act unit: this SAE's saelab features statistics (default SAE_DIR/features)",
    )
    use = steer.add_argument_group("the sweep")
    use.add_argument("--model", default="default", help=TRAIN_FLAGS["--model"][2])
    use.add_argument(
        "--coefs",
        nargs="+",
        type=_floats,
        default=None,
        metavar="C",
        help="coefficients: --coefs -4 -2 0 2 4 or --coefs=-4,-2,0,2,4 (default -4,-2,-1,0,1,2,4)",
    )
    use.add_argument(
        "--positions", choices=STEERING_POSITIONS, help="where to add it (all; ActAdd: front)"
    )
    use.add_argument("--eval", metavar="JSONL", help="{prompt, target, contrast} lines to score")
    use.add_argument("--neutral", default="default", metavar="SPEC", help="text the cost is on")
    use.add_argument(
        "--neutral-tokens", type=_int, default=1024, help="neutral tokens (1024; 0: no cost)"
    )
    use.add_argument("--context", type=_int, default=128, help="tokens per text row (128)")
    use.add_argument(
        "--generate", action="append", default=[], metavar="PROMPT", help="continue PROMPT"
    )
    use.add_argument("--max-new-tokens", type=_int, default=30, help="tokens generated (30)")
    use.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    use.add_argument("--temperature", type=float, default=1.0, help="with --sample (1.0)")
    use.add_argument("--top-p", type=float, default=1.0, help="with --sample (1.0)")
    use.add_argument("--seed", type=_int, default=0, help="sampling and text order (0)")
    use.add_argument("--transfer-layers", metavar="LAYERS", help="also at layers 4-8 or 2,4,6")
    use.add_argument("--transfer-model", metavar="NAME", help="also on this model (same width)")
    use.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    use.add_argument("--out", default="runs/steer", help="output folder (default runs/steer)")

    from saelab.analysis.circuits.config import (
        ABLATIONS,
        CIRCUIT_METHODS,
        KEEP_PER,
        RANK_BY,
        CircuitConfig,
    )

    circ_defaults = CircuitConfig()
    circuit = sub.add_parser(
        "circuit", help="feature attributions, top-k keeping and faithfulness on a task (IOI)"
    )
    circuit.add_argument(
        "--task", default=circ_defaults.task, help="'ioi' or a .jsonl of prompt/correct/incorrect"
    )
    circuit.add_argument(
        "--sae", nargs="+", required=True, metavar="SAE_DIR", help="SAE folder(s), one per hook"
    )
    circuit.add_argument("--k", type=_int, default=circ_defaults.k, help="features kept (10)")
    circuit.add_argument("--model", help="model (default: the one the SAE was trained on)")
    circuit.add_argument(
        "--n-prompts", type=_int, default=circ_defaults.n_prompts, help="prompts (32)"
    )
    circuit.add_argument(
        "--method", default=circ_defaults.method, choices=CIRCUIT_METHODS, help="attribution"
    )
    circuit.add_argument(
        "--ig-steps", type=_int, default=circ_defaults.ig_steps, help="IG steps (10)"
    )
    circuit.add_argument(
        "--ablation",
        default=circ_defaults.ablation,
        choices=ABLATIONS,
        help="faithfulness: features outside C",
    )
    circuit.add_argument(
        "--ablate-errors", action="store_true", help="faithfulness: ablate error nodes too"
    )
    circuit.add_argument(
        "--keep-per", default=circ_defaults.keep_per, choices=KEEP_PER, help="top-k per"
    )
    circuit.add_argument(
        "--rank-by", default=circ_defaults.rank_by, choices=RANK_BY, help="top-k by"
    )
    circuit.add_argument("--seed", type=_int, default=0, help="seed of the IOI prompts (0)")
    circuit.add_argument(
        "--compare",
        action="store_true",
        help="two SAEs at one hook: top-k of the larger-L0 one vs the one with L0 ~ k",
    )
    circuit.add_argument("--out", default="runs/circuit", help="output folder (runs/circuit)")
    circuit.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    hooks = sub.add_parser("hooks", help="list a model's hook points with their widths")
    hooks.add_argument("model", nargs="?", default="default", help="model (default: 'default')")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {
        key: getattr(args, key)
        for key, _, _ in TRAIN_FLAGS.values()
        if getattr(args, key, None) is not None
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SaelabError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from saelab.config import load_run_config
    from saelab.training.distributed import is_main_process
    from saelab.training.run import train_run

    cfg = load_run_config(args.config, _overrides(args))
    results = train_run(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if not is_main_process():  # under torchrun rank 0 alone reports
        return 0
    print(f"trained {len(results)} SAE(s) into {args.out}")
    for folder, result in results.items():
        summary = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k != "tokens")
        print(f"  {Path(args.out) / folder}: {summary}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from saelab.evaluation.evaluate import evaluate_sae_dirs, format_summary_table

    summary = evaluate_sae_dirs(
        args.sae_dirs,
        model_name=args.model,
        dataset=args.dataset,
        tokens=args.tokens,
        context=args.context,
        device=args.device,
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
    # The warnings themselves were logged as they arose; here only how many, and where.
    if n_warnings := sum(len(entry["warnings"]) for entry in summary["saes"]):
        print(f"{n_warnings} sanity warning(s) above, also under 'warnings' in the summary")
    print(f"metrics.json and eval_info.json in each SAE folder; summary in {summary['path']}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from saelab.config import load_run_config
    from saelab.training.distributed import is_main_process
    from saelab.training.sweep import format_summary_table, sweep_run

    cfg = load_run_config(args.config, _overrides(args))
    summary = sweep_run(
        cfg, args.out, eval_tokens=args.eval_tokens, resume=args.resume, progress=not args.quiet
    )
    if not is_main_process():  # under torchrun rank 0 alone reports
        return 0
    print(format_summary_table(summary))
    print(f"SAE folders and summary.json in {args.out}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from saelab.config import SAEConfig
    from saelab.data.cache import cache_model_activations
    from saelab.training.distributed import is_main_process

    # The writer is one process: under torchrun rank 0 writes the cache (and resumes it) alone,
    # rather than every rank writing the same files.
    if not is_main_process():
        return 0
    index = cache_model_activations(
        args.model,
        args.hooks or [SAEConfig().hook],
        args.out,
        tokens=args.tokens,
        device=args.device,
        dtype=args.dtype,
        shard_tokens=args.shard_tokens,
        dataset=args.dataset,
        context=args.context,
        model_batch_size=args.model_batch_size,
        seed=args.seed,
        progress=not args.quiet,
        resume=args.resume,
    )
    print(f"cached {index.count:,} tokens of {', '.join(index.hooks)} in {args.out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from saelab.saes.formats import convert_sae

    done = convert_sae(
        args.src,
        args.dst,
        to=args.to,
        from_=args.from_format,
        hook=args.hook,
        output_hook=args.output_hook,
    )
    sae = done.sae
    print(
        f"converted {args.src} ({done.source_format}) to {args.dst} ({done.target_format}): "
        f"{sae.architecture}, d_in={sae.d_in}, d_sae={sae.d_sae}, hook {sae.cfg.hook or '(none)'}"
    )
    for note in done.notes:
        print(f"  note: {note}")
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    from saelab.evaluation.transfer import PLOTTED_KEYS, format_transfer_table, transfer_saes

    result = transfer_saes(
        args.sae_dirs,
        args.layers,
        model_name=args.model,
        dataset=args.dataset,
        tokens=args.tokens,
        context=args.context,
        device=args.device,
        out=args.out,
        progress=not args.quiet,
    )
    for metric in PLOTTED_KEYS:
        print(format_transfer_table(result, metric))
        print()
    print(f"transfer.json and heatmaps in {args.out} (* = the SAE's own layer)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from saelab.evaluation.report import write_report

    index = write_report(args.dirs, args.out)
    print(f"report written to {index}")
    return 0


def _cmd_hooks(args: argparse.Namespace) -> int:
    from saelab.models.hookpoints import hook_dim, list_hooks
    from saelab.models.loading import load_model

    model, _ = load_model(args.model)
    for name in list_hooks(model):
        print(f"{name}\t{hook_dim(model, name)}")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from saelab.analysis.features import write_feature_stats

    stats, out = write_feature_stats(
        args.sae_dir,
        args.out,
        model=args.model,
        data=args.data,
        tokens=args.tokens,
        context=args.context,
        top_k=args.top_k,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    summary = stats.summary()
    print(f"wrote {out / 'feature_stats.safetensors'} and feature_stats.json")
    print(
        f"{summary['n_features']} features over {summary['n_tokens']:,} tokens: "
        f"dead {summary['frac_dead']:.1%}, mean density {summary['mean_density']:.3g}, "
        f"mean L0 {summary['mean_l0']:.1f}"
    )
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from saelab.analysis.dashboard.site import build_dashboard

    index, stats = build_dashboard(
        args.sae_dir,
        args.out,
        stats_dir=args.stats,
        recompute=args.recompute,
        features=args.features,
        top=args.top,
        progress=not args.quiet,
        tokens=args.tokens,
        context=args.context,
        model=args.model,
        data=args.data,
        top_k=args.top_k,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    print(f"dashboard of {stats.n_features} features ({stats.n_tokens:,} tokens): {index}")
    print(f"browse it with: saelab serve {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from saelab.analysis.dashboard.serve import serve, server_url

    def ready(server: object) -> None:
        print(f"serving {args.dir} at {server_url(server)} (Ctrl-C to stop)", flush=True)

    serve(args.dir, host=args.host, port=args.port, ready=ready)
    print("stopped")
    return 0


def _floats(text: str) -> list[float]:
    """Comma-separated numbers: ``-8,-4,0`` (a list flag also takes them space-separated)."""
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None


def _cmd_steer(args: argparse.Namespace) -> int:
    from saelab.analysis.steering.config import SteerConfig, SteerVectorConfig
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
    build = None
    if args.method is not None:
        build = SteerVectorConfig(
            method=args.method,
            hook=args.hook,
            pairs=args.pairs,
            answer_offset=args.answer_offset,
            positive=args.positive,
            negative=args.negative,
            target=args.target,
            general=args.general,
            tokens=args.tokens,
            context=args.context,
            sae=args.sae,
            feature=args.feature,
            sae_units=args.sae_units,
            max_act=args.max_act,
            stats=args.stats,
            seed=args.seed,
        )
    coefs = {} if args.coefs is None else {"coefs": tuple(c for group in args.coefs for c in group)}
    cfg = SteerConfig(
        model=args.model,
        device=args.device,
        build=build,
        vector=args.vector,
        positions=args.positions,
        eval=args.eval,
        neutral=args.neutral,
        neutral_tokens=args.neutral_tokens,
        context=args.context,
        generate=tuple(args.generate),
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        transfer_layers=args.transfer_layers,
        transfer_model=args.transfer_model,
        **coefs,
    )
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
    print(f"steer.json, steer.png and the vector (vector/) in {args.out}")
    return 0


def _cmd_circuit(args: argparse.Namespace) -> int:
    from saelab.analysis.circuits.config import CircuitConfig
    from saelab.analysis.circuits.run import (
        CIRCUIT_FILES,
        COMPARE_FILES,
        format_circuit_report,
        format_compare_report,
        run_circuit,
        run_compare,
    )

    cfg = CircuitConfig(
        task=args.task,
        k=args.k,
        n_prompts=args.n_prompts,
        method=args.method,
        ig_steps=args.ig_steps,
        ablation=args.ablation,
        ablate_errors=args.ablate_errors,
        keep_per=args.keep_per,
        rank_by=args.rank_by,
        seed=args.seed,
    )
    run, report, files = (
        (run_compare, format_compare_report, COMPARE_FILES)
        if args.compare
        else (run_circuit, format_circuit_report, CIRCUIT_FILES)
    )
    result = run(
        args.sae,
        cfg,
        model_name=args.model,
        device=args.device,
        out=args.out,
        progress=not args.quiet,
    )
    print(report(result))
    print(f"{', '.join(files)} in {args.out}")
    return 0


def _quiet_dependencies() -> None:
    """saelab shows its own progress; the libraries' per-file bars would bury it (and errors)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - older huggingface_hub
        return
    disable_progress_bars()


COMMANDS = {
    "circuit": _cmd_circuit,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "hooks": _cmd_hooks,
    "sweep": _cmd_sweep,
    "cache": _cmd_cache,
    "convert": _cmd_convert,
    "report": _cmd_report,
    "transfer": _cmd_transfer,
    "dashboard": _cmd_dashboard,
    "serve": _cmd_serve,
    "features": _cmd_features,
    "steer": _cmd_steer,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("transformers", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_dependencies()
    try:
        return COMMANDS[args.command](args)
    except SaelabError as exc:
        print(f"saelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
