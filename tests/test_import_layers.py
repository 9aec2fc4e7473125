"""Imports only point upstream (STYLE habit 1): a module may import its own layer or any layer
to its right in ``cli → analysis → evaluation → training → saes → data → models → config``.

Every ``saelab`` import is collected with ``ast`` (also those inside functions and under
``TYPE_CHECKING``), so a lazy import cannot hide an arrow pointing back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import saelab

LAYERS = ["cli", "analysis", "evaluation", "training", "saes", "data", "models", "config"]
"""Left imports right, never the reverse."""

FOUNDATION = {
    "errors",
    "atomic",
    "outputs",
    "registry",
    "lazy",
    "safetensors_check",
    "signals",
    "__init__",
    "config",
}
"""Top-level modules every layer may import (``saelab`` itself is its ``__init__``)."""

SRC = Path(saelab.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def saelab_imports(source: str, module: str, package: bool) -> list[tuple[str, int]]:
    """Every ``saelab.*`` module named by an import in ``source``, with its line number."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node.lineno))
            # `from saelab import saes` imports the subpackage, not an attribute.
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] == "saelab"]


def layer_of(module: str) -> str:
    """``saelab.saes.topk`` → ``saes``; top-level foundation modules → ``foundation``."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head == "config":
        return "config"
    if head in FOUNDATION:
        return "foundation"
    if head == "__main__":
        return "__main__"
    return head


def _existing(name: str) -> bool:
    """Whether ``name`` is a real saelab module (not an attribute like ``__version__``)."""
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def violations(module: str, source: str, package: bool = False) -> list[str]:
    """Arrows from ``module`` that point back along the layers (or into ``cli``)."""
    own = layer_of(module)
    bad = []
    for target, line in saelab_imports(source, module, package):
        if target != "saelab" and not _existing(target):
            continue  # an attribute: `from saelab import __version__`
        theirs = layer_of(target)
        where = f"{module}:{line} imports {target}"
        if theirs == "__main__":
            bad.append(f"{where} (nothing imports __main__)")
        elif theirs == "cli" and own != "__main__" and own != "cli":
            bad.append(f"{where} (only __main__ may import cli)")
        elif theirs == "foundation" or own == "__main__":
            continue
        elif own == "foundation":
            bad.append(f"{where} (errors/atomic/__init__ import no saelab layer)")
        elif theirs not in LAYERS or own not in LAYERS:
            bad.append(f"{where} (layer {theirs if theirs not in LAYERS else own!r} not in LAYERS)")
        elif LAYERS.index(theirs) < LAYERS.index(own):
            bad.append(f"{where} ({own} may not import {theirs}: it is further upstream)")
    return bad


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_imports_only_upstream():
    problems = []
    for path in _modules():
        problems += violations(module_name(path), path.read_text(), is_package(path))
    assert not problems, "\n".join(problems)


def test_every_subpackage_is_placed_in_a_layer():
    """A new folder must be added to LAYERS here, deciding where it sits."""
    subpackages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert subpackages <= set(LAYERS), subpackages - set(LAYERS)
    top = {p.stem for p in SRC.glob("*.py")}
    assert top <= FOUNDATION | {"cli", "__main__"}, top - FOUNDATION - {"cli", "__main__"}


def test_the_walk_sees_the_known_imports():
    """Guards against a checker that silently finds nothing."""
    found = {
        name
        for path in _modules()
        for name, _ in saelab_imports(path.read_text(), module_name(path), is_package(path))
    }
    assert "saelab.errors" in found and len(found) > 10


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("saelab.saes.topk", "from saelab.training.trainer import Trainer\n"),
        ("saelab.saes.topk", "def f():\n    import saelab.training.checkpoint\n"),
        (
            "saelab.saes.topk",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from saelab.evaluation import evaluate\n",
        ),
        ("saelab.models.loading", "from saelab.data.text import TokenBatches\n"),
        ("saelab.data.text", "from saelab import saes\n"),
        ("saelab.training.trainer", "from ..evaluation.evaluate import evaluate_sae\n"),
        ("saelab.config", "from saelab.models import load_model\n"),
        ("saelab.errors", "from saelab.config import SAEConfig\n"),
        ("saelab.evaluation.evaluate", "from saelab.cli import main\n"),
    ],
)
def test_checker_catches_arrows_pointing_back(module, source):
    assert violations(module, source), f"{module} importing this should be rejected"


@pytest.mark.parametrize(
    ("module", "source", "package"),
    [
        ("saelab.training.trainer", "from saelab.saes.base import SparseAutoencoder\n", False),
        ("saelab.saes", "from . import relu, topk\n", True),
        ("saelab.saes.relu", "from .registry import register\n", False),
        ("saelab.data.activations", "from saelab.models.intervene import run_to_hooks\n", False),
        ("saelab.models.loading", "from saelab import __version__\nimport saelab.errors\n", False),
        ("saelab.__main__", "from saelab.cli import main\n", False),
        ("saelab.cli", "def f():\n    from saelab.evaluation.evaluate import evaluate\n", False),
    ],
)
def test_checker_allows_downstream_arrows(module, source, package):
    assert violations(module, source, package) == []
