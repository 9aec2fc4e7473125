"""ReLU SAE with the April-2024 recipe: no pre-encoder bias, decoder-norm-weighted L1 penalty.

``f = ReLU(x W_enc + b_enc)``, ``x̂ = f W_dec + b_dec``,
``L = E[‖x − x̂‖² + λ Σ_i f_i ‖d_i‖]``. No unit-norm constraint: the norm-weighted penalty removes
the scale degeneracy between encoder and decoder. Init: decoder rows random directions of norm
0.1, ``W_enc = W_decᵀ``, zero biases.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.saes.base import (
    DenseFeatureActs,
    SparseAutoencoder,
    TrainStepOutput,
    mse_per_token,
)
from saelab.saes.registry import register


@register
class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    saelens_architecture = "standard"
    default_apply_b_dec_to_input = False

    def init_weights_(self, generator: torch.Generator | None) -> None:
        directions_FD = torch.randn(self.d_sae, self.d_in, generator=generator)
        directions_FD /= directions_FD.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(directions_FD * self.cfg.decoder_init_norm)
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> DenseFeatureActs:
        return DenseFeatureActs(torch.relu(self.sae_input(x_BD) @ self.W_enc + self.b_enc))

    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        feats = self.encode_normalised(x_BD)
        acts_BF = feats.acts_BF
        recon_BD = acts_BF @ self.W_dec + self.b_dec
        mse = mse_per_token(recon_BD, x_BD)
        l1 = (acts_BF * self.W_dec.norm(dim=-1)).sum(-1).mean()
        loss = mse + self.cfg.l1_coefficient * penalty_scale * l1
        return TrainStepOutput(
            loss=loss,
            losses={"mse": mse.detach(), "l1": l1.detach()},
            recon_BD=recon_BD,
            feats=feats,
        )
