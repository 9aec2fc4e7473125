"""What every command module gives the ``saelab`` parser: a :class:`Command` per sub-command, and
the parser class whose usage errors are one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes are reported like every other error: one line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"saelab: error: {message} (see: {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One ``saelab`` sub-command: its one-line help, how it adds its options to its parser,
    and what it runs (``args → exit status``)."""

    help: str
    add: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.FIELD=VALUE``, repeatable: any run-config field, e.g. one without a flag."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set train.lr_decay_frac=0.1",
    )
