"""The benchmark suites: one :class:`Suite` per ``saelab bench`` sub-command, in :data:`SUITES`.

Each suite module registers its suite where it is defined (``SUITES.register("absorption")``);
:func:`load_suites` imports those modules so the registry is full. The modules keep their heavy
imports (torch, the model stack) inside ``run``, so listing the suites and building the CLI's
flags from their options classes stays cheap.

Example::

    suite = load_suites().lookup("absorption")
    result = suite.run([Path("runs/demo/blocks.6...")], suite.options(), progress=False)
    result["saes"]["runs/demo/blocks.6..."]["metrics"]["absorption_rate"]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.registry import Registry


@dataclass(frozen=True)
class Suite:
    """One benchmark suite: what ``saelab bench NAME`` runs."""

    name: str
    """``core`` | ``synth`` | ``absorption`` | ``probing``: the sub-command's name."""
    help: str
    """One line, used by ``saelab bench --help``."""
    options: type
    """A frozen options dataclass; its fields (with docstrings) become the sub-command's flags."""
    needs_sae_dirs: bool
    """Whether the suite scores given SAE folders (``SAE_DIR...``) or trains its own (synth)."""
    run: Callable[..., dict[str, Any]]
    """``run(sae_dirs: list[Path], opts, *, progress: bool) -> result``, where result is
    ``{"suite": name, "saes": {key: {"metrics": {metric: value}, "info": {...}}}}``; ``key`` is
    the SAE folder (str) or, for suites that train their own, a label such as ``topk/seed0``;
    ``info`` holds ``architecture``, ``hook``, ``l0``, ``d_sae``, ``seed`` (and ``group``: the
    key of the run without its seed) so results can be grouped over seeds."""


SUITES: Registry[Suite] = Registry("benchmark suite")
"""Suite name → :class:`Suite`, in the order ``saelab bench`` lists them."""

SUITE_MODULES = ("core", "synth", "absorption", "probing")
"""The modules of this package that register a suite, in the order the suites are listed."""


def register_suite(suite: Suite) -> Suite:
    """Register ``suite`` under its name (an error if another suite has that name)."""
    return SUITES.register(suite.name)(suite)


def load_suites() -> Registry[Suite]:
    """:data:`SUITES`, after importing every suite module so each has registered."""
    here = Path(__file__).parent
    for module in SUITE_MODULES:
        # A suite module another engineer has not written yet is simply absent.
        if (here / f"{module}.py").exists():
            importlib.import_module(f"saelab.evaluation.bench.{module}")
    order = {name: i for i, name in enumerate(SUITE_MODULES)}
    ordered = sorted(SUITES.items(), key=lambda item: order.get(item[0], len(order)))
    SUITES.clear()
    SUITES.update(ordered)
    return SUITES
