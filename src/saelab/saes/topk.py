"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead features.

``z = ReLU(TopK_k((x − b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec``,
``L = ‖x − x̂‖² + α·L_aux``. AuxK models the residual ``e = x − x̂`` with the top-``k_aux``
pre-activations among dead features only: ``L_aux = ‖e − ê‖² / ‖e − mean(e)‖²``.
Decoder rows stay unit norm (gradient projection + renormalisation); ``b_dec`` starts at the
geometric median of the first batch.

Only the encoder GEMM is dense: the decoder and every backward use the K chosen features
(:mod:`saelab.saes.sparse_ops`).

Opt-in, off by default: ``sae.bf16_encoder = True`` ranks features with a bfloat16 GEMM (about
twice as fast on CPUs with AVX-512 BF16), keeps 2K candidates per token and recomputes their
pre-activations in float32 to pick the final K. The values are exact; the chosen set can differ
from float32 ranking when the K-th and (2K+1)-th pre-activations are within bf16 rounding.
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
from saelab.saes.sparse_ops import (
    dense_mm,
    gather_preacts,
    sampled_dots,
    sparse_decode,
    topk_rows,
)

_BLOCK_ELEMENTS = 1 << 22
"""Pre-activations ranked per block of rows: 16 MB in float32, which stays in a large L3 cache."""


@register
class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    saelens_architecture = "topk"
    default_apply_b_dec_to_input = True
    bf16_encoder: bool = False
    """Rank features with a bfloat16 encoder GEMM (see the module docstring); off by default."""

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

    def _rank(
        self, x_BD: Tensor, k: int, dead_idx: Tensor | None = None, k_aux: int = 0
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Top-``k`` pre-activations of each token (values, features) and, given the dead
        features, the top-``k_aux`` among them. No gradient: :func:`gather_preacts` adds it.

        The ``[B, F]`` pre-activations are made a block of rows at a time and ranked while the
        block is still in cache; the whole matrix never exists, so a step allocates no 100 MB
        buffer (and takes no page faults filling one).
        """
        with torch.no_grad():
            sae_in_BD = self.sae_input(x_BD)
            W_enc_DF, b_enc_F = self.W_enc, self.b_enc
            k_rank = k
            if self.bf16_encoder and sae_in_BD.dtype == torch.float32:
                # Rank by a bf16 GEMM with spare candidates, then re-rank those in float32.
                k_rank = min(2 * k, self.d_sae)
                W_enc_DF, b_enc_F = W_enc_DF.bfloat16(), b_enc_F.bfloat16()
            rows = max(1, _BLOCK_ELEMENTS // self.d_sae)
            tops, idxs, aux_tops, aux_idxs = [], [], [], []
            for start in range(0, sae_in_BD.shape[0], rows):
                block_bD = sae_in_BD[start : start + rows]
                pre_bF = dense_mm(block_bD.to(W_enc_DF.dtype), W_enc_DF, b_enc_F)
                top_bK, idx_bK = topk_rows(pre_bF, k_rank)
                if k_rank != k:
                    top_bK, idx_bK = self._rerank_exact(block_bD, idx_bK, k)
                tops.append(top_bK)
                idxs.append(idx_bK)
                if dead_idx is not None:
                    # Only dead columns compete; dead_idx maps their ranks back to features.
                    aux_top_bA, aux_pos_bA = topk_rows(pre_bF.index_select(1, dead_idx), k_aux)
                    aux_tops.append(aux_top_bA.to(sae_in_BD.dtype))
                    aux_idxs.append(dead_idx[aux_pos_bA])
            if dead_idx is None:
                return torch.cat(tops), torch.cat(idxs), None, None
            aux_idx_BA = torch.cat(aux_idxs)
            if k_rank != k:
                aux_top_BA = sampled_dots(aux_idx_BA, sae_in_BD, self.W_enc.t())
                aux_top_BA += self.b_enc[aux_idx_BA]
            else:
                aux_top_BA = torch.cat(aux_tops)
            return torch.cat(tops), torch.cat(idxs), aux_top_BA, aux_idx_BA

    def _rerank_exact(self, sae_in_bD: Tensor, cand_bC: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """float32 pre-activations of the candidate features, and the top ``k`` of them."""
        pre_bC = sampled_dots(cand_bC, sae_in_bD, self.W_enc.t()) + self.b_enc[cand_bC]
        top_bK, pos_bK = pre_bC.topk(k, dim=-1, sorted=False)
        return top_bK, cand_bC.gather(-1, pos_bK)

    def _feats(self, x_BD: Tensor, idx_BK: Tensor, top_BK: Tensor) -> SparseFeatureActs:
        b_dec_D = self.b_dec if self.apply_b_dec_to_input else None
        vals_BK = gather_preacts(x_BD, self.W_enc, self.b_enc, idx_BK, top_BK, b_dec_D=b_dec_D)
        return SparseFeatureActs(idx_BK=idx_BK, vals_BK=vals_BK.relu(), d_sae=self.d_sae)

    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> SparseFeatureActs:
        top_BK, idx_BK, _, _ = self._rank(x_BD, min(self.cfg.k, self.d_sae))
        return self._feats(x_BD, idx_BK, top_BK)

    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        use_aux = dead_F is not None and self.cfg.aux_coefficient > 0 and bool(dead_F.any())
        dead_idx = k_aux = None
        if use_aux:
            dead_idx = dead_F.nonzero().squeeze(-1)
            k_aux = min(self.cfg.k_aux_for(self.d_in), dead_idx.numel())
        top_BK, idx_BK, aux_top_BA, aux_idx_BA = self._rank(
            x_BD, min(self.cfg.k, self.d_sae), dead_idx, k_aux or 0
        )
        feats = self._feats(x_BD, idx_BK, top_BK)
        recon_BD = sparse_decode(feats.idx_BK, feats.vals_BK, self.W_dec) + self.b_dec
        mse = mse_per_token(recon_BD, x_BD)
        losses = {"mse": mse.detach()}
        loss = mse
        if use_aux:
            aux = self._feats(x_BD, aux_idx_BA, aux_top_BA)
            auxk = self._auxk_loss(aux, (x_BD - recon_BD).detach())
            losses["auxk"] = auxk.detach()
            loss = loss + self.cfg.aux_coefficient * auxk
        return TrainStepOutput(loss=loss, losses=losses, recon_BD=recon_BD, feats=feats)

    def _auxk_loss(self, aux: SparseFeatureActs, residual_BD: Tensor) -> Tensor:
        residual_hat_BD = sparse_decode(aux.idx_BK, aux.vals_BK, self.W_dec)
        variance = (residual_BD - residual_BD.mean(0)).pow(2).sum(-1).mean()
        loss = (residual_hat_BD - residual_BD).pow(2).sum(-1).mean() / variance.clamp_min(1e-12)
        return torch.nan_to_num(loss, nan=0.0)

    @torch.no_grad()
    def before_optimizer_step_(self) -> None:
        """Project out the gradient component along each decoder row (unit-norm constraint).

        The same projection as :meth:`_remove_parallel_decoder_grad_`, written as
        ``g −= (g·w / ‖w‖²) w``: two reductions and one in-place update over ``[F, D]``, no
        ``[F, D]`` temporaries.
        """
        grad_FD = self.W_dec.grad
        if grad_FD is None:
            return
        W_FD = self.W_dec.detach()
        sq_norm_F = torch.linalg.vector_norm(W_FD, dim=-1).clamp_min(1e-12).square()
        dot_F = torch.linalg.vecdot(grad_FD, W_FD)
        grad_FD.addcmul_(W_FD, (dot_F / sq_norm_F).unsqueeze(-1), value=-1)

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        W_FD = self.W_dec.detach()
        W_FD.div_(torch.linalg.vector_norm(W_FD, dim=-1, keepdim=True).clamp_min(1e-12))


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
