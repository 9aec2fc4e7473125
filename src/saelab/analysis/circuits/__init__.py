"""Circuits with SAEs spliced in (METHODS §9): the public API in one place.

``spliced`` (SAEs at hooks, with or without error terms), ``tasks`` (IOI and JSONL prompts and
their metric), ``attribution`` (ATP and integrated gradients per feature and error node), ``keep``
(top-k feature keeping), ``faithfulness`` (the curve of circuits of growing size), ``run`` (the
``saelab circuit`` job) and ``plots``.

Example:
    >>> from saelab.analysis.circuits import SplicedModel, ioi_task, node_effects, tokenize_task
    >>> batch = tokenize_task(tokenizer, ioi_task(tokenizer, n=32))
    >>> spliced = SplicedModel(model, {sae.cfg.hook: sae})
    >>> effects = node_effects(spliced, batch, method="ig")
"""
