"""``saelab train``, ``sweep``, ``cache`` and ``validate``: runs described by a TOML file and flags.

The run flags are overrides of :func:`~saelab.config.load_run_config`: each names a field of a
:class:`~saelab.config.RunConfig` section and takes its type and help from that field, so a TOML
file plus flags works as ``--set section.field=value`` does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from saelab.cli.command import Command, add_set_flag
from saelab.cli.options import DEVICES, add_option, add_options, options_from
from saelab.config import (
    DIST_MODES,
    DataConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    TrainConfig,
)
from saelab.errors import SaelabError
from saelab.outputs import check_output_location
from saelab.saes import ARCHITECTURES

TRAIN_FLAGS: dict[str, str] = {
    "--model": "model.name",
    "--hook": "sae.hook",
    "--output-hook": "sae.output_hook",
    "--arch": "sae.architecture",
    "--expansion": "sae.expansion",
    "--k": "sae.k",
    "--l1": "sae.l1_coefficient",
    "--tokens": "train.tokens",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--dataset": "data.dataset",
    "--context": "data.context",
    "--seed": "seed",
    "--device": "model.device",
    "--checkpoint-every": "train.checkpoint_every_tokens",
    "--activations": "data.activations",
    "--dist-mode": "train.distributed",
}
"""Flag → the run-config field it overrides (``section.field``, or ``seed``)."""

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

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sae": SAEConfig}
_CHOICES = {"--arch": sorted(ARCHITECTURES), "--device": DEVICES, "--dist-mode": DIST_MODES}


@dataclass(frozen=True)
class SweepOptions:
    eval_tokens: int = 16_384
    """Held-out activations each SAE is measured on after training."""
    seeds: int = 1
    """Train every [[sae]] under this many seeds (folders ...-seedN), all from the same model
    pass, so metrics get intervals over seeds."""


def add_run_flags(parser: argparse.ArgumentParser, flags: tuple[str, ...] | dict) -> None:
    """One option per flag of :data:`TRAIN_FLAGS`, stored under its config key (None unless
    given, so that a TOML file's values stand)."""
    for flag in flags:
        key = TRAIN_FLAGS[flag]
        section, _, name = key.rpartition(".")
        cls = _SECTIONS[section] if section else RunConfig
        add_option(
            parser, cls, name, flag=flag, dest=key, choices=_CHOICES.get(flag), keep_unset=True
        )


def run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The run-config overrides of the given flags and of every ``--set``."""
    overrides: dict[str, object] = {
        key: getattr(args, key)
        for key in TRAIN_FLAGS.values()
        if getattr(args, key, None) is not None
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SaelabError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _add_run_file(parser: argparse.ArgumentParser, *, optional: bool) -> None:
    parser.add_argument(
        "config",
        nargs="?" if optional else None,
        help="TOML run file ([model] [data] [train] [[sae]])",
    )


def _add_train(parser: argparse.ArgumentParser) -> None:
    _add_run_file(parser, optional=True)
    add_run_flags(parser, TRAIN_FLAGS)
    add_set_flag(parser)
    parser.add_argument("--out", default="runs/sae", help="run folder (default: runs/sae)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")


def _run_train(args: argparse.Namespace) -> int:
    check_output_location(args.out)
    from saelab.config import load_run_config
    from saelab.training.distributed import is_main_process
    from saelab.training.run import train_run

    cfg = load_run_config(args.config, run_overrides(args))
    results = train_run(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if not is_main_process():  # under torchrun rank 0 alone reports
        return 0
    print(f"trained {len(results)} SAE(s) into {args.out}")
    for folder, result in results.items():
        summary = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k != "tokens")
        print(f"  {Path(args.out) / folder}: {summary}")
    return 0


def _add_sweep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML run file with several [[sae]] tables")
    add_run_flags(parser, SWEEP_FLAGS)
    add_set_flag(parser)
    add_options(parser, SweepOptions)
    parser.add_argument("--out", default="runs/sweep", help="run folder (default: runs/sweep)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")


def _run_sweep(args: argparse.Namespace) -> int:
    check_output_location(args.out)
    from saelab.config import load_run_config
    from saelab.training.distributed import is_main_process
    from saelab.training.sweep import format_summary_table, sweep_run

    cfg = load_run_config(args.config, run_overrides(args))
    options = options_from(args, SweepOptions)
    summary = sweep_run(
        cfg,
        args.out,
        eval_tokens=options.eval_tokens,
        seeds=options.seeds,
        resume=args.resume,
        progress=not args.quiet,
    )
    if not is_main_process():  # under torchrun rank 0 alone reports
        return 0
    print(format_summary_table(summary))
    print(f"SAE folders and summary.json in {args.out}")
    return 0


def _add_cache(parser: argparse.ArgumentParser) -> None:
    from saelab.data.cache_config import CacheConfig

    parser.add_argument("--out", required=True, help="cache folder (shards + index.json)")
    add_options(
        parser,
        CacheConfig,
        rename={"hooks": "--hook"},
        metavars={"hooks": "HOOK"},
        choices={"device": DEVICES},
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished cache in --out (same arguments) where it stopped",
    )


def _run_cache(args: argparse.Namespace) -> int:
    check_output_location(args.out)  # the space it needs is checked once the model is known
    from saelab.data.cache import cache_model_activations
    from saelab.data.cache_config import CacheConfig
    from saelab.training.distributed import is_main_process

    # The writer is one process: under torchrun rank 0 writes the cache (and resumes it) alone,
    # rather than every rank writing the same files.
    if not is_main_process():
        return 0
    cfg = options_from(args, CacheConfig)
    index = cache_model_activations(
        cfg.model,
        list(cfg.hooks),
        args.out,
        tokens=cfg.tokens,
        device=cfg.device,
        dtype=cfg.dtype,
        shard_tokens=cfg.shard_tokens,
        dataset=cfg.dataset,
        context=cfg.context,
        model_batch_size=cfg.model_batch_size,
        seed=cfg.seed,
        progress=not args.quiet,
        resume=args.resume,
    )
    print(f"cached {index.count:,} tokens of {', '.join(index.hooks)} in {args.out}")
    return 0


def _add_validate(parser: argparse.ArgumentParser) -> None:
    _add_run_file(parser, optional=False)
    add_run_flags(parser, TRAIN_FLAGS)
    add_set_flag(parser)


def _run_validate(args: argparse.Namespace) -> int:
    from saelab.config import load_run_config
    from saelab.training.validate import check_run

    cfg = load_run_config(args.config, run_overrides(args))
    check = check_run(cfg)
    train, data = cfg.train, cfg.data
    print(f"{args.config}: no problem found")
    print(f"model: {check.model}")
    text = f"activations from {data.activations}" if data.activations else f"text {data.dataset}"
    print(
        f"{text}, context {data.context}; {train.tokens:,} tokens per SAE in {train.steps:,} "
        f"steps of {train.batch_size:,}"
    )
    print(f"{len(check.cfg.saes)} SAE(s):")
    for sae in check.cfg.saes:  # a layered [[sae]] as the members it expands to
        hooks = [h for h in (sae.hook, sae.output_hook) if h is not None]
        shown = [f"{h} (width {check.widths[h]})" if check.widths else h for h in hooks]
        width = "" if check.widths is None else f", d_sae {sae.d_sae(check.widths[sae.hook])}"
        print(f"  {sae.architecture} at {' -> '.join(shown)}{width}")
    for note in check.notes:
        print(f"note: {note}")
    return 0


COMMANDS = {
    "train": Command("train one or more SAEs on a model's activations", _add_train, _run_train),
    "validate": Command(
        "check a TOML run file (fields, architectures, hooks) without loading weights",
        _add_validate,
        _run_validate,
    ),
    "sweep": Command(
        "train every [[sae]] of a TOML file in one pass; compare them in a table",
        _add_sweep,
        _run_sweep,
    ),
    "cache": Command("run a model once and store its activations on disk", _add_cache, _run_cache),
}
