"""Faithfulness of feature circuits: the metric when only the top-n features are kept.

A circuit C is the n (site, feature) nodes with the largest |IE| (summed over positions, averaged
over prompts; :meth:`NodeEffects.ranked_features`). Features outside C are set, at every spliced
position, to their mean over the patch batch (the corrupted prompts, or the clean ones for tasks
without them; the mean is over prompts and spliced positions, since prompts of different
templates do not line up position by position) or to zero. Error nodes keep their values unless
``ablate_errors``, in which case they are ablated the same way.

``faithfulness(C) = (m(C) − m(∅)) / (m(M) − m(∅))`` with M the whole model (the clean metric)
and ∅ no feature kept (Marks et al., METHODS §9.1).

Example:
    >>> curve = faithfulness_curve(spliced, batch, effects, ablation="mean")
    >>> curve["n_features"], curve["metric"], curve["faithfulness"]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from saelab.analysis.circuits.attribution import Metric, NodeEffects
from saelab.analysis.circuits.config import ABLATIONS
from saelab.analysis.circuits.spliced import SiteEdit, SplicedModel
from saelab.analysis.circuits.tasks import TaskBatch, clean_metric, logit_diff
from saelab.errors import SaelabError

_STEPS = (1, 2, 5)


def default_counts(n_nodes: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, 50, ... below `n_nodes`, then `n_nodes` itself."""
    counts, scale = [0], 1
    while True:
        for step in _STEPS:
            if step * scale >= n_nodes:
                return [*counts, n_nodes]
            counts.append(step * scale)
        scale *= 10


def ablation_values(
    spliced: SplicedModel, batch: TaskBatch, how: str = "mean"
) -> dict[str, tuple[Float[Tensor, " F"], Float[Tensor, " D"]]]:
    """Per site, what ablated features and error terms are set to: zero, or the mean over the
    patch batch's spliced positions."""
    if how not in ABLATIONS:
        raise SaelabError(f"ablation must be one of {ABLATIONS}, got {how!r}")
    tokens_NP = batch.tokens_NP if batch.corrupted_NP is None else batch.corrupted_NP
    values = spliced.site_values(tokens_NP, batch.mask_NP)
    n_spliced = spliced.splice_mask(batch.mask_NP).sum().clamp_min(1)
    out = {}
    for hook, v in values.items():
        feats_F = v.feats_NPF.sum((0, 1)) / n_spliced  # zero outside spliced positions
        error_D = v.error_NPD.sum((0, 1)) / n_spliced
        out[hook] = (feats_F, error_D) if how == "mean" else (feats_F * 0, error_D * 0)
    return out


def circuit_edits(
    keep: dict[str, Bool[Tensor, " F"]],
    ablated: dict[str, tuple[Tensor, Tensor]],
    ablate_errors: bool = False,
) -> dict[str, SiteEdit]:
    """Edits that keep the features marked in `keep` and set the others to `ablated` values."""

    def edit(hook: str) -> SiteEdit:
        keep_F = keep[hook]
        feats_F, error_D = ablated[hook]

        def features(feats_NPF: Tensor) -> Tensor:
            return torch.where(keep_F.to(feats_NPF.device), feats_NPF, feats_F.to(feats_NPF))

        def error(error_NPD: Tensor) -> Tensor:
            return error_D.to(error_NPD).expand_as(error_NPD)

        return SiteEdit(features=features, error=error if ablate_errors else None)

    return {hook: edit(hook) for hook in keep}


@torch.no_grad()
def faithfulness_curve(
    spliced: SplicedModel,
    batch: TaskBatch,
    effects: NodeEffects,
    *,
    ablation: str = "mean",
    ablate_errors: bool = False,
    counts: list[int] | None = None,
    metric: Metric = logit_diff,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean metric over prompts with the top-n features kept, for each n in `counts`
    (default :func:`default_counts` of all features), and its normalised faithfulness."""
    ranked = effects.ranked_features()
    # n = 0 is always measured: it is m(∅), the curve's zero.
    counts = sorted({0, *(default_counts(len(ranked)) if counts is None else counts)})
    ablated = ablation_values(spliced, batch, ablation)
    m_full = float(clean_metric(spliced.model, batch, metric).mean())
    metrics = []
    for n in tqdm(counts, desc="faithfulness", disable=not progress, leave=False):
        keep = {h: torch.zeros(s.d_sae, dtype=torch.bool) for h, s in spliced.saes.items()}
        for hook, feature, _ in ranked[:n]:
            keep[hook][feature] = True
        edits = circuit_edits(keep, ablated, ablate_errors)
        metrics.append(float(spliced.metric(batch, edits, metric=metric).mean()))
    m_empty = metrics[0]
    span = m_full - m_empty
    return {
        "n_features": counts,
        "metric": metrics,
        "faithfulness": [(m - m_empty) / span if span else math.nan for m in metrics],
        "metric_full_model": m_full,
        "metric_empty_circuit": m_empty,
        "ablation": ablation,
        "ablate_errors": ablate_errors,
        "method": effects.method,
    }
