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
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence

from saelab import __version__
from saelab.atomic import set_command
from saelab.cli.command import Command, OneLineErrors
from saelab.errors import SaelabError, describe_os_error
from saelab.signals import exit_status, terminate_as_interrupt

_MODULE_OF = {
    "train": "train",
    "validate": "train",
    "eval": "evaluate",
    "sweep": "train",
    "cache": "train",
    "convert": "evaluate",
    "transfer": "evaluate",
    "report": "evaluate",
    "features": "features",
    "dashboard": "features",
    "serve": "features",
    "steer": "steer",
    "circuit": "circuit",
    "graph": "graph",
    "bench": "bench",
    "hooks": "evaluate",
}
"""Command name → the module of ``saelab.cli`` that defines it, in the order ``--help`` lists
them. A command's module (and the library it imports) is loaded only when that command runs."""


def command(name: str) -> Command:
    """The :class:`Command` called ``name``, importing its module."""
    return importlib.import_module(f"saelab.cli.{_MODULE_OF[name]}").COMMANDS[name]


def _runner(name: str) -> Callable[[argparse.Namespace], int]:
    return lambda args: command(name).run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    name: _runner(name) for name in _MODULE_OF
}
"""Command name → what it runs (``args → exit status``), in the order ``--help`` lists them."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full ``saelab`` parser, every sub-command with its options; with ``only``, the options
    of that command alone (the others are named, so the choices stay the same, but not built:
    building one imports its part of the library)."""
    parser = OneLineErrors(
        prog="saelab", description="Train, evaluate and use sparse autoencoders on LMs."
    )
    parser.add_argument("--version", action="version", version=f"saelab {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrors
    )
    for name in _MODULE_OF:
        if only is None or name == only:
            cmd = command(name)
            cmd.add(sub.add_parser(name, help=cmd.help, description=cmd.help))
        else:
            sub.add_parser(name)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word that is not a flag), if it is one."""
    word = next((w for w in argv if not w.startswith("-")), None)
    return word if word in _MODULE_OF else None


def _quiet_dependencies() -> None:
    """saelab shows its own progress; the libraries' per-file bars would bury it (and errors)."""
    # Read by huggingface_hub (and so transformers) when first imported: commands that never load
    # a model never import them. Libraries a caller already imported are told directly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_chosen_command(words)).parse_args(words)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("transformers", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_dependencies()
    set_command(args.command)  # temp names say which command left them
    try:
        with terminate_as_interrupt():  # SIGTERM stops as tidily as Ctrl-C
            return COMMANDS[args.command](args)
    except SaelabError as exc:
        print(f"saelab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a file in the way: one line too
        what = {"convert": "DST", "eval": "SAE folder or --summary"}.get(args.command, "--out")
        print(f"saelab: error: {describe_os_error(exc, what)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        _close_progress_bars()
        print(f"saelab: {_interrupted(exc, argv)}", file=sys.stderr)
        return exit_status(exc)  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them


def _close_progress_bars() -> None:
    """Close the bars an interruption left open now, so the one line comes after them (left to
    the garbage collector, they would be redrawn below it)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _interrupted(exc: KeyboardInterrupt, argv: Sequence[str] | None) -> str:
    """The one line an interruption ends with: what it left (the library says, for the commands
    that can resume) and the command that continues it."""
    detail = getattr(exc, "detail", None)
    if detail is None:  # every other command writes its results whole (temp file, then rename)
        return "interrupted; no partial result was written"
    if not getattr(exc, "resumable", False):
        return detail
    words = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in words:
        words.append("--resume")
    return f"{detail}: resume with  saelab {shlex.join(words)}"


__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
