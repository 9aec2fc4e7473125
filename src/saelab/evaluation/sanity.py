"""Sanity checks that every ``saelab eval`` runs, so that a wrong setup is not read as a bad SAE.

Three mistakes make an SAE look broken although it is fine (or fine although the numbers mean
nothing), and each gets a warning (``logging.warning`` and a ``warnings`` list in
``eval_info.json`` / ``eval_summary.json``):

* **Wrong text or context**: the model's clean CE on the evaluation text is more than
  :data:`CE_EXCESS_NATS` nats above its CE on saelab's embedded default corpus at the same
  context (the *reference CE*, measured once over :data:`REFERENCE_TOKENS` tokens and cached as
  JSON under ``$SAELAB_CACHE_DIR/reference_ce/``). 1.5 nats is a factor of e^1.5 ≈ 4.5 in
  perplexity: far more than the gap between ordinary web-text corpora, so only text the model
  cannot read (a wrong tokenizer, shuffled tokens, another language) or a broken context trips it.
* **BOS not masked**: position 0 was scored. The first position is an attention sink with an
  activation norm tens of times the others, so it dominates MSE and FVU (METHODS §7).
* **Normalisation mismatch**: a saelab SAE was trained on activations with E‖x‖ ≈ √d_in / s,
  s being ``saelab.activation_scale_folded`` in its ``cfg.json``; a mean input norm of the
  evaluation data more than :data:`NORM_RATIO_LIMIT` times off either way means another model,
  hook or preprocessing than the SAE was trained for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from typing import Any

import torch

from saelab.atomic import write_json
from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.evaluation.splice import next_token_ce
from saelab.models.loading import cache_root
from saelab.saes.base import SparseAutoencoder

log = logging.getLogger(__name__)

CE_EXCESS_NATS = 1.5
"""Warn when the clean CE on the evaluation text exceeds the reference CE by more than this."""

NORM_RATIO_LIMIT = 2.0
"""Warn when the data's mean input norm is more than this factor off the SAE's expected norm."""

REFERENCE_TOKENS = 2048
"""Tokens of the default corpus the reference CE is measured on (a few seconds on a CPU)."""


def _cache_path(model, model_name: str, context: int, tokens: int):
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)[-60:]
    # The first weight's sum tells apart different weights under one name (a re-trained local
    # folder, random test models), without hashing the whole model.
    fingerprint = f"{model_name}|{float(next(model.parameters()).double().sum()):.8e}"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:10]
    return cache_root() / "reference_ce" / f"{slug}-{digest}-ctx{context}-tok{tokens}.json"


@torch.no_grad()
def reference_ce(
    model,
    tokenizer,
    model_name: str,
    *,
    context: int,
    tokens: int = REFERENCE_TOKENS,
    batch_size: int = 8,
) -> float | None:
    """The model's mean next-token CE on the embedded default corpus at ``context``.

    Cached per (model name and weights, context, tokens) as JSON; ``None`` when the default
    corpus is not available (the check is then skipped, not failed).
    """
    path = _cache_path(model, model_name, context, tokens)
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["ce"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the damaged reference-CE cache %s", path)
    device = next(model.parameters()).device
    specials = special_token_ids(tokenizer)
    total, count = 0.0, 0
    try:
        batches = TokenBatches("default", tokenizer, context=context, batch_size=batch_size)
        for tokens_NP in batches:
            tokens_NP = tokens_NP.to(device)
            scored_NP = token_mask(tokens_NP, 1, specials)
            scored_NP[:, -1] = False
            ce_NP = next_token_ce(model(tokens_NP, use_cache=False).logits, tokens_NP)
            total += float(ce_NP[scored_NP].sum())
            count += int(scored_NP.sum())
            if count >= tokens:
                break
    except SaelabError as exc:
        log.warning("no reference CE (default corpus unavailable: %s)", exc)
        return None
    if count == 0:
        return None
    ce = total / count
    write_json(path, {"model": model_name, "context": context, "tokens": count, "ce": ce})
    return ce


def expected_input_norm(sae: SparseAutoencoder, cfg: dict[str, Any] | None = None) -> float | None:
    """E‖x‖ of the data ``sae`` was trained on (√d_in / s), or ``None`` when unknown.

    ``cfg`` is the saved ``cfg.json`` (its folded scale s); without it an in-memory SAE's own
    ``activation_scale`` is used unless it is exactly 1 (no scale was ever estimated).
    """
    scale = None
    if cfg is not None:
        scale = (cfg.get("saelab") or {}).get("activation_scale_folded")
    elif float(sae.activation_scale) != 1.0:
        scale = float(sae.activation_scale)
    if not scale or scale <= 0:
        return None
    return math.sqrt(sae.d_in) / float(scale)


def sanity_warnings(
    *,
    clean_ce: float,
    ref_ce: float | None,
    context: int,
    position0_kept: bool,
    mean_norm: float | None,
    expected_norm: float | None,
) -> list[str]:
    """The warnings for one SAE's evaluation (each also logged)."""
    warnings = []
    if ref_ce is not None and clean_ce > ref_ce + CE_EXCESS_NATS:
        warnings.append(
            f"the model's clean CE on the evaluation text is {clean_ce:.3f} nats, more than "
            f"{CE_EXCESS_NATS} above its {ref_ce:.3f} on the default text at context {context}; "
            "check --dataset, --context and that the tokenizer matches the model"
        )
    if position0_kept:
        warnings.append(
            "position 0 (BOS / attention sink) was not masked; its huge norm dominates MSE and "
            "FVU: mask it (skip_positions=1) or give the tokenizer a BOS token"
        )
    if mean_norm is not None and expected_norm is not None and expected_norm > 0:
        ratio = mean_norm / expected_norm
        if not 1 / NORM_RATIO_LIMIT <= ratio <= NORM_RATIO_LIMIT:
            warnings.append(
                f"the evaluation data's mean norm {mean_norm:.4g} is {ratio:.3g}× the "
                f"{expected_norm:.4g} the SAE was trained on; check --model and the hook, or "
                "the SAE's activation scale"
            )
    for warning in warnings:
        log.warning(warning)
    return warnings
