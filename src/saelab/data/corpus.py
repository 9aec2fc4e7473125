"""The embedded default corpus: Python's own documentation and standard library, always offline.

Three kinds of document, all read from the running Python installation without importing any
standard-library module except the data-only `pydoc_data.topics`:

- every `pydoc_data.topics` entry (the language reference behind `help("if")`);
- one digest per standard-library module: its docstring, then each class and function docstring
  under a header line such as `class JSONDecoder(object)` or `def JSONDecoder.decode(self, s)`;
- with `include_source=True`, the module's source file itself.

The default is the documentation alone: about 2.4 MB, roughly 0.63M SmolLM2 tokens. A run that
needs more reads it again in a new order (see `saelab.data.text`); the source files, mostly
code, bring the total to about 11 MB (roughly 2.9M tokens) for those who want it.

Example:
    >>> docs = default_documents()
    >>> any("JSON (JavaScript Object Notation)" in d for d in docs)
    True
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import logging
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Directories that hold tests, fixtures, demos, generated tables or third-party code: their text
# is repetitive, machine-specific or not documentation.
_SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "encodings",  # codec tables, thousands of lines of hex
        "pydoc_data",  # the topics are read from the dict, not as a 700 kB source file
    }
)
# Generated per-build files that would make the corpus differ between machines.
_SKIPPED_FILE_PREFIXES = ("_sysconfigdata",)

_DocumentedNode = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


@functools.lru_cache(maxsize=2)
def default_documents(*, include_source: bool = False) -> tuple[str, ...]:
    """All documents of the default corpus, in a fixed order (shuffling is the reader's job).

    The corpus is documentation: pydoc topics and docstrings (about 0.63 M SmolLM2 tokens).
    ``include_source`` adds each module's source (about 2.9 M tokens, mostly code).

    Returns a tuple so the cached value cannot be modified by a caller.
    """
    root = _stdlib_dir()
    documents = list(_pydoc_topics())
    with _gc_paused():
        for path in _stdlib_files(root):
            source = _read_source(path)
            if source is None:
                continue
            digest = _docstring_digest(_module_name(path, root), source)
            if digest:
                documents.append(digest)
            if include_source and source.strip():
                documents.append(source)
    n_chars = sum(len(d) for d in documents)
    logger.info("default corpus: %d documents, %.1f M characters", len(documents), n_chars / 1e6)
    return tuple(documents)


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics  # a plain dict of strings; importing it has no effects

    for name in sorted(topics):
        yield topics[name].strip()


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Parsing allocates millions of AST nodes; in a process that already holds torch and
    # transformers, the cyclic collector rescans everything on each burst and doubles the time.
    # The nodes are freed by reference counting, so pausing it leaks nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _stdlib_files(root: Path) -> Iterator[Path]:
    """Standard-library `.py` files, sorted by path so the corpus is the same on every run."""

    def walk(directory: Path) -> Iterator[Path]:
        for entry in sorted(directory.iterdir(), key=lambda p: p.name):
            if entry.is_dir():
                if entry.name not in _SKIPPED_DIRS and not entry.name.startswith("config-"):
                    yield from walk(entry)
            elif entry.suffix == ".py" and not entry.name.startswith(_SKIPPED_FILE_PREFIXES):
                yield entry

    yield from walk(root)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        logger.debug("skipping unreadable file %s", path)
        return None


def _docstring_digest(module: str, source: str) -> str:
    """The module docstring, then each class/method/function docstring under a header line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        logger.debug("skipping unparsable module %s", module)
        return ""
    sections = [
        f"{header}\n\n{doc}" for header, doc in _documented_definitions(tree.body, prefix="")
    ]
    module_doc = ast.get_docstring(tree)
    if not module_doc and not sections:
        return ""
    return "\n\n".join([f"module {module}", *([module_doc] if module_doc else []), *sections])


def _documented_definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(header line, docstring) for classes, their methods and top-level functions.

    Functions nested inside functions are implementation details and are not visited.
    """
    for node in body:
        if not isinstance(node, _DocumentedNode):
            continue
        doc = ast.get_docstring(node)
        if doc:
            yield _header(node, prefix), doc
        if isinstance(node, ast.ClassDef):
            yield from _documented_definitions(node.body, prefix=f"{prefix}{node.name}.")


def _header(node: _DocumentedNode, prefix: str) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {prefix}{node.name}" + (f"({bases})" if bases else "")
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{keyword} {prefix}{node.name}({ast.unparse(node.args)})"
