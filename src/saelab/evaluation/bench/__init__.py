"""Benchmark evaluations beyond reconstruction, with seed noise: one suite per question
(``core``: the ``eval`` metrics; ``synth``: ground truth from synthetic activations;
``absorption``: first-letter feature absorption; ``probing``: k-sparse probing), each a
:class:`~saelab.evaluation.bench.registry.Suite` in :data:`SUITES`; their results merge into
``bench.json`` (:mod:`saelab.evaluation.bench.results`) with mean ± 95 % interval over seeds
(:mod:`saelab.evaluation.bench.intervals`).

Example:
    >>> from saelab.evaluation.bench import run_suites, load_suites
    >>> bench = run_suites(["absorption", "probing"], ["runs/demo/blocks.6..."], out="bench.json")
    >>> bench["summary"]["absorption_rate"]        # mean ± interval per group of seeds
"""

from saelab.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ("SUITES", "Suite", "load_suites", "register_suite"),
            "saelab.evaluation.bench.registry",
        ),
        **dict.fromkeys(
            (
                "mean_interval",
                "difference_interval",
                "smallest_resolvable_difference",
                "t_quantile",
            ),
            "saelab.evaluation.bench.intervals",
        ),
        **dict.fromkeys(
            ("merge_results", "read_bench", "run_suites", "summarise", "write_bench"),
            "saelab.evaluation.bench.results",
        ),
        **dict.fromkeys(
            ("AbsorptionConfig", "run_absorption"), "saelab.evaluation.bench.absorption"
        ),
        **dict.fromkeys(("ProbingConfig", "run_probing"), "saelab.evaluation.bench.probing"),
        **dict.fromkeys(("CoreBenchConfig", "run_core"), "saelab.evaluation.bench.core"),
    },
)

__all__ = [
    "SUITES",
    "AbsorptionConfig",
    "CoreBenchConfig",
    "ProbingConfig",
    "Suite",
    "difference_interval",
    "load_suites",
    "mean_interval",
    "merge_results",
    "read_bench",
    "register_suite",
    "run_absorption",
    "run_core",
    "run_probing",
    "run_suites",
    "smallest_resolvable_difference",
    "summarise",
    "t_quantile",
    "write_bench",
]
