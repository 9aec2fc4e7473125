"""``saelab bench core``: the ``saelab eval`` metrics (reconstruction, sparsity, spliced loss) of
each SAE, as a benchmark suite, so they sit in ``bench.json`` with every other metric and get
intervals over seeds. The measurement is :func:`~saelab.evaluation.evaluate_sae_dirs` itself
(one clean pass per batch shared by all SAEs); it also writes ``metrics.json`` beside each SAE,
as ``eval`` does."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.evaluation.bench.registry import Suite, register_suite
from saelab.evaluation.config import EvalConfig


@dataclass(frozen=True)
class CoreBenchConfig(EvalConfig):
    """The options of ``saelab eval`` (same names, same defaults)."""


def run_core(
    sae_dirs: list[Path], opts: CoreBenchConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Every ``eval`` metric of each SAE folder: ``{"suite": "core", "saes": {dir: {"metrics",
    "info"}}}``."""
    from saelab.evaluation import evaluate_sae_dirs
    from saelab.evaluation.bench.common import sae_info

    opts = opts or CoreBenchConfig()
    summary = evaluate_sae_dirs(
        list(sae_dirs), **dataclasses.asdict(opts), progress=progress, write_summary=False
    )
    saes = {}
    for entry in summary["saes"]:
        metrics = {k: v for k, v in entry["metrics"].items() if isinstance(v, int | float)}
        saes[entry["sae_dir"]] = {"metrics": metrics, "info": sae_info(entry["sae_dir"], metrics)}
    return {"suite": "core", "saes": saes}


register_suite(
    Suite(
        name="core",
        help="the `saelab eval` metrics (L0, FVU, CE recovered, KL, ...) of each SAE",
        options=CoreBenchConfig,
        needs_sae_dirs=True,
        run=run_core,
    )
)
