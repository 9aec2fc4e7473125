"""What the suites share: an SAE's identity for grouping (architecture, hook, seed, L0), SAE
folders grouped by model and hook so each group's forward passes are made once, and a small
batched logistic-regression probe (L-BFGS, L2 penalty) used by absorption and probing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.saes.storage import read_sae_cfg


def sae_info(sae_dir: str | Path, metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """``info`` of a saved SAE for a suite's result: ``architecture``, ``hook``, ``d_in``,
    ``d_sae``, ``seed`` (None unless trained with a seed of its own), ``model``, and ``l0`` from
    its ``metrics.json`` (written by ``saelab eval``) when there is one."""
    cfg = read_sae_cfg(sae_dir)
    own = cfg.get("saelab") or {}
    sae_cfg = own.get("sae") or {}
    meta = cfg.get("metadata") or {}
    info: dict[str, Any] = {
        "architecture": own.get("architecture") or cfg.get("architecture"),
        "hook": meta.get("hook_name") or sae_cfg.get("hook"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "seed": sae_cfg.get("seed"),
        "model": meta.get("model_name"),
    }
    l0 = (metrics or {}).get("l0")
    if l0 is None:
        path = Path(sae_dir) / "metrics.json"
        if path.exists():
            import json

            try:
                l0 = json.loads(path.read_text()).get("l0")
            except (json.JSONDecodeError, OSError):
                l0 = None
    info["l0"] = l0
    return info


@dataclass
class LogisticProbe:
    """``P`` independent logistic regressions on standardised inputs: ``logit = ((x - mean) /
    std) @ w + b`` for each problem ``p``. ``mean``/``std`` are ``[P, D]``, or ``[1, D]`` when the
    problems share their inputs."""

    w_PD: Float[Tensor, "P D"]
    b_P: Float[Tensor, " P"]
    mean_PD: Float[Tensor, "P D"]
    std_PD: Float[Tensor, "P D"]

    def logits(self, x_PND: Float[Tensor, "P N D"]) -> Float[Tensor, "P N"]:
        """Logits ``[P, N]``; ``x`` may be ``[1, N, D]`` (the same inputs for every problem)."""
        z = (x_PND - self.mean_PD[:, None]) / self.std_PD[:, None]
        return _linear(z, self.w_PD) + self.b_P[:, None]

    def direction(self) -> Float[Tensor, "P D"]:
        """Each probe's direction in the input's own units (``w / std``), unit norm."""
        d = self.w_PD / self.std_PD
        return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def fit_logistic(
    x_PND: Float[Tensor, "P N D"],
    y_PN: Float[Tensor, "P N"],
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
    balanced: bool = False,
    per_feature_scale: bool = True,
) -> LogisticProbe:
    """Fit ``P`` logistic regressions at once (one per leading index; labels 0/1; ``x`` may be
    ``[1, N, D]``: the same inputs for every problem), minimising
    mean binary cross-entropy + ``l2``·‖w‖² on inputs standardised by their training mean and
    spread, by L-BFGS (the problems are independent, so one optimiser on their summed loss
    fits each). With ``balanced`` each class weighs half of the loss, however rare (one letter
    against the rest). ``per_feature_scale`` divides each input by its own spread (for latents,
    whose scales differ by orders of magnitude); without it all inputs share one spread (the
    root-mean-square of the centred inputs), so a direction nearly constant in training (a word
    never seen) is not blown up. Inputs are float64 for a stable line search."""
    x = x_PND.double()
    y = y_PN.double()
    mean = x.mean(dim=1)
    std = x.std(dim=1).clamp_min(1e-6)
    if not per_feature_scale:
        std = (x - mean[:, None]).pow(2).mean(dim=(1, 2)).sqrt().clamp_min(1e-6)[:, None]
        std = std.expand_as(mean)
    z = (x - mean[:, None]) / std[:, None]
    n_problems = y.shape[0]
    weight = None
    if balanced:
        n_pos = y.sum(dim=1, keepdim=True).clamp_min(1)
        n_neg = (1 - y).sum(dim=1, keepdim=True).clamp_min(1)
        weight = y * (y.shape[1] / (2 * n_pos)) + (1 - y) * (y.shape[1] / (2 * n_neg))
    w = torch.zeros(n_problems, x.shape[2], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_problems, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> Tensor:
        opt.zero_grad()
        logits = _linear(z, w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, weight=weight, reduction="none"
        ).mean(dim=1)
        total = (loss + l2 * (w * w).sum(dim=1)).sum()
        total.backward()
        return total

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(w.detach().float(), b.detach().float(), mean.float(), std.float())


def _linear(z_PND: Tensor, w_PD: Tensor) -> Tensor:
    """``z[p] @ w[p]`` per problem ``[P, N]``; ``z`` may be ``[1, N, D]`` (shared inputs)."""
    return (z_PND @ w_PD.unsqueeze(-1).to(z_PND.dtype)).squeeze(-1)


def accuracy(logits_PN: Tensor, y_PN: Tensor) -> Tensor:
    """Share of correct signs per problem ``[P]`` (logit > 0 means class 1)."""
    return ((logits_PN > 0) == (y_PN > 0.5)).double().mean(dim=1)


def f1_score(pred_PN: Tensor, y_PN: Tensor) -> Tensor:
    """F1 of boolean predictions per problem ``[P]`` (0 when there are no positives at all)."""
    pred, y = pred_PN.bool(), y_PN > 0.5
    tp = (pred & y).sum(dim=1).double()
    fp = (pred & ~y).sum(dim=1).double()
    fn = (~pred & y).sum(dim=1).double()
    return torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp))


def top_by_mean_difference(feats_NF: Float[Tensor, "N F"], y_N: Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` latents with the largest |mean over class 1 − mean over class 0|,
    largest first (Gurnee et al. 2023; SAEBench's sparse probing)."""
    pos = y_N > 0.5
    diff = (feats_NF[pos].mean(dim=0) - feats_NF[~pos].mean(dim=0)).abs()
    return torch.topk(diff, min(k, diff.numel())).indices
