"""JumpReLU SAE (Rajamanoharan et al. 2024; the Gemma Scope recipe, Lieberum et al. 2024).

``f = JumpReLU_θ(x W_enc + b_enc)`` with ``JumpReLU_θ(z) = z · H(z − θ)``, ``x̂ = f W_dec + b_dec``,
``L = ‖x − x̂‖² + λ‖f‖₀`` (λ is ``l1_coefficient``). The step H has no useful derivative, so θ
learns through straight-through estimators with the rectangle kernel ``K(u) = 1[−½ < u < ½]``
of bandwidth ε (METHODS §4.2)::

    ∂/∂θ JumpReLU_θ(z) := −(θ/ε) K((z − θ)/ε)      ∂/∂z JumpReLU_θ(z) = H(z − θ)
    ∂/∂θ H(z − θ)      := −(1/ε) K((z − θ)/ε)      ∂/∂z H(z − θ)      = 0

so the L0 term trains θ only, never the encoder. θ is the trained parameter ``threshold``
itself, kept ≥ 0 by a projection after each update, and saved as ``threshold [d_sae]`` (SAELens
"jumprelu"). It is not log θ (the paper's Appendix J choice): Adam moves a parameter by about
its learning rate per step, so log θ changes θ by at most ~10 % in 100 steps at lr 1e-3 and a
short run never leaves the small initial θ (L0 stayed in the hundreds whatever λ; SAELens PR #718
and dictionary_learning train θ directly for the same reason). θ, ε and the initial θ are in
activation units, √d_in larger in saelab's units than in Gemma Scope's, so ε and θ_init are
scaled by √d_in (``SAEConfig.jumprelu_bandwidth``) and θ learns at a multiple of the run's rate
(``SAEConfig.jumprelu_threshold_lr_scale``). No pre-encoder bias by default; decoder rows stay
unit norm by default (gradient projection and renormalising, by the base class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saelab.config import SAEConfig
from saelab.saes.base import DenseFeatureActs, SparseAutoencoder, TrainStepOutput, mse_per_token
from saelab.saes.kernels.sparse_ops import fp32_backward, fp32_forward
from saelab.saes.registry import register


def rectangle(u: Tensor) -> Tensor:
    """The kernel ``K(u) = 1[−½ < u < ½]`` in ``u``'s dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def threshold_acts(
    pre_BF: Float[Tensor, "B F"], threshold_F: Float[Tensor, "*F"]
) -> Float[Tensor, "B F"]:
    """JumpReLU at inference: ``z · 1[z > θ]`` (for θ ≥ 0 this equals SAELens'
    ``ReLU(z) · 1[z > θ]``). No straight-through gradient to θ."""
    return pre_BF * (pre_BF > threshold_F.to(pre_BF.dtype))


