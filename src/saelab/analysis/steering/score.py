"""How much a steering intervention moves chosen completions, and what it costs elsewhere.

For scored pairs (prompt, target, contrast), with log p(completion | BOS + prompt) summed over
the completion's tokens, each relative to the *unsteered* model (for additive vectors that equals
coefficient 0, exactly; for ``sae-clamp`` coefficient 0 ablates the feature):

* ``delta_logprob_target``, ``delta_logprob_contrast``: mean change of each completion's
  log-probability;
* ``delta_logit_diff``: mean change of log p(target) − log p(contrast), the log-odds between the
  two; for one-token completions it is exactly the change of their logit difference.

Cost, on neutral text with the vector applied as in :mod:`~saelab.analysis.steering.apply`
(each row's prompt is its BOS, so ``after_prompt`` steers all of it), averaged over positions
that are kept (not BOS, padding or special) and have a next token, as in
``evaluation/splice.py``:

* ``kl``: KL(p_clean ‖ p_steered) per position;
* ``delta_ce``: next-token CE steered − clean.

Example:
    >>> rows = sweep(model, tokenizer, vector, [-4, 0, 4], pairs=pairs, neutral=neutral_rows)
    >>> rows[2]["delta_logit_diff"], rows[2]["kl"]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from saelab.analysis.steering.apply import Steering
from saelab.analysis.steering.data import (
    ContrastPair,
    TextRows,
    length_mask,
    pad_id,
    prompt_ids,
    right_pad,
)
from saelab.analysis.steering.vectors import SteeringVector
from saelab.evaluation.splice import kl_per_position, next_token_ce

SWEEP_KEYS: dict[str, str] = {
    "delta_logprob_target": "mean change of log p(target completion)",
    "delta_logprob_contrast": "mean change of log p(contrast completion)",
    "delta_logit_diff": "mean change of log p(target) − log p(contrast)",
    "kl": "KL(p_clean ‖ p_steered) per neutral-text position",
    "delta_ce": "next-token CE increase on neutral text",
}
"""Every measure a sweep row holds (besides ``coef``), with what it is; tables, JSON and the
README follow this order."""
EFFECT_KEY = "delta_logit_diff"
"""The effect that transfer compares (effect retained = effect elsewhere / effect here)."""
SCORE_ROWS = 16
"""Sequences per forward pass when scoring completions."""
NEUTRAL_ROWS = 4
"""Neutral-text rows per forward pass (their logits over the vocabulary are large)."""


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _context(steering: Steering | None, model: PreTrainedModel, prompt_lens: Any):
    return steering.applied(model, prompt_lens) if steering else contextlib.nullcontext()


@torch.no_grad()
def completion_logprobs(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    steering: Steering | None = None,
) -> Float[Tensor, " N"]:
    """log p(completion | BOS + prompt), summed over the completion's tokens, per pair."""
    device, pad = _device(model), pad_id(tokenizer)
    out = []
    for start in range(0, len(prompts), SCORE_ROWS):
        encoded = [
            prompt_ids(tokenizer, p, c)
            for p, c in zip(
                prompts[start : start + SCORE_ROWS],
                completions[start : start + SCORE_ROWS],
                strict=True,
            )
        ]
        ids_NP, lengths_N = right_pad([ids for ids, _ in encoded], pad)
        ids_NP, lengths_N = ids_NP.to(device), lengths_N.to(device)
        prompt_N = torch.tensor([n for _, n in encoded], device=device)
        mask_NP = length_mask(lengths_N, ids_NP.shape[1])
        with _context(steering, model, prompt_N):
            logits_NPV = model(ids_NP, attention_mask=mask_NP.long(), use_cache=False).logits
        logp_NPV = logits_NPV[:, :-1].float().log_softmax(-1)
        next_NP = logp_NPV.gather(-1, ids_NP[:, 1:, None])[..., 0]
        # Position p predicts token p + 1; completion tokens sit at prompt_len .. len - 1.
        index_P = torch.arange(1, ids_NP.shape[1], device=device)
        scored_NP = (index_P[None] >= prompt_N[:, None]) & (index_P[None] < lengths_N[:, None])
        out.append((next_NP * scored_NP).sum(-1))
    return torch.cat(out).cpu()


