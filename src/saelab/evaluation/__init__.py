"""Evaluating saved SAEs: metrics with the SAE spliced in (``evaluate``, ``splice``), sanity
warnings, transfer to other layers, and the HTML report with its plots.

Example:
    >>> from saelab.evaluation import evaluate_sae_dirs, write_report
    >>> summary = evaluate_sae_dirs(["runs/demo"], tokens=8192)   # metrics.json beside each SAE
    >>> write_report(["runs/demo"], "report")                     # report/index.html
"""

from saelab.evaluation.evaluate import (
    METRIC_KEYS,
    evaluate_sae,
    evaluate_sae_dirs,
    evaluate_saes,
)
from saelab.evaluation.report import write_report
from saelab.evaluation.transfer import transfer_saes

__all__ = [
    "METRIC_KEYS",
    "evaluate_sae",
    "evaluate_sae_dirs",
    "evaluate_saes",
    "transfer_saes",
    "write_report",
]
