"""The activation scale: one scalar per hook that makes E‖x‖ = √d_in over a dataset's first rows.

Training in these units lets learning rates and sparsity penalties carry over between models and
layers. The live stream (:mod:`saelab.data.activations`) and the cache writer
(:mod:`saelab.data.cache`) both estimate it here, so a run trained from a cache sees the units a
run on the model would have seen.

Example:
    >>> total = norm_sum(rows_TD)  # Σ‖x‖ in float64; sums of parts add up
    >>> activation_scale(total, rows_TD.shape[0], d_in=64, hook="blocks.6.hook_mlp_out")
"""

from __future__ import annotations

import math

from jaxtyping import Float
from torch import Tensor

from saelab.errors import SaelabError


def norm_sum(rows_TD: Float[Tensor, "T D"]) -> float:
    """Σ_t ‖x_t‖, computed in float64 so that summing it in parts (per batch, per process) agrees
    with one sum over all rows to float64 rounding."""
    return float(rows_TD.double().norm(dim=-1).sum())


def activation_scale(norm_total: float, count: int, d_in: int, hook: str) -> float:
    """√d_in / mean‖x‖, the mean taken from ``norm_total`` (a :func:`norm_sum`) over ``count``
    rows; all-zero or non-finite activations are a one-line error."""
    mean_norm = norm_total / max(count, 1)
    if not math.isfinite(mean_norm) or mean_norm == 0:
        raise SaelabError(f"activations at {hook} are all zero or not finite; pick another hook")
    return math.sqrt(d_in) / mean_norm
