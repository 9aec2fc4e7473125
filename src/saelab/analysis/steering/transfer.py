"""Transfer: a vector built at one layer applied at others, or built on one model applied to
another of the same width (e.g. base → chat), with the effect retained.

``retained = effect elsewhere / effect where it was built``, at the same coefficient, where the
effect is :data:`~saelab.analysis.steering.score.EFFECT_KEY` (Δ log-odds of target vs contrast).
It is None where the reference effect is 0 (coefficient 0).

Example:
    >>> layer_transfer(model, tokenizer, vector, [4, 5, 6, 7, 8], [4.0, 8.0], pairs)["cells"]
    >>> model_transfer(chat_model, chat_tokenizer, vector, [4.0, 8.0], pairs, reference=effects)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel

from saelab.analysis.steering.apply import Steering
from saelab.analysis.steering.data import ContrastPair
from saelab.analysis.steering.score import EFFECT_KEY, effect_sweep
from saelab.analysis.steering.vectors import SteeringVector, check_fits, model_label
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_at_layer, hook_layer_and_suffix, n_layers


def retained(effects: Sequence[float], reference: Sequence[float]) -> list[float | None]:
    """``effects[i] / reference[i]``, None where the reference is zero or not finite."""
    return [
        e / r if r and math.isfinite(r) and math.isfinite(e) else None
        for e, r in zip(effects, reference, strict=True)
    ]


def effects(
    model: PreTrainedModel,
    tokenizer: Any,
    vector: SteeringVector,
    coefs: Sequence[float],
    pairs: Sequence[ContrastPair],
    *,
    positions: str | None = None,
    hook: str | None = None,
) -> list[float]:
    """The transfer effect (:data:`EFFECT_KEY`) of ``vector`` at each coefficient."""
    steerings = [Steering(vector, float(c), positions, hook) for c in coefs]
    return [row[EFFECT_KEY] for row in effect_sweep(model, tokenizer, pairs, steerings)]


def _require_pairs(pairs: Sequence[ContrastPair] | None) -> Sequence[ContrastPair]:
    if not pairs:
        raise SaelabError(
            "transfer compares the effect on scored completions; pass --eval FILE.jsonl "
            "(prompt, target, contrast)"
        )
    return pairs


def layer_transfer(
    model: PreTrainedModel,
    tokenizer: Any,
    vector: SteeringVector,
    layers: Sequence[int],
    coefs: Sequence[float],
    pairs: Sequence[ContrastPair] | None,
    *,
    positions: str | None = None,
    reference: Sequence[float] | None = None,
) -> dict[str, Any]:
    """``vector`` applied at the same hook type of each of ``layers``; ``reference`` (the effect
    at its own hook per coefficient) is measured when not given.

    Returns ``{"own_layer", "coefs", "reference", "cells": [{"layer", "hook", "effect",
    "retained"}]}`` with one entry per coefficient in ``effect`` and ``retained``.
    """
    pairs = _require_pairs(pairs)
    if vector.layer is None:
        raise SaelabError(
            f"the vector's hook {vector.hook!r} has no layer index, so it has no counterpart at "
            "other layers; build it at a blocks.<L>.<hook> name"
        )
    own, _ = hook_layer_and_suffix(vector.hook)
    count = n_layers(model)
    outside = [layer for layer in layers if not 0 <= layer < count]
    if outside:
        raise SaelabError(
            f"layer(s) {', '.join(map(str, outside))} are outside this model, which has layers "
            f"0-{count - 1}; pass --transfer-layers within 0-{count - 1}"
        )
    if reference is None:
        reference = effects(model, tokenizer, vector, coefs, pairs, positions=positions)
    cells = []
    for layer in layers:
        hook = hook_at_layer(vector.hook, layer)
        check_fits(model, vector, hook)
        moved = (
            list(reference)
            if layer == own
            else effects(model, tokenizer, vector, coefs, pairs, positions=positions, hook=hook)
        )
        cells.append(
            {"layer": layer, "hook": hook, "effect": moved, "retained": retained(moved, reference)}
        )
    return {
        "own_layer": own,
        "coefs": [float(c) for c in coefs],
        "reference": list(reference),
        "cells": cells,
    }


def model_transfer(
    model: PreTrainedModel,
    tokenizer: Any,
    vector: SteeringVector,
    coefs: Sequence[float],
    pairs: Sequence[ContrastPair] | None,
    *,
    reference: Sequence[float],
    positions: str | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """``vector`` applied to another ``model`` at its own hook; ``reference`` is its effect on
    the model it was built on. A model of another width fails with a one-line error.

    Returns ``{"model", "from_model", "hook", "coefs", "reference", "effect", "retained"}``.
    """
    pairs = _require_pairs(pairs)
    check_fits(model, vector)
    moved = effects(model, tokenizer, vector, coefs, pairs, positions=positions)
    return {
        "model": model_name or model_label(model),
        "from_model": vector.model,
        "hook": vector.hook,
        "coefs": [float(c) for c in coefs],
        "reference": list(reference),
        "effect": moved,
        "retained": retained(moved, reference),
    }
