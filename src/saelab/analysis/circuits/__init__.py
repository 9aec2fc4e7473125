"""Circuits with SAEs spliced in (METHODS §9): the public API in one place.

``spliced`` (SAEs at hooks, with or without error terms), ``tasks`` (IOI and JSONL prompts and
their metric), ``attribution`` (ATP and integrated gradients per feature and error node, each
method in the ``registry``), ``keep`` (top-k feature keeping), ``faithfulness`` (the curve of
circuits of growing size), ``run`` (the ``saelab circuit`` job), ``config`` and ``plots``.

Example:
    >>> from saelab.analysis.circuits import SplicedModel, ioi_task, node_effects, tokenize_task
    >>> batch = tokenize_task(ioi_task(tokenizer, n_prompts=32), tokenizer)
    >>> spliced = SplicedModel(model, [sae])
    >>> spliced.metric(batch)                      # logit(IO) − logit(S) per prompt, SAE spliced in
    >>> effects = node_effects(spliced, batch, "ig", ig_steps=10)
    >>> effects.top_features(10)                   # [(hook, feature, IE), ...]
"""

from saelab.analysis.circuits.attribution import (
    Metric,
    NodeEffects,
    attribution_patching,
    integrated_gradients,
    node_effects,
)
from saelab.analysis.circuits.config import (
    ABLATIONS,
    CIRCUIT_METHODS,
    KEEP_PER,
    RANK_BY,
    CircuitConfig,
)
from saelab.analysis.circuits.faithfulness import faithfulness_curve
from saelab.analysis.circuits.keep import keep_topk_edit, topk_keep_mask
from saelab.analysis.circuits.registry import (
    ATTRIBUTION_METHODS,
    attribution_method,
    register_method,
)
from saelab.analysis.circuits.run import (
    format_circuit_report,
    format_compare_report,
    run_circuit,
    run_compare,
)
from saelab.analysis.circuits.spliced import SiteEdit, SiteValues, SplicedModel
from saelab.analysis.circuits.tasks import (
    TASKS,
    Task,
    TaskBatch,
    clean_metric,
    ioi_task,
    jsonl_task,
    load_task,
    logit_diff,
    tokenize_task,
)

__all__ = [
    "ABLATIONS",
    "ATTRIBUTION_METHODS",
    "CIRCUIT_METHODS",
    "KEEP_PER",
    "RANK_BY",
    "TASKS",
    "CircuitConfig",
    "Metric",
    "NodeEffects",
    "SiteEdit",
    "SiteValues",
    "SplicedModel",
    "Task",
    "TaskBatch",
    "attribution_method",
    "attribution_patching",
    "clean_metric",
    "faithfulness_curve",
    "format_circuit_report",
    "format_compare_report",
    "integrated_gradients",
    "ioi_task",
    "jsonl_task",
    "keep_topk_edit",
    "load_task",
    "logit_diff",
    "node_effects",
    "register_method",
    "run_circuit",
    "run_compare",
    "tokenize_task",
    "topk_keep_mask",
]
