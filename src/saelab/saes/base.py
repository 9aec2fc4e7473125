"""The shared SAE module: parameters, public encode/decode in model units, the training step.

Shape legend used across ``saelab`` (suffixes on tensor names):
B batch (tokens), P pos, D d_in, F d_sae (features), K top-k, L layers,
O d_out (a transcoder's output width).

An architecture subclass implements three things: how it encodes normalised activations
(:meth:`SparseAutoencoder.encode_normalised`), its loss terms, and optionally its init and
per-step constraints. Everything else — scaling, decoding, the typed training-step output — is here.

Units: during training the SAE sees activations multiplied by ``activation_scale`` (chosen so that
E‖x‖ = √d_in). The public :meth:`encode`/:meth:`decode`/:meth:`forward` take and return raw model
activations; :meth:`folded_state_dict` gives weights that work in model units with no scale.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.config import SAEConfig, require
from saelab.saes.kernels.sparse_ops import scatter_dense, sparse_decode


class FeatureActs(ABC):
    """Feature activations of a batch, dense or as top-K (index, value) pairs."""

    d_sae: int

    @abstractmethod
    def to_dense(self) -> Float[Tensor, "B F"]: ...

    @abstractmethod
    def l0_per_token(self) -> Int[Tensor, " B"]: ...

    @abstractmethod
    def fired_counts(self) -> Int[Tensor, " F"]:
        """How many tokens of the batch each feature fired on (activation > 0)."""


@dataclass
class DenseFeatureActs(FeatureActs):
    acts_BF: Float[Tensor, "B F"]

    @property
    def d_sae(self) -> int:  # type: ignore[override]
        return self.acts_BF.shape[-1]

    def to_dense(self) -> Float[Tensor, "B F"]:
        return self.acts_BF

    def l0_per_token(self) -> Int[Tensor, " B"]:
        return (self.acts_BF > 0).sum(-1)

    def fired_counts(self) -> Int[Tensor, " F"]:
        return (self.acts_BF > 0).sum(0)


@dataclass
class SparseFeatureActs(FeatureActs):
    idx_BK: Int[Tensor, "B K"]
    vals_BK: Float[Tensor, "B K"]
    d_sae: int  # type: ignore[misc]

    def to_dense(self) -> Float[Tensor, "B F"]:
        return scatter_dense(self.idx_BK, self.vals_BK, self.d_sae)

    def l0_per_token(self) -> Int[Tensor, " B"]:
        return (self.vals_BK > 0).sum(-1)

    def fired_counts(self) -> Int[Tensor, " F"]:
        fired = (self.vals_BK > 0).reshape(-1).to(torch.int64)
        return torch.bincount(self.idx_BK.reshape(-1), weights=fired, minlength=self.d_sae).to(
            torch.int64
        )


@dataclass
class TrainStepOutput:
    """What one SAE training step produced (normalised units)."""

    loss: Float[Tensor, ""]
    """The scalar to backpropagate."""
    losses: dict[str, Float[Tensor, ""]]
    """Named loss terms (detached), e.g. ``mse`` and ``l1`` or ``auxk``."""
    recon_BD: Float[Tensor, "B D"]
    feats: FeatureActs


class SparseAutoencoder(nn.Module, ABC):
    """Base class: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec``.

    Example::

        sae = TopKSAE(SAEConfig(architecture="topk", k=8), d_in=64)
        feats_BF = sae.encode(torch.randn(10, 64))   # [10, 64 * 16], 8 non-zeros per row
        recon_BD = sae.decode(feats_BF)
    """

    architecture: ClassVar[str]
    """saelab's name for the architecture (the registry key and CLI choice)."""
    saelens_architecture: ClassVar[str]
    """The ``architecture`` value SAELens uses in ``cfg.json``."""
    default_apply_b_dec_to_input: ClassVar[bool]
    default_decoder_unit_norm: ClassVar[bool] = False
    """Whether decoder rows stay unit norm when ``cfg.decoder_unit_norm`` is unset."""
    decoder_unit_norm_configurable: ClassVar[bool] = False
    """Whether ``cfg.decoder_unit_norm`` may differ from the default: true for architectures that
    leave the constraint to the base class's optimizer-step hooks."""
    supports_autocast_bf16: ClassVar[bool] = True
    """Whether :meth:`training_step` may run under ``torch.autocast(bfloat16)``
    (``train.autocast_bf16``): hand-written autograd kernels must accept the mixed dtypes
    autocast produces (``kernels.sparse_ops.fp32_forward`` does); an architecture whose kernels
    do not sets this to False and the trainer refuses the option for it."""
    default_b_dec_init: ClassVar[str] = "zeros"
    """How a pre-encoder bias starts when ``cfg.b_dec_init`` is unset (one of
    ``saelab.config.B_DEC_INITS``); a ``b_dec`` that is not subtracted starts at zero."""

    is_transcoder: ClassVar[bool] = False
    """Whether it predicts ``cfg.output_hook``'s activations from ``cfg.hook``'s (and so needs
    an output hook); autoencoders reconstruct their input."""

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        *,
        apply_b_dec_to_input: bool | None = None,
        seed: int | None = None,
        d_out: int | None = None,
    ) -> None:
        super().__init__()
        type(self).check_config(cfg)
        self.cfg = cfg
        self.d_in = d_in
        self.d_out = d_in if d_out is None else d_out
        """Width of what the SAE reconstructs: ``d_in``, except for transcoders."""
        self.d_sae = cfg.d_sae(d_in)
        if apply_b_dec_to_input is None:
            apply_b_dec_to_input = cfg.apply_b_dec_to_input
        self.apply_b_dec_to_input = (
            self.default_apply_b_dec_to_input
            if apply_b_dec_to_input is None
            else apply_b_dec_to_input
        )
        self.decoder_unit_norm = self._resolve_decoder_unit_norm(cfg)
        """Keep decoder rows unit norm (the base optimizer-step hooks apply it)."""
        self.W_enc = nn.Parameter(torch.empty(d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        # Multiplies raw activations into training units; not a weight (folded on save).
        self.register_buffer("activation_scale", torch.tensor(1.0), persistent=False)
        self.metadata: dict[str, object] = {}
        """Where the SAE came from (model name, hook, dataset), as saved in ``cfg.json``."""
        self.add_parameters_()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.init_weights_(generator)

    # ----- what an architecture defines -------------------------------------------------------

    @abstractmethod
    def init_weights_(self, generator: torch.Generator | None) -> None:
        """Initialise parameters in place."""

    @abstractmethod
    def encode_normalised(self, x_BD: Float[Tensor, "B D"]) -> FeatureActs:
        """Feature activations of normalised inputs."""

    @abstractmethod
    def training_step(
        self,
        x_BD: Float[Tensor, "B D"],
        *,
        target_BD: Float[Tensor, "B O"] | None = None,
        penalty_scale: float = 1.0,
        dead_F: Tensor | None = None,
    ) -> TrainStepOutput:
        """Loss on a normalised batch. ``penalty_scale`` warms sparsity penalties up;
        ``dead_F`` marks features counted dead by the trainer (used by auxiliary losses).
        ``target_BD`` (normalised, width ``d_out``) is what a transcoder predicts; the trainer
        passes it only to SAEs with ``cfg.output_hook``, so an autoencoder may omit it."""

    def add_parameters_(self) -> None:
        """Create an architecture's parameters beyond the shared four (before initialisation);
        default: none. An architecture without ``b_enc`` sets it to ``None`` here."""

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Refuse settings this architecture cannot run (one-line :class:`SaelabError`); runs when
        a run starts (:func:`saelab.saes.registry.check_run_saes`) and when an SAE is built."""
        require(
            cfg.output_hook is None,
            f"sae.output_hook is only for transcoders, not {cfg.architecture!r}; drop it or "
            "choose a transcoder architecture (e.g. --arch topk_transcoder)",
        )

    @classmethod
    def folder_setting(cls, cfg: SAEConfig) -> str:
        """The sparsity setting that ends the default folder name (see
        :func:`saelab.saes.registry.sae_folder_name`): ``l1_5`` for the L1 coefficient 5."""
        return f"l1_{cfg.l1_coefficient:g}"

    @classmethod
    def saved_tensor_shapes(
        cls, d_in: int, d_sae: int, d_out: int | None = None
    ) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors in ``sae_weights.safetensors`` (the SAELens layout);
        loading checks every one. Architectures with more tensors extend this via ``super()``.
        ``d_out`` (transcoders) defaults to ``d_in``."""
        d_out = d_in if d_out is None else d_out
        return {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_out),
            "b_dec": (d_out,),
        }

    @classmethod
    def default_lr(cls, d_sae: int) -> float:
        """Adam learning rate when the user gives none: 2e-4 at 16k features, scaled as 1/√F."""
        return 2e-4 / math.sqrt(d_sae / 2**14)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers of named parameters (the trainer gives each its own Adam
        parameter group, under the same schedule); default none: all at the run's rate."""
        return {}

    def before_optimizer_step_(self) -> None:
        """Hook for gradient constraints; default: with :attr:`decoder_unit_norm`, remove the
        gradient component parallel to each decoder row."""
        if self.decoder_unit_norm:
            self._remove_parallel_decoder_grad_()

    def after_optimizer_step_(self) -> None:
        """Hook for parameter constraints after each update; default: with
        :attr:`decoder_unit_norm`, renormalise decoder rows."""
        if self.decoder_unit_norm:
            self._normalise_decoder_rows_()

    def init_from_data_(self, x_BD: Float[Tensor, "B D"]) -> None:
        """Data-dependent initialisation from a first normalised batch: ``b_dec`` as
        :attr:`b_dec_init` says. Architectures that extend it call ``super()``."""
        how = self.b_dec_init
        if how == "zeros":
            return
        if self.d_out != self.d_in:
            from saelab.errors import SaelabError

            raise SaelabError(
                f"sae.b_dec_init = {how!r} needs an SAE that reconstructs its input; "
                f"{self.architecture} predicts another hook, so leave b_dec_init unset"
            )
        with torch.no_grad():
            x_BD = x_BD.float()
            self.b_dec.copy_(x_BD.mean(0) if how == "mean" else geometric_median(x_BD))

    @property
    def b_dec_init(self) -> str:
        """``cfg.b_dec_init``, else the architecture's default for a pre-encoder bias, else
        ``zeros`` (a ``b_dec`` only added back after decoding starts at zero, April 2024)."""
        if self.cfg.b_dec_init is not None:
            return self.cfg.b_dec_init
        return self.default_b_dec_init if self.apply_b_dec_to_input else "zeros"

    def _resolve_decoder_unit_norm(self, cfg: SAEConfig) -> bool:
        if cfg.decoder_unit_norm is None:
            return self.default_decoder_unit_norm
        fixed = not self.decoder_unit_norm_configurable
        if fixed and cfg.decoder_unit_norm != self.default_decoder_unit_norm:
            from saelab.errors import SaelabError

            raise SaelabError(
                f"the {self.architecture} architecture fixes its decoder norm; remove "
                f"sae.decoder_unit_norm = {str(cfg.decoder_unit_norm).lower()}"
            )
        return cfg.decoder_unit_norm

    # ----- shared machinery ------------------------------------------------------------------

    def sae_input(self, x_BD: Float[Tensor, "B D"]) -> Float[Tensor, "B D"]:
        return x_BD - self.b_dec if self.apply_b_dec_to_input else x_BD

    def decode_feats(self, feats: FeatureActs) -> Float[Tensor, "B D"]:
        if isinstance(feats, SparseFeatureActs):
            return sparse_decode(feats.idx_BK, feats.vals_BK, self.W_dec) + self.b_dec
        return feats.to_dense() @ self.W_dec + self.b_dec

    def _target(self, x_BD: Tensor, target_BD: Tensor | None) -> Tensor:
        """What the step reconstructs: an autoencoder its input (a transcoder overrides this
        to require its output hook's activations)."""
        return x_BD

    def predict_normalised(self, x_BD: Float[Tensor, "B D"], feats: FeatureActs) -> Tensor:
        """What the SAE outputs for normalised inputs and their features, in training units:
        the reconstruction ``[B, D]``; a transcoder's prediction ``[B, O]`` of its output hook
        (it overrides this to add its skip term)."""
        return self.decode_feats(feats)

    def encode(self, x: Float[Tensor, "... D"]) -> Float[Tensor, "... F"]:
        """Dense feature activations of raw model activations (any leading shape)."""
        self._check_width(x)
        lead = x.shape[:-1]
        x_BD = x.reshape(-1, self.d_in).to(self.W_enc.dtype) * self.activation_scale
        return self.encode_normalised(x_BD).to_dense().reshape(*lead, self.d_sae)

    def decode(self, feats: Float[Tensor, "... F"]) -> Float[Tensor, "... D"]:
        """Reconstruction in model units from dense feature activations."""
        lead = feats.shape[:-1]
        recon_BD = feats.reshape(-1, self.d_sae) @ self.W_dec + self.b_dec
        return (recon_BD / self.activation_scale).reshape(*lead, self.d_in)

    def forward(self, x: Float[Tensor, "... D"]) -> Float[Tensor, "... D"]:
        """Reconstruction of raw model activations, in model units."""
        self._check_width(x)
        lead = x.shape[:-1]
        x_BD = x.reshape(-1, self.d_in).to(self.W_enc.dtype) * self.activation_scale
        recon_BD = self.decode_feats(self.encode_normalised(x_BD)) / self.activation_scale
        return recon_BD.reshape(*lead, self.d_in).to(x.dtype)

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            from saelab.errors import SaelabError

            raise SaelabError(
                f"activations have width {x.shape[-1]} but this SAE was built for d_in="
                f"{self.d_in} (hook {self.cfg.hook}); use an SAE trained on this hook"
            )

    def folded_state_dict(self) -> dict[str, Tensor]:
        """Weights that take raw model activations: the activation scale folded in.

        With ``x_norm = s·x``: ``(s·x − b_dec) W_enc = (x − b_dec/s)(s·W_enc)``, and the
        reconstruction ``(f W_dec + b_dec)/s`` uses ``W_dec/s``, ``b_dec/s``; features unchanged.
        """
        s = float(self.activation_scale)
        folded = {
            "W_enc": self.W_enc.detach() * s,
            "b_enc": None if self.b_enc is None else self.b_enc.detach().clone(),
            "W_dec": self.W_dec.detach() / s,
            "b_dec": self.b_dec.detach() / s,
        }
        return {name: t for name, t in folded.items() if t is not None}

    def load_folded_state_dict_(self, tensors: dict[str, Tensor]) -> None:
        """Load model-unit weights (scale 1). Subclasses load their own tensors via ``super()``."""
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                if getattr(self, name) is not None:
                    getattr(self, name).copy_(tensors[name])
            self.activation_scale.fill_(1.0)

    # ----- helpers for subclasses -------------------------------------------------------------

    def _remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component along each decoder row (unit-norm constraint)."""
        if self.W_dec.grad is None:
            return
        unit_FD = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        parallel_F = (self.W_dec.grad * unit_FD).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel_F * unit_FD)

    def _normalise_decoder_rows_(self) -> None:
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))


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


def mse_per_token(recon_BD: Tensor, x_BD: Tensor) -> Float[Tensor, ""]:
    """Squared error summed over d_in, averaged over tokens (SAELens' reduction)."""
    return (recon_BD - x_BD).pow(2).sum(-1).mean()
