"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, arXiv 2503.17547).

Features are chosen once, by BatchTopK over the whole dictionary; then each nested prefix
``[0, m_j)`` of the dictionary (``matryoshka_widths``, the last being d_sae) must reconstruct the
input alone: ``x̂_j = z[:, :m_j] W_dec[:m_j] + b_dec`` and
``L = mean_j ‖x − x̂_j‖² + α·L_aux`` (METHODS §5; SAELens sums the terms instead, and the
authors' code also averages in the ``b_dec``-only term). Early features so learn the general
directions and later ones refine them instead of absorbing them. Inference and saving are
BatchTopK's: a JumpReLU with one threshold, saved as a SAELens "jumprelu" SAE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseFeatureActs, mse_per_token
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.kernels.sparse_ops import sparse_decode
from saelab.saes.registry import register


@register
class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"

    def __init__(self, cfg: SAEConfig, d_in: int, **kwargs) -> None:
        super().__init__(cfg, d_in, **kwargs)
        self.prefix_widths = cfg.matryoshka_widths_for(self.d_sae)
        """Ends ``m_1 < … < m_K = d_sae`` of the nested prefixes."""
        if self.prefix_widths[-1] != self.d_sae:
            raise SaelabError(
                f"sae.matryoshka_widths must end at d_sae={self.d_sae} (the SAE's width), got "
                f"{list(self.prefix_widths)}"
            )

    def reconstruction_loss(
        self, x_BD: Tensor, feats: SparseFeatureActs
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        # Decode one group of features at a time; each partial sum is a prefix reconstruction.
        recon_BD = self.b_dec.expand_as(x_BD)
        prefix_mses, start = [], 0
        for end in self.prefix_widths:
            in_group_BK = (feats.idx_BK >= start) & (feats.idx_BK < end)
            vals_BK = feats.vals_BK * in_group_BK.to(feats.vals_BK.dtype)
            recon_BD = recon_BD + sparse_decode(feats.idx_BK, vals_BK, self.W_dec)
            prefix_mses.append(mse_per_token(recon_BD, x_BD))
            start = end
        loss = torch.stack(prefix_mses).mean()
        # The last prefix is the whole dictionary: its MSE is the SAE's reconstruction error.
        return recon_BD, loss, {"mse": prefix_mses[-1].detach(), "matryoshka_mse": loss.detach()}
