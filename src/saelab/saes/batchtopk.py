"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv 2412.06410; METHODS §4.1).

Training: ``A = ReLU((x − b_dec) W_enc + b_enc)`` and only the ``B·k`` largest entries of the
whole batch are kept, so L0 is k on average while a token may use more or fewer features.
``L = ‖x − x̂‖² + α·L_aux`` with TopK's AuxK on dead features. As for TopK, decoder rows stay
unit norm and ``b_dec`` starts at the geometric median of the first batch (both by the base
class's hooks, configurable).

Inference must not depend on which other tokens share the batch, so :meth:`encode_normalised`
is always a JumpReLU with one threshold θ: an exponential moving average (rate
``threshold_ema_lr``, bias-corrected) of the smallest value kept in each training batch. Saved
files are SAELens "jumprelu" SAEs with ``threshold [d_sae]`` filled with θ; saelab's
``cfg.json`` section keeps the architecture ``batchtopk``.

The kept entries of each row become (index, value) pairs padded to the row with the most (padding
has value 0 and indices distinct from the row's kept ones), so the sparse TopK kernels decode and
differentiate them.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes.base import (
    DenseFeatureActs,
    SparseAutoencoder,
    SparseFeatureActs,
    TrainStepOutput,
    mse_per_token,
)
from saelab.saes.jumprelu import threshold_acts
from saelab.saes.kernels.sparse_ops import dense_mm, gather_preacts, sparse_decode
from saelab.saes.registry import register


@register
class BatchTopKSAE(SparseAutoencoder):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    default_apply_b_dec_to_input = True
    default_decoder_unit_norm = True
    decoder_unit_norm_configurable = True
    default_b_dec_init = "geometric_median"

    @classmethod
    def folder_setting(cls, cfg: SAEConfig) -> str:
        return f"k{cfg.k}"

    def add_parameters_(self) -> None:
        # float64 as in SAELens: the EMA's small steps would round away in lower precision.
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        # Updates folded into θ so far (for the bias correction); checkpointed with θ. A loaded
        # SAE starts again at 0, so further training restarts the average.
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # `.float()`/`.to(bfloat16)` cast every floating buffer; keep θ's EMA in float64.
        out = super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float64:
            self.threshold = self.threshold.double()
        return out

    @classmethod
    def saved_tensor_shapes(
        cls, d_in: int, d_sae: int, d_out: int | None = None
    ) -> dict[str, tuple[int, ...]]:
        return {**super().saved_tensor_shapes(d_in, d_sae, d_out), "threshold": (d_sae,)}

    def init_weights_(self, generator: torch.Generator | None) -> None:
        # As TopK: tied init (decoder = encoderᵀ with unit rows), trained untied.
        bound = self.d_in**-0.5
        W_enc_DF = (torch.rand(self.d_in, self.d_sae, generator=generator) * 2 - 1) * bound
        self.W_dec.copy_(W_enc_DF.T / W_enc_DF.T.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.zero_()
        self.threshold_updates.zero_()

    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> DenseFeatureActs:
        pre_BF = self.sae_input(x_BD) @ self.W_enc + self.b_enc
        return DenseFeatureActs(threshold_acts(pre_BF, self.threshold))

    # ----- training ---------------------------------------------------------------------------

    def _select(
        self, x_BD: Tensor, dead_F: Tensor | None
    ) -> tuple[SparseFeatureActs, SparseFeatureActs | None]:
        """The batch's top ``B·k`` features as padded (index, value) rows, and, given dead
        features, each token's top ``k_aux`` among them (for AuxK)."""
        with torch.no_grad():
            pre_BF = dense_mm(self.sae_input(x_BD), self.W_enc, self.b_enc)
            n_keep = min(self.cfg.k * pre_BF.shape[0], pre_BF.numel())
            _, flat_N = pre_BF.reshape(-1).topk(n_keep, sorted=False)
            keep_BF = torch.zeros_like(pre_BF, dtype=torch.bool)
            keep_BF.view(-1)[flat_N] = True
            keep_BF &= pre_BF > 0  # the ReLU: a kept non-positive entry is a zero
            width = max(int(keep_BF.sum(-1).max()), 1)
            # Per row, the kept entries rank first; the rest of the row pads with other features.
            _, idx_BK = pre_BF.masked_fill(~keep_BF, float("-inf")).topk(width, dim=-1)
            kept_BK = keep_BF.gather(1, idx_BK)
            pre_BK = pre_BF.gather(1, idx_BK)
            aux = None
            if dead_F is not None and self.cfg.aux_coefficient > 0 and bool(dead_F.any()):
                dead_idx = dead_F.nonzero().squeeze(-1)
                k_aux = min(self.cfg.k_aux_for(self.d_in), dead_idx.numel())
                aux_pre_BA, aux_pos_BA = pre_BF.index_select(1, dead_idx).topk(k_aux, dim=-1)
                aux = (dead_idx[aux_pos_BA], aux_pre_BA)
        feats = self._gather(x_BD, idx_BK, pre_BK, kept_BK)
        aux_feats = None if aux is None else self._gather(x_BD, *aux, None)
        return feats, aux_feats

    def _gather(
        self, x_BD: Tensor, idx_BK: Tensor, pre_BK: Tensor, kept_BK: Tensor | None
    ) -> SparseFeatureActs:
        """Differentiable values of the chosen pre-activations, ReLU'd (and masked)."""
        b_dec_D = self.b_dec if self.apply_b_dec_to_input else None
        vals_BK = gather_preacts(x_BD, self.W_enc, self.b_enc, idx_BK, pre_BK, b_dec_D=b_dec_D)
        vals_BK = vals_BK.relu() if kept_BK is None else vals_BK * kept_BK.to(vals_BK.dtype)
        return SparseFeatureActs(idx_BK=idx_BK, vals_BK=vals_BK, d_sae=self.d_sae)

    def reconstruction_loss(
        self, x_BD: Tensor, feats: SparseFeatureActs
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(reconstruction, loss, named terms) of the chosen features; Matryoshka overrides."""
        recon_BD = sparse_decode(feats.idx_BK, feats.vals_BK, self.W_dec) + self.b_dec
        mse = mse_per_token(recon_BD, x_BD)
        return recon_BD, mse, {"mse": mse.detach()}

    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        feats, aux_feats = self._select(x_BD, dead_F)
        recon_BD, loss, losses = self.reconstruction_loss(x_BD, feats)
        if aux_feats is not None:
            auxk = auxk_loss(aux_feats, (x_BD - recon_BD).detach(), self.W_dec)
            losses["auxk"] = auxk.detach()
            loss = loss + self.cfg.aux_coefficient * auxk
        self.update_threshold_(feats)
        losses["threshold"] = self.threshold.detach().to(loss.dtype)
        return TrainStepOutput(loss=loss, losses=losses, recon_BD=recon_BD, feats=feats)

    @torch.no_grad()
    def update_threshold_(self, feats: SparseFeatureActs) -> None:
        """Fold the batch's smallest kept activation m into θ; no change if nothing was kept.

        The moving average ``a ← (1 − r)·a + r·m`` started at 0 (SAELens) is still a fraction
        (1 − r)^n too small after n updates (37 % after 100 at r = 0.01), which inflates the
        inference L0 of short runs. θ is that average bias-corrected as in Adam,
        ``θ_n = a_n / (1 − (1 − r)^n)``, updated as ``θ ← θ + (m − θ)·r / (1 − (1 − r)^n)``:
        the running mean of m at first, the plain moving average once n ≫ 1/r.
        """
        kept_N = feats.vals_BK[feats.vals_BK > 0]
        if not kept_N.numel():
            return
        self.threshold_updates += 1
        rate = self.cfg.threshold_ema_lr
        step_rate = rate / (1 - (1 - rate) ** int(self.threshold_updates))
        self.threshold.add_(step_rate * (kept_N.min().to(torch.float64) - self.threshold))

    # ----- saving: a JumpReLU SAE with one shared threshold ---------------------------------------

    def folded_state_dict(self) -> dict[str, Tensor]:
        # θ compares features, which folding the activation scale leaves unchanged.
        threshold_F = torch.full((self.d_sae,), float(self.threshold), dtype=self.W_enc.dtype)
        return {**super().folded_state_dict(), "threshold": threshold_F.to(self.W_enc.device)}

    def load_folded_state_dict_(self, tensors: dict[str, Tensor]) -> None:
        threshold_F = tensors["threshold"]
        if not bool((threshold_F == threshold_F[0]).all()):
            raise SaelabError(
                f"a {self.architecture} SAE has one threshold shared by all features, but the "
                "file's thresholds differ; load it as a jumprelu SAE (set saelab.architecture)"
            )
        super().load_folded_state_dict_(tensors)
        self.threshold.fill_(float(threshold_F[0]))


def auxk_loss(
    aux: SparseFeatureActs, residual_BD: Float[Tensor, "B D"], W_dec_FD: Float[Tensor, "F D"]
) -> Float[Tensor, ""]:
    """AuxK as in TopK (Gao et al.): dead features model the residual, normalised by its
    variance; 0 where that is undefined."""
    residual_hat_BD = sparse_decode(aux.idx_BK, aux.vals_BK, W_dec_FD)
    variance = (residual_BD - residual_BD.mean(0)).pow(2).sum(-1).mean()
    loss = (residual_hat_BD - residual_BD).pow(2).sum(-1).mean() / variance.clamp_min(1e-12)
    return torch.nan_to_num(loss, nan=0.0)
