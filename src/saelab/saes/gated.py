"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014): a gate chooses which features fire,
a magnitude path how strongly; both share one encoder matrix (METHODS §2).

``x̃ = x − b_dec``, ``π_gate = x̃ W_enc + b_gate``, ``π_mag = x̃ (W_enc ⊙ exp(r_mag)) + b_mag``,
``f̃ = 1[π_gate > 0] ⊙ ReLU(π_mag)``, ``x̂ = f̃ W_dec + b_dec``. The gate is therefore a JumpReLU
of ``π_mag`` with threshold ``θ = b_mag − exp(r_mag) ⊙ b_gate`` (App. E).

``L = ‖x − x̂(f̃)‖² + λ·P + ‖x − x̂'(ReLU(π_gate))‖²``. The last, auxiliary term gives the gate a
gradient (the Heaviside has none). ``gated_penalty`` picks the recipe:

* ``paper``: ``P = ‖ReLU(π_gate)‖₁``; ``x̂'`` uses a frozen (detached) ``W_dec, b_dec`` so the L1
  shrinkage stays out of the decoder; decoder rows unit norm (gradient projection).
* ``april``: ``P = Σ_i ReLU(π_gate)_i ‖d_i‖``, no norm constraint, and ``x̂'`` uses the live
  decoder, as SAELens does (freezing the decoder in one term but not the other is worse).

Saved as SAELens "gated": ``W_enc, b_gate, r_mag, b_mag, W_dec, b_dec`` (no ``b_enc``).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes.base import DenseFeatureActs, SparseAutoencoder, TrainStepOutput, mse_per_token
from saelab.saes.registry import register

_GATED_TENSORS = ("b_gate", "r_mag", "b_mag")


@register
class GatedSAE(SparseAutoencoder):
    architecture = "gated"
    saelens_architecture = "gated"
    default_apply_b_dec_to_input = True

    @classmethod
    def folder_setting(cls, cfg: SAEConfig) -> str:
        setting = super().folder_setting(cfg)
        return setting if cfg.gated_penalty == "paper" else f"{setting}-{cfg.gated_penalty}"

    def add_parameters_(self) -> None:
        self.b_enc = None  # the gate and the magnitude path have their own biases
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    @classmethod
    def saved_tensor_shapes(
        cls, d_in: int, d_sae: int, d_out: int | None = None
    ) -> dict[str, tuple[int, ...]]:
        shapes = super().saved_tensor_shapes(d_in, d_sae, d_out)
        del shapes["b_enc"]
        return {**shapes, **{name: (d_sae,) for name in _GATED_TENSORS}}

    def _resolve_decoder_unit_norm(self, cfg: SAEConfig) -> bool:
        # The penalty decides: the plain L1 needs unit rows, the norm-weighted one none.
        unit = cfg.gated_penalty == "paper"
        if cfg.decoder_unit_norm is not None and cfg.decoder_unit_norm != unit:
            raise SaelabError(
                f"sae.gated_penalty={cfg.gated_penalty!r} fixes the decoder norm; remove "
                f"sae.decoder_unit_norm or choose the other gated_penalty"
            )
        return unit

    def init_weights_(self, generator: torch.Generator | None) -> None:
        # METHODS §2.1: random unit-norm decoder, W_enc = W_decᵀ, r_mag = b_* = b_dec = 0.
        directions_FD = torch.randn(self.d_sae, self.d_in, generator=generator)
        self.W_dec.copy_(directions_FD / directions_FD.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_dec.zero_()
        for name in _GATED_TENSORS:
            getattr(self, name).zero_()

    def _paths(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag); one encoder product serves both."""
        pre_BF = self.sae_input(x_BD) @ self.W_enc
        return pre_BF + self.b_gate, pre_BF * self.r_mag.exp() + self.b_mag

    @staticmethod
    def _combine(gate_BF: Tensor, mag_BF: Tensor) -> Tensor:
        return (gate_BF > 0).to(mag_BF.dtype) * torch.relu(mag_BF)

    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> DenseFeatureActs:
        return DenseFeatureActs(self._combine(*self._paths(x_BD)))

    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        gate_BF, mag_BF = self._paths(x_BD)
        acts_BF = self._combine(gate_BF, mag_BF)
        recon_BD = acts_BF @ self.W_dec + self.b_dec
        mse = mse_per_token(recon_BD, x_BD)
        gate_acts_BF = torch.relu(gate_BF)
        if self.cfg.gated_penalty == "paper":
            l1 = gate_acts_BF.sum(-1).mean()
            W_dec_FD, b_dec_D = self.W_dec.detach(), self.b_dec.detach()
        else:
            # Σ_b first: a [F] vector times the norms, no second [B, F] product.
            l1 = (gate_acts_BF.sum(0) * self.W_dec.norm(dim=-1)).sum() / x_BD.shape[0]
            W_dec_FD, b_dec_D = self.W_dec, self.b_dec
        aux = mse_per_token(gate_acts_BF @ W_dec_FD + b_dec_D, x_BD)
        loss = mse + self.cfg.l1_coefficient * penalty_scale * l1 + aux
        return TrainStepOutput(
            loss=loss,
            losses={"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach()},
            recon_BD=recon_BD,
            feats=DenseFeatureActs(acts_BF.detach()),
        )

    def folded_state_dict(self) -> dict[str, Tensor]:
        # Both paths see (s·x − b_dec) W_enc, which the base fold rewrites exactly; the gate and
        # magnitude biases and r_mag act on features and stay as they are.
        folded = super().folded_state_dict()
        return {**folded, **{name: getattr(self, name).detach().clone() for name in _GATED_TENSORS}}

    def load_folded_state_dict_(self, tensors: dict[str, Tensor]) -> None:
        super().load_folded_state_dict_(tensors)
        with torch.no_grad():
            for name in _GATED_TENSORS:
                getattr(self, name).copy_(tensors[name])
