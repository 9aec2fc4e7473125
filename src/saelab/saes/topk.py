"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead features.

``z = ReLU(TopK_k((x − b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec``,
``L = ‖x − x̂‖² + α·L_aux``. AuxK models the residual ``e = x − x̂`` with the top-``k_aux``
pre-activations among dead features only: ``L_aux = ‖e − ê‖² / ‖e − mean(e)‖²``.
Decoder rows stay unit norm (gradient projection + renormalisation); ``b_dec`` starts at the
geometric median of the first batch.

Only the encoder GEMM is dense: the decoder and every backward use the K chosen features
(:mod:`saelab.saes.kernels.sparse_ops`).

Opt-in, off by default: ``sae.bf16_encoder = True`` ranks features with a bfloat16 GEMM (about
twice as fast on CPUs with AVX-512 BF16), keeps 1.5·K candidates per token and recomputes their
pre-activations in float32 to pick the final K. The values are exact; the chosen set can differ
from float32 ranking when a feature just inside the top K ranks below 1.5·K in bf16.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.config import SAEConfig
from saelab.saes.base import (
    SparseAutoencoder,
    SparseFeatureActs,
    TrainStepOutput,
    geometric_median,  # noqa: F401  (re-exported: it lived here before moving to base)
    mse_per_token,
)
from saelab.saes.kernels.sparse_ops import (
    dense_mm,
    gather_preacts,
    sampled_dots,
    sparse_decode,
    topk_rows,
    transposed_copy,
)
from saelab.saes.registry import register

_BLOCK_ELEMENTS = 1 << 21
"""Pre-activations are ranked per block of about this many (8 MB in float32), while in cache."""
_GPU_BLOCK_ELEMENTS = 1 << 28
"""On a GPU cache blocking buys nothing and small blocks starve the device: one block of up to
1 GiB (float32), so only very large batches × widths are split."""
_MIN_BLOCK_ROWS = 64


@register
class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    saelens_architecture = "topk"
    default_apply_b_dec_to_input = True
    default_decoder_unit_norm = True
    default_b_dec_init = "geometric_median"
    bf16_encoder: bool = False
    """Rank features with a bfloat16 encoder GEMM (see the module docstring); off by default."""

    @classmethod
    def folder_setting(cls, cfg: SAEConfig) -> str:
        return f"k{cfg.k}"

    def init_weights_(self, generator: torch.Generator | None) -> None:
        bound = 1 / math.sqrt(self.d_in)
        W_enc_DF = torch.rand(self.d_in, self.d_sae, generator=generator) * 2 * bound - bound
        # Tied init (decoder = encoderᵀ, unit rows), then trained untied.
        self.W_dec.copy_(W_enc_DF.T / W_enc_DF.T.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

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
            exact = not (self.bf16_encoder and sae_in_BD.dtype == torch.float32)
            in_BD, W_enc_DF, b_enc_F, k_rank = sae_in_BD, self.W_enc, self.b_enc, k
            if not exact:
                # Rank by a bf16 GEMM with spare candidates, then re-rank those in float32.
                in_BD, W_enc_DF, b_enc_F = in_BD.bfloat16(), W_enc_DF.bfloat16(), b_enc_F.bfloat16()
                k_rank = min(k + (k + 1) // 2, self.d_sae)
            block = _BLOCK_ELEMENTS if in_BD.device.type == "cpu" else _GPU_BLOCK_ELEMENTS
            rows = max(_MIN_BLOCK_ROWS, block // self.d_sae)
            tops, idxs, aux_tops, aux_idxs = [], [], [], []
            for start in range(0, max(in_BD.shape[0], 1), rows):  # one (empty) block if B = 0
                pre_bF = dense_mm(in_BD[start : start + rows], W_enc_DF, b_enc_F)
                top_bK, idx_bK = topk_rows(pre_bF, k_rank)
                tops.append(top_bK)
                idxs.append(idx_bK)
                if dead_idx is not None:
                    # Only dead columns compete; dead_idx maps their ranks back to features.
                    aux_top_bA, aux_pos_bA = pre_bF.index_select(1, dead_idx).topk(
                        k_aux, dim=-1, sorted=False
                    )
                    aux_tops.append(aux_top_bA)
                    aux_idxs.append(dead_idx[aux_pos_bA])
            top_BK, idx_BK = torch.cat(tops), torch.cat(idxs)
            aux_top_BA = torch.cat(aux_tops) if aux_tops else None
            aux_idx_BA = torch.cat(aux_idxs) if aux_idxs else None
            if not exact:
                W_enc_FD = transposed_copy(self.W_enc)
                pre_BC = sampled_dots(idx_BK, sae_in_BD, W_enc_FD) + self.b_enc[idx_BK]
                top_BK, pos_BK = pre_BC.topk(k, dim=-1, sorted=False)
                idx_BK = idx_BK.gather(-1, pos_BK)
                if aux_idx_BA is not None:
                    aux_top_BA = sampled_dots(aux_idx_BA, sae_in_BD, W_enc_FD)
                    aux_top_BA += self.b_enc[aux_idx_BA]
            return top_BK, idx_BK, aux_top_BA, aux_idx_BA

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
        target_BD: Float[Tensor, "B O"] | None = None,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        # A transcoder subclass predicts its output hook (y ≠ x, width d_out); this step is its.
        y_BO = self._target(x_BD, target_BD)
        use_aux = dead_F is not None and self.cfg.aux_coefficient > 0 and bool(dead_F.any())
        dead_idx = k_aux = None
        if use_aux:
            dead_idx = dead_F.nonzero().squeeze(-1)
            k_aux = min(self.cfg.k_aux_for(self.d_out), dead_idx.numel())
        top_BK, idx_BK, aux_top_BA, aux_idx_BA = self._rank(
            x_BD, min(self.cfg.k, self.d_sae), dead_idx, k_aux or 0
        )
        feats = self._feats(x_BD, idx_BK, top_BK)
        recon_BO = self.predict_normalised(x_BD, feats)
        mse = mse_per_token(recon_BO, y_BO)
        losses = {"mse": mse.detach()}
        loss = mse
        if use_aux:
            aux = self._feats(x_BD, aux_idx_BA, aux_top_BA)
            auxk = self._auxk_loss(aux, (y_BO - recon_BO).detach())
            losses["auxk"] = auxk.detach()
            loss = loss + self.cfg.aux_coefficient * auxk
        return TrainStepOutput(loss=loss, losses=losses, recon_BD=recon_BO, feats=feats)

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
        ``[F, D]`` temporaries (a fresh 20 MB buffer costs more in page faults than the maths).
        """
        grad_FD = self.W_dec.grad
        if grad_FD is None:
            return
        W_FD = self.W_dec.detach()
        sq_norm_F = torch.linalg.vector_norm(W_FD, dim=-1).clamp_min(1e-12).square()
        dot_F = _row_dots(grad_FD, W_FD)
        grad_FD.addcmul_(W_FD, (dot_F / sq_norm_F).unsqueeze(-1), value=-1)

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        W_FD = self.W_dec.detach()
        W_FD.div_(torch.linalg.vector_norm(W_FD, dim=-1, keepdim=True).clamp_min(1e-12))


def _row_dots(a_FD: Tensor, b_FD: Tensor, rows: int = 1024) -> Tensor:
    """``(a * b).sum(-1)`` a block of rows at a time, so the product is never a full temporary."""
    out_F = a_FD.new_empty(a_FD.shape[0])
    for start in range(0, a_FD.shape[0], rows):
        block = slice(start, start + rows)
        torch.linalg.vecdot(a_FD[block], b_FD[block], out=out_F[block])
    return out_F
