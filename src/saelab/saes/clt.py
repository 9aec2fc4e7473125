"""Cross-layer transcoders (CLT; Ameisen et al. 2025, "Circuit Tracing"): features that read one
layer's MLP input and write to the MLP outputs of that layer and every later covered layer.

For covered layers ``l_0 < … < l_{n−1}`` (``cfg.layers``; local index ``i``) and ``F`` features
per layer::

    a_i   = act(x_i W_enc,i + b_enc,i)                   x_i: MLP input of layer l_i  [B, d]
    ŷ_j   = b_dec,j + Σ_{i ≤ j} a_i W_dec,i→j             ŷ_j: MLP output of layer l_j [B, d]
    L     = Σ_j ‖y_j − ŷ_j‖² (+ λ·Σ_i ‖a_i‖₀ for JumpReLU)

so the loss is summed over the output layers. ``act`` is TopK (``k`` features per layer and
token; ``topk_clt_transcoder``) or JumpReLU with the straight-through L0 penalty
(``jumprelu_clt_transcoder``).

Width: ``cfg.width`` / ``cfg.expansion`` count ALL the CLT's features, ``d_sae = n·F`` (F must
divide evenly); each covered layer reads ``F = d_sae / n`` of them. Decoder memory is the honest
cost: ``Σ_i F·d·(n − i) = F·d·n(n+1)/2`` floats (a per-layer set of the same F has ``n·F·d``),
so 30 layers cost 15.5× the per-layer decoders; ``cfg.layers`` takes a range to keep it small.

Saved tensors (model units): ``W_enc [d, n·F]`` (layer i's columns ``i·F … (i+1)·F``),
``b_enc [n·F]``, ``W_dec_i [F, n − i, d]`` (to layers ``l_i … l_{n−1}``), ``b_dec [n·d]``,
``threshold [n·F]`` (JumpReLU). ``cfg.json``'s ``d_out`` is ``n·d``, the outputs concatenated.
The trainer feeds it every covered layer's input and output hook (:attr:`input_hooks`,
:attr:`output_hooks`), each in its own training units (:meth:`set_hook_scales_`).

Example::

    cfg = SAEConfig(architecture="topk_clt_transcoder", hook="blocks.0.ln2.hook_normalized",
                    output_hook="blocks.0.hook_mlp_out", layers=(0, 1, 2), width=96, k=4)
    clt = TopKCrossLayerTranscoder(cfg, d_in=64)      # 32 features per layer
    y_BO = clt(x_BO)                                  # [B, 3·64]: inputs and outputs concatenated
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saelab.config import SAEConfig, require
from saelab.errors import SaelabError
from saelab.saes.base import (
    DenseFeatureActs,
    FeatureActs,
    SparseFeatureActs,
    TrainStepOutput,
    mse_per_token,
)
from saelab.saes.jumprelu import jumprelu_step
from saelab.saes.kernels.sparse_ops import sparse_decode
from saelab.saes.registry import register
from saelab.saes.transcoder import Transcoder

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class CrossLayerTranscoder(Transcoder):
    """What both CLT architectures share: the block structure, scales, decoding and saving."""

    is_cross_layer: ClassVar[bool] = True

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        require(
            bool(cfg.output_hook),
            f"sae.architecture={cfg.architecture!r} needs sae.output_hook (or sae.layers with the "
            "default MLP hooks)",
        )
        require(
            not cfg.apply_b_dec_to_input,
            "cross-layer transcoders have no pre-encoder bias; remove sae.apply_b_dec_to_input",
        )
        require(
            cfg.b_dec_init in (None, "zeros"),
            f"cross-layer transcoders start b_dec at zero; remove sae.b_dec_init = "
            f"{cfg.b_dec_init!r}",
        )
        for hook in (cfg.hook, cfg.output_hook) if isinstance(cfg.layers, tuple) else ():
            require(
                _BLOCK.match(hook or "") is not None,
                f"a cross-layer transcoder needs hooks with a layer index (blocks.N.<hook>), "
                f"got {hook!r}",
            )

    @classmethod
    def folder_setting(cls, cfg: SAEConfig) -> str:
        return f"k{cfg.k}"

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        *,
        d_out: int | None = None,
        apply_b_dec_to_input: bool | None = None,
        seed: int | None = None,
    ) -> None:
        type(self).check_config(cfg)
        n = len(cfg.layers) if isinstance(cfg.layers, tuple) else 1
        # d_out is one layer's output width (building for training) or all n (loading cfg.json).
        if d_out not in (None, d_in, n * d_in):
            raise SaelabError(
                f"a cross-layer transcoder needs equal input and output widths, got d_in={d_in} "
                f"and d_out={d_out}; use the MLP's input and output hooks"
            )
        self.n_covered = n
        self.d_layer = d_in
        total = cfg.d_sae(d_in)
        if total % n:
            raise SaelabError(
                f"a cross-layer transcoder over {n} layers needs a width divisible by {n} "
                f"(sae.width / sae.expansion count all its features), got {total}"
            )
        self.f_layer = total // n
        super().__init__(cfg, d_in, d_out=n * d_in, seed=seed)

    # ----- layout ------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """The covered layers; without ``cfg.layers`` the one layer of ``cfg.hook`` (or 0)."""
        if isinstance(self.cfg.layers, tuple):
            return list(self.cfg.layers)
        match = _BLOCK.match(self.cfg.hook)
        return [int(match.group(1)) if match else 0]

    @property
    def input_hooks(self) -> list[str]:
        """Every covered layer's input hook, in layer order (the trainer concatenates them)."""
        if not isinstance(self.cfg.layers, tuple):
            return [self.cfg.hook]
        return [_BLOCK.sub(f"blocks.{layer}.", self.cfg.hook) for layer in self.layers]

    @property
    def output_hooks(self) -> list[str]:
        if not isinstance(self.cfg.layers, tuple):
            return [self.cfg.output_hook]
        return [_BLOCK.sub(f"blocks.{layer}.", self.cfg.output_hook) for layer in self.layers]

    def add_parameters_(self) -> None:
        super().add_parameters_()  # output_scale: kept at 1, the per-layer scales are below
        n, d, f = self.n_covered, self.d_layer, self.f_layer
        del self.W_dec  # replaced by one decoder per source layer
        for i in range(n):
            self.register_parameter(f"W_dec_{i}", nn.Parameter(torch.empty(f, n - i, d)))
        self.register_buffer("input_scales", torch.ones(n))
        self.register_buffer("output_scales", torch.ones(n))

    def decoders(self) -> list[Tensor]:
        return [getattr(self, f"W_dec_{i}") for i in range(self.n_covered)]

    @classmethod
    def saved_tensor_shapes(
        cls, d_in: int, d_sae: int, d_out: int | None = None
    ) -> dict[str, tuple[int, ...]]:
        n = (d_out or d_in) // d_in
        f = d_sae // n
        shapes: dict[str, tuple[int, ...]] = {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "b_dec": (n * d_in,),
        }
        for i in range(n):
            shapes[f"W_dec_{i}"] = (f, n - i, d_in)
        return shapes

    def decoder_floats(self) -> int:
        """``Σ_i F·d·(n − i)``: the decoder's size, the CLT's dominant memory cost."""
        return sum(W.numel() for W in self.decoders())

    def init_weights_(self, generator: torch.Generator | None) -> None:
        bound = 1 / math.sqrt(self.d_layer)
        self.W_enc.copy_(
            torch.rand(self.d_layer, self.d_sae, generator=generator) * 2 * bound - bound
        )
        # Each feature's whole decoder (every layer it writes) starts as a random unit vector.
        for W in self.decoders():
            W.copy_(torch.randn(W.shape, generator=generator))
            W.div_(W.flatten(1).norm(dim=-1).clamp_min(1e-12)[:, None, None])
        self.b_enc.zero_()
        self.b_dec.zero_()

    def init_from_data_(self, x_BD: Tensor) -> None:
        """Nothing: ``b_dec`` lives in the output space."""

    def set_hook_scales_(self, scales: dict[str, float]) -> None:
        """Set each covered layer's input and output training scales from the stream's."""
        for i, (h_in, h_out) in enumerate(zip(self.input_hooks, self.output_hooks, strict=True)):
            self.input_scales[i] = float(scales.get(h_in, 1.0))
            self.output_scales[i] = float(scales.get(h_out, 1.0))

    # ----- the model ----------------------------------------------------------------------------

    def _preacts(self, x_BD: Tensor) -> Float[Tensor, "B N F"]:
        """Pre-activations ``[B, n, F]`` of inputs ``[B, n·d]`` (each layer's block)."""
        self._check_width(x_BD)
        x_BND = x_BD.reshape(x_BD.shape[0], self.n_covered, self.d_layer)
        W_DNF = self.W_enc.view(self.d_layer, self.n_covered, self.f_layer)
        pre = torch.einsum("bnd,dnf->bnf", x_BND, W_DNF)
        return pre + self.b_enc.view(self.n_covered, self.f_layer)

    def decode_feats(self, feats: FeatureActs) -> Float[Tensor, "B O"]:
        """``ŷ [B, n·d]`` from features over all layers (``[B, n·F]``), training units."""
        n, d, f = self.n_covered, self.d_layer, self.f_layer
        if isinstance(feats, SparseFeatureActs):
            idx, vals = feats.idx_BK, feats.vals_BK
            rows = idx.shape[0]
            k = idx.shape[1] // n
            idx_BNK = idx.view(rows, n, k) - (torch.arange(n, device=idx.device) * f)[:, None]
            vals_BNK = vals.view(rows, n, k)
        else:
            acts_BNF = feats.to_dense().reshape(-1, n, f)
            rows = acts_BNF.shape[0]
        out = self.b_dec.expand(rows, n * d)
        parts = []
        for i, W in enumerate(self.decoders()):
            W_flat = W.view(f, (n - i) * d)
            if isinstance(feats, SparseFeatureActs):
                y = sparse_decode(idx_BNK[:, i].contiguous(), vals_BNK[:, i].contiguous(), W_flat)
            else:
                y = acts_BNF[:, i] @ W_flat
            # Source i writes output layers i … n−1: pad its contribution in front.
            parts.append(torch.nn.functional.pad(y, (i * d, 0)))
        return out + torch.stack(parts).sum(0)

    def predict_normalised(self, x_BD: Tensor, feats: FeatureActs) -> Tensor:
        return self.decode_feats(feats)

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.n_covered * self.d_layer:
            raise SaelabError(
                f"a cross-layer transcoder over {self.n_covered} layers takes their inputs "
                f"concatenated (width {self.n_covered * self.d_layer}), got width {x.shape[-1]}; "
                "evaluate its replacement set folder (saelab eval SET_DIR)"
            )

    def _scale_in(self, x_BD: Tensor) -> Tensor:
        return (x_BD.view(-1, self.n_covered, self.d_layer) * self.input_scales[:, None]).flatten(1)

    def _unscale_out(self, y_BO: Tensor) -> Tensor:
        return (y_BO.view(-1, self.n_covered, self.d_layer) / self.output_scales[:, None]).flatten(
            1
        )

    def encode(self, x: Float[Tensor, "... O"]) -> Float[Tensor, "... F"]:
        """Dense features ``[..., n·F]`` of raw inputs ``[..., n·d]`` (layers concatenated)."""
        self._check_width(x)
        lead = x.shape[:-1]
        x_BD = self._scale_in(x.reshape(-1, x.shape[-1]).to(self.W_enc.dtype))
        return self.encode_normalised(x_BD).to_dense().reshape(*lead, self.d_sae)

    def decode(self, feats: Float[Tensor, "... F"]) -> Float[Tensor, "... O"]:
        lead = feats.shape[:-1]
        y = self.decode_feats(DenseFeatureActs(feats.reshape(-1, self.d_sae)))
        return self._unscale_out(y).reshape(*lead, self.d_out)

    def forward(self, x: Float[Tensor, "... O"]) -> Float[Tensor, "... O"]:
        """Predicted MLP outputs ``[..., n·d]`` of raw MLP inputs ``[..., n·d]``, model units."""
        self._check_width(x)
        lead = x.shape[:-1]
        x_BD = self._scale_in(x.reshape(-1, x.shape[-1]).to(self.W_enc.dtype))
        y = self._unscale_out(self.predict_normalised(x_BD, self.encode_normalised(x_BD)))
        return y.reshape(*lead, self.d_out).to(x.dtype)

    def _target(self, x_BD: Tensor, target_BD: Tensor | None) -> Tensor:
        if target_BD is None or target_BD.shape != (x_BD.shape[0], self.d_out):
            got = None if target_BD is None else tuple(target_BD.shape)
            raise SaelabError(
                f"a cross-layer transcoder predicts [{x_BD.shape[0]}, {self.d_out}] (every "
                f"covered layer's MLP output, concatenated), got target {got}"
            )
        return target_BD

    # ----- decoder norm ---------------------------------------------------------------------

    @torch.no_grad()
    def before_optimizer_step_(self) -> None:
        """Keep each feature's whole decoder (all the layers it writes) at unit norm: remove the
        gradient parallel to it here, renormalise after the step."""
        for W in self.decoders():
            if W.grad is None:
                continue
            W_flat, g_flat = W.detach().flatten(1), W.grad.flatten(1)
            sq = W_flat.square().sum(-1).clamp_min(1e-12)
            g_flat.sub_(W_flat * ((g_flat * W_flat).sum(-1) / sq)[:, None])

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        for W in self.decoders():
            W.div_(W.detach().flatten(1).norm(dim=-1).clamp_min(1e-12)[:, None, None])

    # ----- units -----------------------------------------------------------------------------

    def model_unit_blocks(self) -> dict[str, Tensor]:
        """Weights per layer in model units: ``W_enc [n, d, F]``, ``b_enc [n, F]``,
        ``W_dec_i [F, n − i, d]``, ``b_dec [n, d]`` (and ``threshold [n, F]``)."""
        folded = self.folded_state_dict()
        n, d, f = self.n_covered, self.d_layer, self.f_layer
        blocks = {
            "W_enc": folded["W_enc"].view(d, n, f).permute(1, 0, 2).contiguous(),
            "b_enc": folded["b_enc"].view(n, f),
            "b_dec": folded["b_dec"].view(n, d),
        }
        for i in range(n):
            blocks[f"W_dec_{i}"] = folded[f"W_dec_{i}"]
        if "threshold" in folded:
            blocks["threshold"] = folded["threshold"].view(n, f)
        return blocks

    def folded_state_dict(self) -> dict[str, Tensor]:
        """Model units: layer i's encoder block times its input scale, each decoder block and
        bias to layer j divided by j's output scale (features unchanged)."""
        n, d, f = self.n_covered, self.d_layer, self.f_layer
        s_in = self.input_scales.detach()
        s_out = self.output_scales.detach()
        W_enc = self.W_enc.detach().view(d, n, f) * s_in[None, :, None]
        folded = {
            "W_enc": W_enc.reshape(d, n * f).clone(),
            "b_enc": self.b_enc.detach().clone(),
            "b_dec": (self.b_dec.detach().view(n, d) / s_out[:, None]).reshape(n * d),
        }
        for i, W in enumerate(self.decoders()):
            folded[f"W_dec_{i}"] = W.detach() / s_out[i:][None, :, None]
        return folded

    def load_folded_state_dict_(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.output_scale.fill_(1.0)
            self.W_enc.copy_(tensors["W_enc"])
            self.b_enc.copy_(tensors["b_enc"])
            self.b_dec.copy_(tensors["b_dec"])
            for i, W in enumerate(self.decoders()):
                W.copy_(tensors[f"W_dec_{i}"])
            self.input_scales.fill_(1.0)
            self.output_scales.fill_(1.0)
            self.activation_scale.fill_(1.0)


@register
class TopKCrossLayerTranscoder(CrossLayerTranscoder):
    """TopK at every covered layer: each token keeps the ``k`` largest pre-activations of each
    layer's ``F`` features (so ``n·k`` in all); no auxiliary loss."""

    architecture = "topk_clt_transcoder"
    saelens_architecture = "topk_clt_transcoder"

    def encode_normalised(self, x_BD: Tensor) -> SparseFeatureActs:
        pre_BNF = self._preacts(x_BD)
        k = min(self.cfg.k, self.f_layer)
        top_BNK, idx_BNK = pre_BNF.topk(k, dim=-1)
        offsets = (torch.arange(self.n_covered, device=x_BD.device) * self.f_layer)[:, None]
        idx_BK = (idx_BNK + offsets).flatten(1)
        return SparseFeatureActs(idx_BK=idx_BK, vals_BK=top_BNK.relu().flatten(1), d_sae=self.d_sae)

    def training_step(
        self,
        x_BD: Tensor,
        *,
        target_BD: Tensor | None = None,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        y_BO = self._target(x_BD, target_BD)
        feats = self.encode_normalised(x_BD)
        recon_BO = self.decode_feats(feats)
        mse = mse_per_token(recon_BO, y_BO)  # Σ over output layers of each one's squared error
        losses = {"mse": mse.detach()}
        return TrainStepOutput(loss=mse, losses=losses, recon_BD=recon_BO, feats=feats)


@register
class JumpReLUCrossLayerTranscoder(CrossLayerTranscoder):
    """JumpReLU at every covered layer with the L0 penalty ``λ Σ_i ‖a_i‖₀`` and the
    straight-through estimators of :mod:`saelab.saes.jumprelu` (``l1_coefficient`` is λ)."""

    architecture = "jumprelu_clt_transcoder"
    saelens_architecture = "jumprelu_clt_transcoder"

    @classmethod
    def folder_setting(cls, cfg: SAEConfig) -> str:
        return f"l0_{cfg.l1_coefficient:g}"

    def add_parameters_(self) -> None:
        super().add_parameters_()
        self.threshold = nn.Parameter(torch.zeros(self.d_sae))

    @classmethod
    def saved_tensor_shapes(cls, d_in, d_sae, d_out=None):
        return {**super().saved_tensor_shapes(d_in, d_sae, d_out), "threshold": (d_sae,)}

    def init_weights_(self, generator: torch.Generator | None) -> None:
        super().init_weights_(generator)
        self.threshold.fill_(self.cfg.jumprelu_init_threshold_for(self.d_layer))

    def lr_scales(self) -> dict[str, float]:
        return {"threshold": self.cfg.jumprelu_threshold_lr_scale_for(self.d_layer)}

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        super().after_optimizer_step_()
        self.threshold.clamp_(min=0)

    def encode_normalised(self, x_BD: Tensor) -> DenseFeatureActs:
        pre_BF = self._preacts(x_BD).flatten(1)
        return DenseFeatureActs(pre_BF * (pre_BF > self.threshold))

    def training_step(
        self,
        x_BD: Tensor,
        *,
        target_BD: Tensor | None = None,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        y_BO = self._target(x_BD, target_BD)
        return jumprelu_step(
            self._preacts(x_BD).flatten(1),
            self.threshold,
            self.cfg.jumprelu_bandwidth_for(self.d_layer),
            lambda acts_BF: self.decode_feats(DenseFeatureActs(acts_BF)),
            y_BO,
            self.cfg.l1_coefficient * penalty_scale,
        )

    def folded_state_dict(self) -> dict[str, Tensor]:
        return {**super().folded_state_dict(), "threshold": self.threshold.detach().clone()}

    def load_folded_state_dict_(self, tensors: dict[str, Tensor]) -> None:
        super().load_folded_state_dict_(tensors)
        with torch.no_grad():
            self.threshold.copy_(tensors["threshold"])
