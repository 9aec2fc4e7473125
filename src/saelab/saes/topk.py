"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead features.

``z = ReLU(TopK_k((x − b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec``,
``L = ‖x − x̂‖² + α·L_aux``. AuxK models the residual ``e = x − x̂`` with the top-``k_aux``
pre-activations among dead features only: ``L_aux = ‖e − ê‖² / ‖e − mean(e)‖²``.
Decoder rows stay unit norm (gradient projection + renormalisation); ``b_dec`` starts at the
geometric median of the first batch.

Only the encoder GEMM is dense: the decoder and every backward use the K chosen features
(:mod:`saelab.saes.sparse_ops`).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.saes.base import (
    SparseAutoencoder,
    SparseFeatureActs,
    TrainStepOutput,
    mse_per_token,
)
from saelab.saes.registry import register
from saelab.saes.sparse_ops import gather_preacts, sparse_decode


@register
class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    saelens_architecture = "topk"
    default_apply_b_dec_to_input = True

    def init_weights_(self, generator: torch.Generator | None) -> None:
        bound = 1 / math.sqrt(self.d_in)
        W_enc_DF = torch.rand(self.d_in, self.d_sae, generator=generator) * 2 * bound - bound
        # Tied init (decoder = encoderᵀ, unit rows), then trained untied.
        self.W_dec.copy_(W_enc_DF.T / W_enc_DF.T.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def init_from_data_(self, x_BD: Float[Tensor, "B D"]) -> None:
        if self.apply_b_dec_to_input:
            with torch.no_grad():
                self.b_dec.copy_(geometric_median(x_BD.float()))

    def _preacts(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        sae_in_BD = self.sae_input(x_BD)
        with torch.no_grad():
            pre_BF = torch.addmm(self.b_enc, sae_in_BD, self.W_enc)
        return sae_in_BD, pre_BF

    def _select(self, sae_in_BD: Tensor, pre_BF: Tensor, k: int) -> SparseFeatureActs:
        top_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
        vals_BK = gather_preacts(sae_in_BD, self.W_enc, self.b_enc, idx_BK, top_BK).relu()
        return SparseFeatureActs(idx_BK=idx_BK, vals_BK=vals_BK, d_sae=self.d_sae)

    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> SparseFeatureActs:
        sae_in_BD, pre_BF = self._preacts(x_BD)
        return self._select(sae_in_BD, pre_BF, min(self.cfg.k, self.d_sae))

    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        sae_in_BD, pre_BF = self._preacts(x_BD)
        feats = self._select(sae_in_BD, pre_BF, min(self.cfg.k, self.d_sae))
        recon_BD = sparse_decode(feats.idx_BK, feats.vals_BK, self.W_dec) + self.b_dec
        mse = mse_per_token(recon_BD, x_BD)
        losses = {"mse": mse.detach()}
        loss = mse
        if dead_F is not None and self.cfg.aux_coefficient > 0 and bool(dead_F.any()):
            auxk = self._auxk_loss(sae_in_BD, pre_BF, dead_F, (x_BD - recon_BD).detach())
            losses["auxk"] = auxk.detach()
            loss = loss + self.cfg.aux_coefficient * auxk
        return TrainStepOutput(loss=loss, losses=losses, recon_BD=recon_BD, feats=feats)

    def _auxk_loss(
        self, sae_in_BD: Tensor, pre_BF: Tensor, dead_F: Tensor, residual_BD: Tensor
    ) -> Tensor:
        k_aux = min(self.cfg.k_aux_for(self.d_in), int(dead_F.sum()))
        dead_pre_BF = pre_BF.masked_fill(~dead_F, float("-inf"))
        aux = self._select(sae_in_BD, dead_pre_BF, k_aux)
        residual_hat_BD = sparse_decode(aux.idx_BK, aux.vals_BK, self.W_dec)
        variance = (residual_BD - residual_BD.mean(0)).pow(2).sum(-1).mean()
        loss = (residual_hat_BD - residual_BD).pow(2).sum(-1).mean() / variance.clamp_min(1e-12)
        return torch.nan_to_num(loss, nan=0.0)

    def before_optimizer_step_(self) -> None:
        self._remove_parallel_decoder_grad_()

    def after_optimizer_step_(self) -> None:
        self._normalise_decoder_rows_()


def geometric_median(
    points_ND: Float[Tensor, "N D"], iters: int = 100, tol: float = 1e-5
) -> Float[Tensor, " D"]:
    """Weiszfeld's algorithm, started at the mean: robust to the outliers a mean chases."""
    median_D = points_ND.mean(0)
    for _ in range(iters):
        weights_N = 1 / (points_ND - median_D).norm(dim=-1).clamp_min(1e-8)
        new_D = (weights_N[:, None] * points_ND).sum(0) / weights_N.sum()
        if (new_D - median_D).norm() <= tol * new_D.norm().clamp_min(1e-12):
            return new_D
        median_D = new_D
    return median_D
