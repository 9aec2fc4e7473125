"""Keep the top-k features of each prompt and zero-ablate the rest (METHODS §9.3).

Features are ranked by a score, the activation value by default or |attribution|, either at each
position (``per="position"``: k features per token) or per prompt (``per="prompt"``: scores
summed over the prompt's spliced positions, the same k features kept at all of them). The kept
features are decoded alone (``x̂_topk``) or with the SAE's error term (``x̂_topk + ε``), which
isolates the effect of dropping features from the SAE's own reconstruction error.

With ``k ≥ d_sae`` every feature is kept and the splice is exactly the full SAE's.

Example:
    >>> edit = keep_topk_edit(10, splice_NP, per="position", add_error=False)
    >>> logits = spliced.logits(tokens_NP, mask_NP, {hook: edit})
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from saelab.analysis.circuits.config import KEEP_PER
from saelab.analysis.circuits.spliced import SiteEdit
from saelab.errors import SaelabError


def topk_keep_mask(
    scores_NPF: Float[Tensor, "N P F"],
    k: int,
    splice_NP: Bool[Tensor, "N P"],
    per: str = "position",
) -> Bool[Tensor, "N P F"]:
    """True for the `k` highest-scoring features of each position or prompt.

    Scores at positions outside `splice_NP` (BOS, padding) never count towards a prompt's
    ranking. Ties are broken by ``torch.topk``; with ``k ≥ F`` everything is kept.
    """
    if per not in KEEP_PER:
        raise SaelabError(f"keep per must be one of {KEEP_PER}, got {per!r}")
    n_feats = scores_NPF.shape[-1]
    if k >= n_feats:
        return torch.ones_like(scores_NPF, dtype=torch.bool)
    if per == "position":
        idx_NPK = scores_NPF.topk(k, dim=-1).indices
        return torch.zeros_like(scores_NPF, dtype=torch.bool).scatter_(-1, idx_NPK, True)
    totals_NF = (scores_NPF * splice_NP[..., None].to(scores_NPF.dtype)).sum(1)
    idx_NK = totals_NF.topk(k, dim=-1).indices
    keep_NF = torch.zeros_like(totals_NF, dtype=torch.bool).scatter_(-1, idx_NK, True)
    return keep_NF[:, None, :].expand_as(scores_NPF)


def keep_topk_edit(
    k: int,
    splice_NP: Bool[Tensor, "N P"],
    *,
    per: str = "position",
    scores_NPF: Float[Tensor, "N P F"] | None = None,
    add_error: bool = False,
) -> SiteEdit:
    """A :class:`SiteEdit` that zeroes all but the top-k features.

    Without `scores_NPF` features are ranked by their activation in the forward pass being
    spliced; with it (e.g. |attribution| from the clean pass) by those fixed scores.
    """
    fixed_keep = None if scores_NPF is None else topk_keep_mask(scores_NPF, k, splice_NP, per)

    def keep(feats_NPF: Tensor) -> Tensor:
        keep_NPF = fixed_keep
        if keep_NPF is None:
            keep_NPF = topk_keep_mask(feats_NPF, k, splice_NP.to(feats_NPF.device), per)
        return torch.where(keep_NPF.to(feats_NPF.device), feats_NPF, 0.0)

    return SiteEdit(features=keep, add_error=add_error)
