"""The ``saelab`` command: parses flags, calls the library, prints results. No logic of its own.

Each command's options are the fields of its config dataclasses (:mod:`saelab.cli.options`
builds the flags, help text included, from them); one module per command group. Errors from bad
input arrive as :class:`~saelab.errors.SaelabError` and are printed as one line
(``saelab: error: ...``) with exit status 2; no traceback.

Example::

    main(["eval", "runs/sae", "--tokens", "16384"])      # the same as `saelab eval ...`
    build_parser().parse_args(["steer", "--method", "caa", "--pairs", "p.jsonl"])
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from saelab import __version__
from saelab.cli import circuit, evaluate, features, steer, train
from saelab.cli.command import Command, OneLineErrors
from saelab.errors import SaelabError

_GROUPS: dict[str, Command] = {
    **train.COMMANDS,
    **evaluate.COMMANDS,
    **features.COMMANDS,
    **steer.COMMANDS,
    **circuit.COMMANDS,
}
_ORDER = (
    "train",
    "validate",
    "eval",
    "sweep",
    "cache",
    "convert",
    "transfer",
    "report",
    "features",
    "dashboard",
    "serve",
    "steer",
    "circuit",
    "hooks",
)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    name: _GROUPS[name].run for name in _ORDER
}
"""Command name → what it runs (``args → exit status``), in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``saelab`` parser, every sub-command with its options."""
    parser = OneLineErrors(
        prog="saelab", description="Train, evaluate and use sparse autoencoders on LMs."
    )
    parser.add_argument("--version", action="version", version=f"saelab {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrors
    )
    for name in _ORDER:
        command = _GROUPS[name]
        command.add(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def _quiet_dependencies() -> None:
    """saelab shows its own progress; the libraries' per-file bars would bury it (and errors)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - older huggingface_hub
        return
    disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
