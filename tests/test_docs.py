"""The docs document what the registries and the parser hold, and their examples still run.

Nothing registered goes undocumented: every command has a reference entry in ``docs/cli.md`` and
a line in the README, every flag of every command a row in that command's table, every
architecture and every ``metrics.json`` key a row of a table. A backticked mention in prose does
not count. Every ``saelab ...`` line in a bash/sh/console block parses with the real parser.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

from saelab import cli
from saelab.cli import COMMANDS
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.saes import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
DOC_PATHS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in DOC_PATHS}
README = DOCS["README.md"]
CLI_REFERENCE = DOCS["docs/cli.md"]
SHELL_FENCES = {"bash", "sh", "shell", "console"}


def real_parser() -> argparse.ArgumentParser:
    build = getattr(cli, "build_parser", None) or cli._parser
    return build()


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def first_cells(lines: list[str]) -> set[str]:
    """Backticked names in the first cell of each markdown table row (a line starting with |)."""
    names: set[str] = set()
    for line in lines:
        if line.startswith("|"):
            cell = line.split("|")[1]
            names.update(re.findall(r"`([^`]+)`", cell))
    return names


def cli_sections() -> dict[str, list[str]]:
    """``docs/cli.md`` cut at its ``## saelab COMMAND`` headings: command → its lines."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in prose_lines(CLI_REFERENCE):
        heading = re.fullmatch(r"## saelab(?: (\S+))?(?: \(global options\))?\s*", line)
        if heading:
            current = heading.group(1) or ""
            sections[current] = []
        elif line.startswith("## "):
            current = None
        elif current is not None:
            sections[current].append(line)
    return sections


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the saelab parser has no subcommands")


def flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        flag
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
    ]


def shell_examples() -> list[tuple[str, int, str]]:
    """(doc, line number, command) for every ``saelab ...`` line in a shell block, with its
    backslash continuations joined."""
    found = []
    for doc, text in DOCS.items():
        lines = text.splitlines()
        fence = None
        i = 0
        while i < len(lines):
            line = lines[i]
            start = i + 1
            if line.lstrip().startswith("```"):
                fence = None if fence is not None else line.strip()[3:].strip().lower()
                i += 1
                continue
            command = line.strip()
            command = command[2:] if command.startswith("$ ") else command
            if fence in SHELL_FENCES and command.startswith("saelab "):
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                found.append((doc, start, command))
            i += 1
    return found


def test_every_command_has_a_reference_entry_and_a_readme_line():
    sections = cli_sections()
    no_entry = [name for name in COMMANDS if name not in sections]
    assert not no_entry, f"docs/cli.md has no '## saelab NAME' entry for: {', '.join(no_entry)}"
    no_link = [name for name in COMMANDS if f"(docs/cli.md#saelab-{name})" not in README]
    assert not no_link, f"README.md has no line linking docs/cli.md#saelab-NAME for: {no_link}"


def test_every_reference_entry_is_a_real_command():
    stale = sorted(set(cli_sections()) - set(COMMANDS) - {""})
    assert not stale, f"docs/cli.md documents commands saelab does not have: {', '.join(stale)}"


def test_every_flag_of_every_command_has_a_table_row():
    sections = cli_sections()
    parser = real_parser()
    missing = []
    for name, sub in {"": parser, **subparsers(parser)}.items():
        rows = first_cells(sections.get(name, []))
        missing += [
            f"saelab {name} {flag}" if name else f"saelab {flag}"
            for flag in flags(sub)
            if flag not in rows
        ]
    assert not missing, "flags without a row in their command's table in docs/cli.md: " + (
        ", ".join(missing)
    )


def test_every_architecture_has_a_table_row():
    rows = set().union(*(first_cells(prose_lines(text)) for text in DOCS.values()))
    missing = [name for name in ARCHITECTURES if name not in rows]
    assert not missing, f"architectures in no docs table row: {', '.join(missing)}"


def test_every_metric_key_has_a_table_row():
    rows = set().union(*(first_cells(prose_lines(text)) for text in DOCS.values()))
    missing = [key for key in METRIC_KEYS if key not in rows]
    assert not missing, f"metrics.json keys in no docs table row: {', '.join(missing)}"


def test_the_metrics_json_keys_are_documented_in_order():
    in_order = " ".join(METRIC_KEYS)
    assert in_order in CLI_REFERENCE, f"docs/cli.md (saelab eval) does not list `{in_order}`"
    assert any(in_order in text for doc, text in DOCS.items() if doc != "docs/cli.md"), (
        f"no doc besides docs/cli.md lists the metrics.json keys in order: `{in_order}`"
    )


def test_every_cli_example_parses():
    examples = shell_examples()
    assert len(examples) >= 20, f"found only {len(examples)} saelab examples in the docs"
    failures = []
    for doc, line, command in examples:
        parser = real_parser()
        argv = shlex.split(command, comments=True)[1:]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code not in (0, None):
                message = stderr.getvalue().strip().splitlines()
                failures.append(f"{doc}:{line}: {command!r}: {message[-1] if message else exc}")
    assert not failures, "doc examples the parser rejects:\n" + "\n".join(failures)


def shown_defaults(value: object) -> set[str]:
    """The ways a default may be written in a table cell: ``8192``, ``8_192``, ``2e5``..."""
    if isinstance(value, tuple | list):
        items = [f"{v:g}" if isinstance(v, float) else str(v) for v in value]
        return {",".join(items), ", ".join(items), " ".join(items)}
    if isinstance(value, int) and not isinstance(value, bool):
        return {str(value), f"{value:_}", f"{value:,}"}
    if isinstance(value, float):
        return {f"{value:g}", str(value), repr(value)}
    return {str(value)}


def test_every_flag_default_in_the_reference_is_the_parser_default():
    """The default column says what the parser (the config field) really defaults to, so the
    reference cannot drift from the one declaration of each option."""
    sections = cli_sections()
    parser = real_parser()
    wrong = []
    for name, sub in subparsers(parser).items():
        rows = [line for line in sections.get(name, []) if line.startswith("|")]
        for action in sub._actions:
            default = action.default
            if (
                not action.option_strings
                or isinstance(action, argparse._HelpAction | argparse._StoreTrueAction)
                or default in (None, (), [], argparse.SUPPRESS)
            ):
                continue
            row = next(
                (r for r in rows if f"`{action.option_strings[0]}`" in r.split("|")[1]), None
            )
            if row is None:
                continue  # a missing row is the test above's failure
            cell = row.rstrip().rstrip("|").split("|")[-1].replace("`", "")
            if not any(text in cell for text in shown_defaults(default)):
                wrong.append(
                    f"saelab {name} {action.option_strings[0]}: {default!r} not in {cell!r}"
                )
    assert not wrong, "defaults in docs/cli.md that are not the parser's:\n" + "\n".join(wrong)
