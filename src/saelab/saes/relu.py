"""ReLU SAE with the April-2024 recipe: no pre-encoder bias, decoder-norm-weighted L1 penalty.

``f = ReLU(x W_enc + b_enc)``, ``x̂ = f W_dec + b_dec``,
``L = E[‖x − x̂‖² + λ Σ_i f_i ‖d_i‖]``. No unit-norm constraint: the norm-weighted penalty removes
the scale degeneracy between encoder and decoder. Init: decoder rows random directions of norm
0.1, ``W_enc = W_decᵀ``, zero biases. Options for the Towards-Monosemanticity recipe:
``sae.decoder_unit_norm`` (rows start and stay at norm 1) and ``sae.apply_b_dec_to_input``
(pre-encoder bias, then started at the geometric median unless ``sae.b_dec_init`` says otherwise).

The training step is one block-by-block autograd function
(:func:`~saelab.saes.kernels.relu_blocks.relu_train_body`) that also counts firings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from saelab.saes.base import (
    DenseFeatureActs,
    SparseAutoencoder,
    TrainStepOutput,
    mse_per_token,
)
from saelab.saes.kernels.relu_blocks import relu_train_body
from saelab.saes.registry import register


@dataclass
class CountedFeatureActs(DenseFeatureActs):
    """Dense activations whose firing counts were taken block by block during the forward."""

    fired_F: Int[Tensor, " F"]
    l0_B: Int[Tensor, " B"]

    def fired_counts(self) -> Int[Tensor, " F"]:
        return self.fired_F

    def l0_per_token(self) -> Int[Tensor, " B"]:
        return self.l0_B


@register
class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    saelens_architecture = "standard"
    default_apply_b_dec_to_input = False
    # Optional Towards-Monosemanticity recipe: unit-norm decoder (the base class's hooks) and a
    # pre-encoder bias that starts at the geometric median (Bricken et al. 2023).
    decoder_unit_norm_configurable = True
    default_b_dec_init = "geometric_median"

    def init_weights_(self, generator: torch.Generator | None) -> None:
        directions_FD = torch.randn(self.d_sae, self.d_in, generator=generator)
        directions_FD /= directions_FD.norm(dim=-1, keepdim=True)
        row_norm = 1.0 if self.decoder_unit_norm else self.cfg.decoder_init_norm
        self.W_dec.copy_(directions_FD * row_norm)
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
        acts_BF, acts_sum_F, recon_BD, fired_F, l0_B = relu_train_body(
            x_BD, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.apply_b_dec_to_input
        )
        mse = mse_per_token(recon_BD, x_BD)
        # E_b Σ_i f_bi ‖d_i‖ summed feature-wise first: no [B, F] product for the penalty.
        l1 = (acts_sum_F * self.W_dec.norm(dim=-1)).sum() / x_BD.shape[0]
        loss = mse + self.cfg.l1_coefficient * penalty_scale * l1
        return TrainStepOutput(
            loss=loss,
            losses={"mse": mse.detach(), "l1": l1.detach()},
            recon_BD=recon_BD,
            feats=CountedFeatureActs(acts_BF, fired_F, l0_B),
        )
