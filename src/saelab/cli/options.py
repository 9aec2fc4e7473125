"""Command-line options built from config dataclasses: each option is declared once, as a field.

A field gives its flag (``top_k`` → ``--top-k``), its type, its default and, from the string
literal written under it, its ``--help`` text; the default is appended to the help once, e.g.
``(default: 8192)``. :func:`options_from` turns the parsed flags back into the dataclass.

Example::

    parser = argparse.ArgumentParser()
    add_options(parser, EvalConfig, rename={"model_name": "--model"})
    cfg = options_from(parser.parse_args(["--tokens", "2e4"]), EvalConfig)  # tokens=20000
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any

DEVICES = ("cpu", "cuda")
"""Choices of every ``--device`` flag (configs also accept ``cuda:N``, the flags do not)."""


def parse_int(text: str) -> int:
    """Integers, also written as 2e5 or 200_000."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        return int(value)


parse_int.__name__ = "int"  # argparse names the type in its error: "invalid int value: 'x'"


def _splitting(kind: type) -> Any:
    """A parser of comma-separated ``kind`` values: ``-8,-4,0`` → ``[-8.0, -4.0, 0.0]``."""
    item = parse_int if kind is int else kind

    def parse(text: str) -> list[Any]:
        try:
            return [item(part) for part in text.split(",") if part.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None

    parse.__name__ = f"list of {kind.__name__}"
    return parse


class _Collect(argparse.Action):
    """A list flag. Repeatable (one value per use, e.g. ``--generate``): the first use replaces
    the (tuple) default, later ones add to the list. Several values per use (``--coefs -8 -4 0,2``):
    each use replaces the list, as a plain option would, and comma lists are flattened."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        repeatable = self.nargs is None
        collected = current if repeatable and isinstance(current, list) else []
        for value in values if isinstance(values, list) else [values]:
            collected.extend(value if isinstance(value, list) else [value])
        setattr(namespace, self.dest, collected)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of ``cls`` (and its bases), as one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (built-ins, the REPL)
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            doc = getattr(after, "value", None)
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(doc, ast.Constant)
                and isinstance(doc.value, str)
            ):
                docs[node.target.id] = _one_line(doc.value)
    return docs


def _one_line(doc: str) -> str:
    """Docstring markup as plain text on one line: ``x`` → x, :class:`~a.B` → B; "one of
    :data:`CHOICES`" is dropped (``--help`` lists the choices)."""
    text = re.sub(r"[;,]? one of :data:`[^`]+`", "", doc)
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 100_000:
        return f"{value:_}"  # 2_000_000, as the flags accept it
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _field_type(cls: type, name: str) -> type:
    """The field's type without ``| None``: ``int | None`` → int, ``tuple[float, ...]`` kept."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _type_options(kind: Any) -> dict[str, Any]:
    """argparse keywords for a field of type ``kind``."""
    if kind is bool:
        return {"action": "store_true"}
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if item is str:  # strings may hold commas and spaces: one value per use, repeatable
            return {"action": _Collect}
        return {"action": _Collect, "nargs": "+", "type": _splitting(item)}
    return {"type": parse_int if kind is int else kind}


def add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    name: str,
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    dest: str | None = None,
    choices: Collection[Any] | None = None,
    metavar: str | None = None,
    keep_unset: bool = False,
    default: Any = dataclasses.MISSING,
) -> None:
    """The option of field ``name`` of ``cls``: flag ``--name`` (or ``flag``, plus ``aliases``),
    type, default, choices and help from the field.

    ``keep_unset``: a flag not given is None in the namespace (to tell it from one given, e.g.
    for overrides); the help still shows the field's default. ``default``: the parser's default
    instead of the field's (None: nothing shown).
    """
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    flag = flag or _flag(name)
    if default is dataclasses.MISSING:
        default = spec.default
        if spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
    required = default is dataclasses.MISSING
    options = _type_options(_field_type(cls, name))
    boolean = options.get("action") == "store_true"
    if choices is not None:
        options["choices"] = list(choices)
    elif not boolean:
        options["metavar"] = metavar or flag.lstrip("-").upper().replace("-", "_")
    help_text = field_docs(cls).get(name, "")
    if not (required or boolean or default is None or default == ()):
        help_text += f" (default: {_shown(default)})"
    parser.add_argument(
        flag,
        *aliases,
        dest=dest or name,
        default=None if keep_unset or required else default,
        required=required,
        help=help_text.strip().replace("%", "%%"),
        **options,
    )


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    fields: Sequence[str] | None = None,
    *,
    exclude: Collection[str] = (),
    rename: Mapping[str, str] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    choices: Mapping[str, Collection[Any]] | None = None,
    metavars: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    keep_unset: bool = False,
) -> None:
    """:func:`add_option` for each of ``fields`` of ``cls`` (default: all but ``exclude``), in
    order; ``rename`` maps a field to its flag, the other mappings give per-field keywords."""
    names = fields or [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    rename, aliases, choices = rename or {}, aliases or {}, choices or {}
    metavars, defaults = metavars or {}, defaults or {}
    for name in names:
        add_option(
            parser,
            cls,
            name,
            flag=rename.get(name),
            aliases=aliases.get(name, ()),
            choices=choices.get(name),
            metavar=metavars.get(name),
            keep_unset=keep_unset,
            default=defaults.get(name, dataclasses.MISSING),
        )


def options_from(args: argparse.Namespace, cls: type, **given: Any) -> Any:
    """``cls`` from the parsed flags: every field whose name is in ``args`` and not None (a flag
    left unset falls back to the field's default); ``given`` values win over flags."""
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        value = getattr(args, spec.name, None)
        if value is not None:
            values[spec.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **given})


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were given as flags (not None), for keyword-only callers."""
    names = (spec.name for spec in dataclasses.fields(cls))
    return {n: v for n in names if (v := getattr(args, n, None)) is not None}
