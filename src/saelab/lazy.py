"""Public faces that do not load what they name until it is used.

A package's ``__init__`` re-exports its API; when some of it pulls in the model stack
(transformers, datasets: seconds to import), importing a light neighbour (its options dataclass,
say) would pay for all of it. :func:`lazy_exports` gives the package a module ``__getattr__``
(PEP 562) that imports such a name's module on first use, so ``from saelab.evaluation import
evaluate_sae_dirs`` works as usual and ``import saelab.evaluation.config`` stays cheap.

Example::

    __getattr__ = lazy_exports(__name__, {"evaluate_sae_dirs": "saelab.evaluation.evaluate"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: name → the module (imported on first use) that
    defines it."""

    def attribute(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    return attribute