def _threshold_grad(ctx: Any, grad_BF: Tensor, numerator: Tensor | float) -> Tensor:
    """``Σ_batch −(numerator/ε) K((z − θ)/ε) · grad`` over every leading dimension."""
    pre_BF, threshold_F = ctx.saved_tensors
    kernel_BF = rectangle((pre_BF - threshold_F) / ctx.bandwidth)
    return -(numerator / ctx.bandwidth) * (kernel_BF * grad_BF).reshape(-1, pre_BF.shape[-1]).sum(0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    @fp32_forward
    def forward(ctx, pre_BF, threshold_F, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > threshold_F)

    @staticmethod
    @fp32_backward
    def backward(ctx, grad_BF):  # type: ignore[override]
        pre_BF, threshold_F = ctx.saved_tensors
        need_pre, need_threshold, _ = ctx.needs_input_grad
        grad_pre = grad_BF * (pre_BF > threshold_F) if need_pre else None
        grad_threshold = _threshold_grad(ctx, grad_BF, threshold_F) if need_threshold else None
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    @fp32_forward
    def forward(ctx, pre_BF, threshold_F, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    @fp32_backward
    def backward(ctx, grad_BF):  # type: ignore[override]
        # No estimator for z: the sparsity penalty moves thresholds, not pre-activations.
        grad_threshold = _threshold_grad(ctx, grad_BF, 1.0) if ctx.needs_input_grad[1] else None
        return None, grad_threshold, None


def jumprelu(
    pre_BF: Float[Tensor, "B F"], threshold_F: Float[Tensor, " F"], bandwidth: float
) -> Float[Tensor, "B F"]:
    """``z · H(z − θ)``, differentiable in z (exactly) and θ (straight-through, bandwidth ε)."""
    return _JumpReLU.apply(pre_BF, threshold_F, bandwidth)


def heaviside_step(
    pre_BF: Float[Tensor, "B F"], threshold_F: Float[Tensor, " F"], bandwidth: float
) -> Float[Tensor, "B F"]:
    """``H(z − θ)``, differentiable in θ only (straight-through, bandwidth ε)."""
    return _Step.apply(pre_BF, threshold_F, bandwidth)


def jumprelu_step(
    pre_BF: Float[Tensor, "B F"],
    threshold_F: Float[Tensor, " F"],
    bandwidth: float,
    decode: Callable[[Tensor], Tensor],
    target_BO: Float[Tensor, "B O"],
    l0_coefficient: float,
) -> TrainStepOutput:
    """One JumpReLU training step from pre-activations: features ``a = jumprelu(z, θ)``, the
    reconstruction ``decode(a)`` and the objective ``MSE + λ · E‖H(z − θ)‖₀`` (λ with its
    penalty scale already applied)."""
    acts_BF = jumprelu(pre_BF, threshold_F, bandwidth)
    recon_BO = decode(acts_BF)
    mse = mse_per_token(recon_BO, target_BO)
    l0 = heaviside_step(pre_BF, threshold_F, bandwidth).sum(-1).mean()
    loss = mse + l0_coefficient * l0
    return TrainStepOutput(
        loss=loss,
        losses={"mse": mse.detach(), "l0": l0.detach()},
        recon_BD=recon_BO,
        feats=DenseFeatureActs(acts_BF.detach()),
    )


@register
class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    default_apply_b_dec_to_input = False
    default_decoder_unit_norm = True
    decoder_unit_norm_configurable = True

    @classmethod
    def folder_setting(cls, cfg: SAEConfig) -> str:
        return f"l0_{cfg.l1_coefficient:g}"  # its λ weighs an L0 penalty

    def add_parameters_(self) -> None:
        # θ per feature in training units (features are the same in model units).
        self.threshold = nn.Parameter(torch.zeros(self.d_sae))

    @classmethod
    def saved_tensor_shapes(
        cls, d_in: int, d_sae: int, d_out: int | None = None
    ) -> dict[str, tuple[int, ...]]:
        return {**super().saved_tensor_shapes(d_in, d_sae, d_out), "threshold": (d_sae,)}

    @property
    def bandwidth(self) -> float:
        return self.cfg.jumprelu_bandwidth_for(self.d_in)

    def lr_scales(self) -> dict[str, float]:
        return {"threshold": self.cfg.jumprelu_threshold_lr_scale_for(self.d_in)}

    def after_optimizer_step_(self) -> None:
        super().after_optimizer_step_()
        # A projection, not a clamp in the graph: a clamp would zero θ's gradient at 0 for good.
        with torch.no_grad():
            self.threshold.clamp_(min=0)

    def init_weights_(self, generator: torch.Generator | None) -> None:
        # Gemma Scope: He-uniform decoder rescaled to unit rows, W_enc = W_decᵀ, zero biases.
        W_dec_FD = torch.rand(self.d_sae, self.d_in, generator=generator) * 2 - 1
        self.W_dec.copy_(W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(self.cfg.jumprelu_init_threshold_for(self.d_in))

    def _preacts(self, x_BD: Tensor) -> Tensor:
        return self.sae_input(x_BD) @ self.W_enc + self.b_enc

    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> DenseFeatureActs:
        return DenseFeatureActs(threshold_acts(self._preacts(x_BD), self.threshold))

    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        return jumprelu_step(
            self._preacts(x_BD),
            self.threshold,
            self.bandwidth,
            lambda acts_BF: acts_BF @ self.W_dec + self.b_dec,
            x_BD,
            self.cfg.l1_coefficient * penalty_scale,
        )

    def folded_state_dict(self) -> dict[str, Tensor]:
        # θ is in feature units, and folding the activation scale leaves features unchanged.
        return {**super().folded_state_dict(), "threshold": self.threshold.detach().clone()}

    def load_folded_state_dict_(self, tensors: dict[str, Tensor]) -> None:
        super().load_folded_state_dict_(tensors)
        with torch.no_grad():
            # SAELens may save θ < 0, which with its ReLU acts as θ = 0.
            self.threshold.copy_(tensors["threshold"].clamp_min(0))
