"""Evaluating saved SAEs: metrics with the SAE spliced in (``evaluate``, ``splice``), sanity
warnings, transfer to other layers, and the HTML report with its plots.

Example:
    >>> from saelab.evaluation import evaluate_sae_dirs, write_report
    >>> summary = evaluate_sae_dirs(["runs/demo"], tokens=8192)   # metrics.json beside each SAE
    >>> write_report(["runs/demo"], "report")                     # report/index.html
"""

from saelab.lazy import lazy_exports

# Each of these loads the model stack or matplotlib: imported when first used, so the light
# modules beside them (the options in `config`) stay cheap to import.
__getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ("METRIC_KEYS", "evaluate_sae", "evaluate_sae_dirs", "evaluate_saes"),
            "saelab.evaluation.evaluate",
        ),
        "transfer_saes": "saelab.evaluation.transfer",
        "write_report": "saelab.evaluation.report",
    },
)

__all__ = [
    "METRIC_KEYS",
    "evaluate_sae",
    "evaluate_sae_dirs",
    "evaluate_saes",
    "transfer_saes",
    "write_report",
]
