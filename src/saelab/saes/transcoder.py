"""Transcoders: features that read one hook and predict another (METHODS §5).

``z = act(x_in W_enc + b_enc)``, ``ŷ = z W_dec + b_dec`` (``+ x_in W_skipᵀ`` for a skip
transcoder), ``L = ‖y − ŷ‖² + sparsity``, with ``x_in`` the activations at ``cfg.hook`` (e.g.
``blocks.6.ln2.hook_normalized``, the MLP's input) and ``y`` those at ``cfg.output_hook`` (e.g.
``blocks.6.hook_mlp_out``). Input and output spaces differ, so there is no pre-encoder bias and no
``W_enc = W_decᵀ`` init (Gemma Scope App. B); ``W_skip [d_out, d_in]`` starts at zero (Paulo et
al. 2025) and is laid out as SAELens' ``SkipTranscoder`` stores it.

| architecture | features, loss | SAELens class |
| --- | --- | --- |
| ``transcoder`` | ReLU, decoder-norm-weighted L1 (as ``relu``) | ``Transcoder`` |
| ``skip_transcoder`` | the same, plus ``W_skip`` | ``SkipTranscoder`` |
| ``topk_transcoder`` | TopK with AuxK, unit decoder rows (as ``topk``) | none: saelab only |
| ``topk_skip_transcoder`` | the same, plus ``W_skip`` | none: saelab only |

Units: ``x_in`` is trained multiplied by ``activation_scale`` (its hook's scale), ``y`` by
``output_scale`` (the output hook's). Saved weights take and give model units:
``W_enc·s_in``, ``W_dec/s_out``, ``b_dec/s_out``, ``W_skip·s_in/s_out``.

Example::

    cfg = SAEConfig(architecture="topk_transcoder", hook="blocks.3.ln2.hook_normalized",
                    output_hook="blocks.3.hook_mlp_out", k=16)
    tc = TopKTranscoder(cfg, d_in=576, d_out=576)
    y_hat = tc(x_in)        # [..., 576] prediction of hook_mlp_out, model units
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from saelab.config import SAEConfig, require
from saelab.errors import SaelabError
from saelab.saes.base import (
    DenseFeatureActs,
    FeatureActs,
    SparseAutoencoder,
    TrainStepOutput,
    mse_per_token,
)
from saelab.saes.registry import register
from saelab.saes.topk import TopKSAE


class Transcoder(SparseAutoencoder):
    """What every transcoder shares: the output width and scale, the skip term, folding.

    An architecture subclasses this (first) and says how it encodes and what its loss is.
    """

    has_skip: ClassVar[bool] = False
    """Whether the prediction has the linear skip term ``x_in W_skipᵀ``."""
    default_apply_b_dec_to_input = False
    is_transcoder = True

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        require(
            bool(cfg.output_hook),
            f"sae.architecture={cfg.architecture!r} needs sae.output_hook, the hook it "
            "predicts (e.g. --output-hook blocks.6.hook_mlp_out)",
        )
        # b_dec lives in the output space: it cannot be subtracted from, or fitted to, x_in.
        require(
            not cfg.apply_b_dec_to_input,
            "transcoders have no pre-encoder bias; remove sae.apply_b_dec_to_input",
        )
        require(
            cfg.b_dec_init in (None, "zeros"),
            f"transcoders start b_dec at zero; remove sae.b_dec_init = {cfg.b_dec_init!r}",
        )

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        *,
        d_out: int | None = None,
        apply_b_dec_to_input: bool | None = None,
        seed: int | None = None,
    ) -> None:
        if apply_b_dec_to_input or cfg.apply_b_dec_to_input:
            raise SaelabError(
                "apply_b_dec_to_input is not supported for transcoders (b_dec lives in the output "
                "space); set it to false in cfg.json"
            )
        super().__init__(cfg, d_in, d_out=d_out, apply_b_dec_to_input=False, seed=seed)

    def add_parameters_(self) -> None:
        super().add_parameters_()
        # Persistent, unlike activation_scale: it travels in checkpoints through state_dict().
        self.register_buffer("output_scale", torch.tensor(1.0))
        if self.has_skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in))

    @classmethod
    def saved_tensor_shapes(
        cls, d_in: int, d_sae: int, d_out: int | None = None
    ) -> dict[str, tuple[int, ...]]:
        shapes = super().saved_tensor_shapes(d_in, d_sae, d_out)
        if cls.has_skip:
            shapes["W_skip"] = (d_in if d_out is None else d_out, d_in)
        return shapes

    def init_from_data_(self, x_BD: Float[Tensor, "B D"]) -> None:
        """Nothing: ``b_dec`` lives in the output space, so no statistic of ``x_in`` fits it."""

    # ----- prediction ------------------------------------------------------------------------

    def predict_normalised(
        self, x_BD: Float[Tensor, "B D"], feats: FeatureActs
    ) -> Float[Tensor, "B O"]:
        """``ŷ`` in training units from normalised inputs and their features (skip included)."""
        recon_BO = self.decode_feats(feats)
        if self.has_skip:
            recon_BO = recon_BO + F.linear(x_BD, self.W_skip)
        return recon_BO

    def decode(self, feats: Float[Tensor, "... F"]) -> Float[Tensor, "... O"]:
        """The features' part of the prediction, model units; without the skip term, which
        needs the input (SAELens' ``decode`` does the same): use :meth:`forward` for ``ŷ``."""
        lead = feats.shape[:-1]
        recon_BO = feats.reshape(-1, self.d_sae) @ self.W_dec + self.b_dec
        return (recon_BO / self.output_scale).reshape(*lead, self.d_out)

    def forward(self, x: Float[Tensor, "... D"]) -> Float[Tensor, "... O"]:
        """The prediction ``ŷ`` of the output hook from raw input-hook activations, model units."""
        self._check_width(x)
        lead = x.shape[:-1]
        x_BD = x.reshape(-1, self.d_in).to(self.W_enc.dtype) * self.activation_scale
        recon_BO = self.predict_normalised(x_BD, self.encode_normalised(x_BD)) / self.output_scale
        return recon_BO.reshape(*lead, self.d_out).to(x.dtype)

    def _target(self, x_BD: Tensor, target_BD: Tensor | None) -> Float[Tensor, "B O"]:
        if target_BD is None:
            raise SaelabError(
                f"transcoder {self.cfg.architecture} needs target_BD, the activations at its "
                f"output hook {self.cfg.output_hook}; pass training_step(x, target_BD=y)"
            )
        if target_BD.shape != (x_BD.shape[0], self.d_out):
            raise SaelabError(
                f"target activations have shape {tuple(target_BD.shape)} but this transcoder "
                f"predicts [{x_BD.shape[0]}, d_out={self.d_out}] (output hook "
                f"{self.cfg.output_hook}); pass that hook's activations"
            )
        return target_BD

    # ----- units -----------------------------------------------------------------------------

    def folded_state_dict(self) -> dict[str, Tensor]:
        """Model-unit weights: ``z`` of ``s_in·x`` is ``z`` of ``x`` under ``W_enc·s_in``, and
        ``ŷ = (z W_dec + b_dec + s_in·x W_skipᵀ)/s_out``."""
        s_in, s_out = float(self.activation_scale), float(self.output_scale)
        folded = {
            "W_enc": self.W_enc.detach() * s_in,
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": self.W_dec.detach() / s_out,
            "b_dec": self.b_dec.detach() / s_out,
        }
        if self.has_skip:
            folded["W_skip"] = self.W_skip.detach() * (s_in / s_out)
        return folded

    def load_folded_state_dict_(self, tensors: dict[str, Tensor]) -> None:
        super().load_folded_state_dict_(tensors)
        with torch.no_grad():
            if self.has_skip:
                self.W_skip.copy_(tensors["W_skip"])
            self.output_scale.fill_(1.0)


def _random_directions(rows: int, cols: int, norm: float, generator) -> Tensor:
    directions = torch.randn(rows, cols, generator=generator)
    return directions * (norm / directions.norm(dim=-1, keepdim=True))


@register
class ReLUTranscoder(Transcoder):
    """ReLU features and the April-2024 penalty ``λ Σ_i f_i ‖d_i‖``, as :class:`ReLUSAE`.

    Init: encoder columns and decoder rows independent random directions of norm
    ``cfg.decoder_init_norm`` (1 with ``cfg.decoder_unit_norm``, which also keeps decoder rows at
    unit norm), zero biases; a tied init makes no sense across two spaces.
    The step is plain autograd over dense ``[B, F]`` activations.
    """

    architecture = "transcoder"
    saelens_architecture = "transcoder"
    decoder_unit_norm_configurable = True

    def init_weights_(self, generator: torch.Generator | None) -> None:
        norm = 1.0 if self.decoder_unit_norm else self.cfg.decoder_init_norm
        self.W_dec.copy_(_random_directions(self.d_sae, self.d_out, norm, generator))
        self.W_enc.copy_(_random_directions(self.d_sae, self.d_in, norm, generator).T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> DenseFeatureActs:
        return DenseFeatureActs(torch.relu(x_BD @ self.W_enc + self.b_enc))

    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        target_BD: Float[Tensor, "B O"] | None = None,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        y_BO = self._target(x_BD, target_BD)
        feats = self.encode_normalised(x_BD)
        recon_BO = self.predict_normalised(x_BD, feats)
        mse = mse_per_token(recon_BO, y_BO)
        # E_b Σ_i f_bi ‖d_i‖, summed over the batch first: no [B, F] product for the penalty.
        l1 = (feats.acts_BF.sum(0) * self.W_dec.norm(dim=-1)).sum() / x_BD.shape[0]
        loss = mse + self.cfg.l1_coefficient * penalty_scale * l1
        return TrainStepOutput(
            loss=loss,
            losses={"mse": mse.detach(), "l1": l1.detach()},
            recon_BD=recon_BO,
            feats=feats,
        )


@register
class SkipTranscoder(ReLUTranscoder):
    """:class:`ReLUTranscoder` plus ``x_in W_skipᵀ`` (``W_skip`` starts at zero)."""

    architecture = "skip_transcoder"
    saelens_architecture = "skip_transcoder"
    has_skip = True


@register
class TopKTranscoder(Transcoder, TopKSAE):
    """TopK features (the sparse kernels of :class:`TopKSAE`), AuxK on the residual ``y − ŷ``
    with ``k_aux`` defaulting to ``d_out // 2``, decoder rows kept at unit norm.

    Init: encoder uniform in ±1/√d_in, decoder rows independent random unit directions.
    SAELens has no TopK transcoder, so it cannot load this architecture.
    """

    architecture = "topk_transcoder"
    saelens_architecture = "topk_transcoder"

    def init_weights_(self, generator: torch.Generator | None) -> None:
        bound = 1 / math.sqrt(self.d_in)
        self.W_enc.copy_(torch.rand(self.d_in, self.d_sae, generator=generator) * 2 * bound - bound)
        self.W_dec.copy_(_random_directions(self.d_sae, self.d_out, 1.0, generator))
        self.b_enc.zero_()
        self.b_dec.zero_()


@register
class TopKSkipTranscoder(TopKTranscoder):
    """:class:`TopKTranscoder` plus ``x_in W_skipᵀ`` (``W_skip`` starts at zero): the skip
    transcoder of Paulo et al. (sparsify's ``skip_connection``). saelab only."""

    architecture = "topk_skip_transcoder"
    saelens_architecture = "topk_skip_transcoder"
    has_skip = True