def pair_logprobs(
    model: PreTrainedModel,
    tokenizer: Any,
    pairs: Sequence[ContrastPair],
    steering: Steering | None = None,
) -> tuple[Float[Tensor, " N"], Float[Tensor, " N"]]:
    """(log p(target), log p(contrast)) per pair."""
    prompts = [p.prompt for p in pairs]
    target = completion_logprobs(model, tokenizer, prompts, [p.positive for p in pairs], steering)
    contrast = completion_logprobs(model, tokenizer, prompts, [p.negative for p in pairs], steering)
    return target, contrast


def effect_sweep(
    model: PreTrainedModel,
    tokenizer: Any,
    pairs: Sequence[ContrastPair],
    steerings: Sequence[Steering],
    progress: bool = False,
) -> list[dict[str, float]]:
    """The three effect measures of :data:`SWEEP_KEYS` for each steering, against the clean
    model."""
    clean_t, clean_c = pair_logprobs(model, tokenizer, pairs)
    rows = []
    for steering in tqdm(steerings, desc="effect", disable=not progress, leave=False):
        t, c = pair_logprobs(model, tokenizer, pairs, steering)
        rows.append(
            {
                "delta_logprob_target": float((t - clean_t).mean()),
                "delta_logprob_contrast": float((c - clean_c).mean()),
                "delta_logit_diff": float(((t - c) - (clean_t - clean_c)).mean()),
            }
        )
    return rows


@torch.no_grad()
def cost_sweep(
    model: PreTrainedModel,
    neutral: TextRows,
    steerings: Sequence[Steering],
    progress: bool = False,
) -> list[dict[str, float]]:
    """``kl`` and ``delta_ce`` on ``neutral`` for each steering (plus ``ce_clean``,
    ``ce_steered``). Each batch's clean pass is shared by all steerings."""
    device = _device(model)
    n_scored, ce_clean = 0, 0.0
    ce = [0.0] * len(steerings)
    kl = [0.0] * len(steerings)
    batches = list(neutral.batches(NEUTRAL_ROWS))
    for ids_NP, lengths_N, keep_NP in tqdm(batches, desc="cost", disable=not progress, leave=False):
        ids_NP, keep_NP = ids_NP.to(device), keep_NP.to(device)
        real_NP = length_mask(lengths_N.to(device), ids_NP.shape[1])
        # A position counts when it is kept and its next token is real text.
        scored_NP = keep_NP.clone()
        scored_NP[:, :-1] &= real_NP[:, 1:]
        scored_NP[:, -1] = False
        mask_NP = real_NP.long()
        clean_NPV = model(ids_NP, attention_mask=mask_NP, use_cache=False).logits
        ce_clean += float(next_token_ce(clean_NPV, ids_NP)[scored_NP].sum())
        n_scored += int(scored_NP.sum())
        for i, steering in enumerate(steerings):
            with steering.applied(model, 1):
                steered_NPV = model(ids_NP, attention_mask=mask_NP, use_cache=False).logits
            ce[i] += float(next_token_ce(steered_NPV, ids_NP)[scored_NP].sum())
            kl[i] += float(kl_per_position(clean_NPV, steered_NPV)[scored_NP].sum())
    n = max(n_scored, 1)
    return [
        {
            "kl": kl[i] / n,
            "delta_ce": (ce[i] - ce_clean) / n,
            "ce_clean": ce_clean / n,
            "ce_steered": ce[i] / n,
        }
        for i in range(len(steerings))
    ]


def sweep(
    model: PreTrainedModel,
    tokenizer: Any,
    vector: SteeringVector,
    coefs: Sequence[float],
    *,
    pairs: Sequence[ContrastPair] | None = None,
    neutral: TextRows | None = None,
    positions: str | None = None,
    hook: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per coefficient: ``coef`` and every key of :data:`SWEEP_KEYS` (None where its
    input, ``pairs`` or ``neutral``, was not given); with ``neutral`` also ``ce_clean`` and
    ``ce_steered``.

    Example:
        >>> sweep(model, tokenizer, vector, [0, 8], pairs=read_pairs("eval.jsonl"))
    """
    steerings = [Steering(vector, float(c), positions, hook) for c in coefs]
    rows: list[dict[str, Any]] = [{"coef": float(c), **dict.fromkeys(SWEEP_KEYS)} for c in coefs]
    if pairs:
        for row, effect in zip(
            rows, effect_sweep(model, tokenizer, pairs, steerings, progress), strict=True
        ):
            row.update(effect)
    if neutral is not None:
        for row, cost in zip(rows, cost_sweep(model, neutral, steerings, progress), strict=True):
            row.update(cost)
    return rows
