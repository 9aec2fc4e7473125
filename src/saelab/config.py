"""Run configuration: one small dataclass per concern, loadable from TOML, overridable by flags.

A run is described by a :class:`RunConfig`: the model, the text, one or more SAEs and the training
loop. What the user wrote is what gets saved (``config.toml`` beside the results); values derived
from it (the SAE width, per-architecture defaults) are properties, never rewritten fields.

Example::

    cfg = load_run_config("run.toml", overrides={"train.tokens": "200000"})
    cfg.saes[0].d_sae(576)  # 9216 with the default expansion of 16
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from saelab.errors import SaelabError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise SaelabError(message)


def require_packing(
    context: int, model_batch_size: int, skip_positions: int, *, as_flags: bool = True
) -> None:
    """The rules of packed sequences, shared by the run config and the cache's arguments; a
    field is named as the user wrote it: a flag (``--model-batch-size``) or, with ``as_flags``
    False, a run-file field (``data.model_batch_size``)."""

    def called(field: str) -> str:
        return f"--{field.replace('_', '-')}" if as_flags else f"data.{field}"

    require(context >= 2, f"{called('context')} must be at least 2 tokens, got {context}")
    require(
        model_batch_size >= 1,
        f"{called('model_batch_size')} must be at least 1, got {model_batch_size}",
    )
    require(
        0 <= skip_positions < context,
        f"{called('skip_positions')} must be in [0, context), got {skip_positions}",
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "default"
    """Hugging Face hub id, local directory, ``.gguf`` file, or ``default`` (SmolLM2-135M)."""
    device: str = "cpu"
    """Where the language model and the SAEs run: ``cpu`` or ``cuda``."""
    dtype: str = "float32"
    """Language model weights dtype: ``float32``, ``bfloat16`` or ``float16``."""

    def __post_init__(self) -> None:
        require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"model.device must be 'cpu' or 'cuda', got {self.device!r}",
        )
        require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}",
        )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "default"
    """Text source: ``default`` (Python docs), a .txt/.jsonl/.parquet path, or a HF dataset."""
    context: int = 128
    """Tokens per packed sequence, BOS included."""
    model_batch_size: int = 32
    """Sequences per language-model forward pass."""
    skip_positions: int = 1
    """Leading positions dropped from every sequence: position 0 holds BOS, a huge-norm outlier."""
    buffer_size: int = 65_536
    """Activations held in the shuffle buffer; it is refilled when half of it has been served."""
    norm_estimate_tokens: int = 32_768
    """Activations used to estimate the scale that makes E||x|| = sqrt(d_in)."""
    activations: str | None = None
    """Folder of an activation cache (``saelab cache``) to train from instead of running the
    model; the cache's model, text, context and scales are used and the model is never loaded."""
    activation_epochs: int = 1
    """Passes over the cached activations a run may make; above 1 every token is reused."""

    def __post_init__(self) -> None:
        require_packing(self.context, self.model_batch_size, self.skip_positions, as_flags=False)
        require(self.buffer_size >= 1, "data.buffer_size must be at least 1")
        require(self.norm_estimate_tokens >= 1, "data.norm_estimate_tokens must be positive")
        require(self.activation_epochs >= 1, "data.activation_epochs must be at least 1")


B_DEC_INITS = ("zeros", "mean", "geometric_median")
"""How ``b_dec`` may start (``sae.b_dec_init``): zero, or the mean / geometric median of the first
training batch."""
LR_DECAYS = ("linear", "cosine")
"""Shapes of the final learning-rate decay (``train.lr_decay``)."""
RESAMPLE_WEIGHTINGS = ("loss_squared", "loss", "uniform")
"""How dead-feature resampling weights candidate inputs (``train.resample_weighting``): by the
square of their reconstruction loss (Bricken et al.), by the loss, or uniformly."""
DIST_MODES = ("ddp", "sae")
"""How ``torchrun`` processes share a run (``train.distributed``): ``ddp`` splits every batch
across them (data-parallel), ``sae`` gives each a subset of the SAEs (SAE-parallel)."""


@dataclass(frozen=True)
class SAEConfig:
    hook: str = "blocks.6.hook_resid_post"
    """Hook point whose activations the SAE reconstructs (see ``saelab hooks MODEL``); a
    transcoder's input."""
    output_hook: str | None = None
    """Transcoders only: the hook whose activations they predict from ``hook``'s, e.g.
    ``blocks.6.hook_mlp_out`` from ``blocks.6.ln2.hook_normalized``; None for other SAEs."""
    architecture: str = "topk"
    """SAE architecture; one of the names in ``saelab.saes.ARCHITECTURES``."""
    expansion: int = 16
    """Width multiplier: d_sae = expansion * d_in (ignored when ``width`` is set)."""
    width: int | None = None
    """Explicit number of features d_sae; overrides ``expansion``."""
    k: int = 32
    """TopK: active features per token; BatchTopK/Matryoshka: their mean (B·k kept per batch)."""
    l1_coefficient: float = 5.0
    """Sparsity weight λ. ReLU: of the decoder-norm-weighted L1 penalty (April-2024 recipe);
    Gated: of the gate's L1 (see ``gated_penalty``); JumpReLU: of the L0 penalty."""
    k_aux: int | None = None
    """TopK AuxK: dead features used to model the residual; default d_in // 2."""
    aux_coefficient: float = 1 / 32
    """TopK AuxK: weight of the auxiliary loss (Gao et al. use 1/32)."""
    dead_window_tokens: int = 10_000_000
    """A feature that has not fired in this many training tokens counts as dead."""
    decoder_init_norm: float = 0.1
    """ReLU: norm of each decoder row at initialisation (April-2024 recipe)."""
    decoder_unit_norm: bool | None = None
    """Keep decoder rows unit norm: the gradient parallel to each row is removed before every
    update and rows are renormalised after it. Default: the architecture's choice (topk yes, relu
    no). With it a ReLU SAE starts its rows at norm 1 (``decoder_init_norm`` is then unused) and
    its norm-weighted L1 is the plain L1 of Towards Monosemanticity."""
    b_dec_init: str | None = None
    """``zeros``, ``mean`` or ``geometric_median`` of the first training batch. Default:
    ``geometric_median`` when ``b_dec`` is subtracted before encoding (topk), else ``zeros``."""
    apply_b_dec_to_input: bool | None = None
    """Subtract ``b_dec`` before encoding (the pre-encoder bias of Towards Monosemanticity and
    TopK). Default: the architecture's choice (topk yes, relu no)."""
    gated_penalty: str = "paper"
    """Gated: ``paper`` (L1 of ReLU(π_gate), unit-norm decoder rows, frozen decoder in the
    auxiliary loss; Rajamanoharan et al. 2024) or ``april`` (L1 weighted by decoder-row norms, no
    norm constraint, live decoder in the auxiliary loss, as SAELens). ``l1_coefficient`` is λ."""
    jumprelu_bandwidth: float = 0.001
    """JumpReLU: width ε of the rectangle kernel of the straight-through gradients, RELATIVE to
    Gemma Scope's units (E||x||² = 1): the SAE uses ε·sqrt(d_in) in saelab's units (E||x|| =
    sqrt(d_in)), so the default is Gemma Scope's 0.001. ``l1_coefficient`` is the L0 weight λ."""
    jumprelu_init_threshold: float = 0.001
    """JumpReLU: initial threshold θ of every feature, relative like ``jumprelu_bandwidth``
    (used as θ·sqrt(d_in)); default Gemma Scope's 0.001."""
    jumprelu_threshold_lr_scale: float | None = None
    """JumpReLU: θ's learning rate as a multiple of the run's (same warm-up and decay). Default
    sqrt(d_in): Adam moves θ by about its rate per step, and θ is in activation units, sqrt(d_in)
    larger in saelab's units than in Gemma Scope's (where θ learns at the run's rate)."""
    threshold_ema_lr: float = 0.01
    """BatchTopK/Matryoshka: rate of the moving average θ ← (1 − r)θ + r·(smallest kept
    activation of the batch) that gives the inference threshold (SAELens ``topk_threshold_lr``),
    bias-corrected as in Adam so that short runs get no θ pulled towards 0."""
    matryoshka_widths: tuple[int, ...] | None = None
    """Matryoshka: increasing prefix sizes m_1 < … < m_K = d_sae whose reconstructions are
    trained; default d_sae·(1/16, 1/8, 1/4, 1/2, 1), i.e. groups of 1/16, 1/16, 1/8, 1/4, 1/2."""
    name: str | None = None
    """Folder name of this SAE inside the run directory; default derived from its settings
    (``saelab.saes.registry.sae_folder_name``, e.g. ``blocks.6.hook_resid_post-topk-x16-k32``)."""
    layers: str | tuple[int, ...] | None = None
    """Transcoders only: train a *replacement set*, one transcoder per listed layer (``all``, or
    a list such as ``[0, 3, 5]`` / ``--set sae.layers=0,3,5``), from one pass; with no
    ``output_hook`` each reads ``blocks.L.ln2.hook_normalized`` and predicts
    ``blocks.L.hook_mlp_out``, else the layer number in ``hook``/``output_hook`` is replaced by
    each L. A cross-layer architecture (``topk_clt_transcoder``) trains one CLT over the layers
    instead, whose decoder holds ``Σ_i F·d·(n − i)`` floats (n covered layers, F = d_sae / n
    features read at each, d the model width). Saved as one folder with ``replacement.json``."""
    seed: int | None = None
    """This SAE's initialisation seed; default the run's ``seed`` plus the SAE's index.
    ``saelab sweep --seeds N`` sets it (0 … N-1 added to the run's seed) on N copies of each
    ``[[sae]]``, and the folder name then ends in ``-seedN``."""

    def __post_init__(self) -> None:
        # What depends on the architecture (a transcoder's output_hook, ...) is checked by the
        # architecture itself when a run starts: saelab.saes.registry.check_run_saes.
        require(self.expansion >= 1, f"sae.expansion must be >= 1, got {self.expansion}")
        require(self.width is None or self.width >= 1, "sae.width must be positive")
        require(self.k >= 1, f"sae.k must be >= 1, got {self.k}")
        require(self.l1_coefficient >= 0, "sae.l1_coefficient must be >= 0")
        require(self.aux_coefficient >= 0, "sae.aux_coefficient must be >= 0")
        require(self.dead_window_tokens >= 1, "sae.dead_window_tokens must be positive")
        require(
            self.k_aux is None or self.k_aux >= 1,
            f"sae.k_aux must be >= 1 (or unset for d_in // 2), got {self.k_aux}",
        )
        require(
            self.b_dec_init is None or self.b_dec_init in B_DEC_INITS,
            f"sae.b_dec_init must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}",
        )
        require(
            self.gated_penalty in ("paper", "april"),
            f"sae.gated_penalty must be 'paper' or 'april', got {self.gated_penalty!r}",
        )
        require(self.jumprelu_bandwidth > 0, "sae.jumprelu_bandwidth must be positive")
        require(self.jumprelu_init_threshold > 0, "sae.jumprelu_init_threshold must be positive")
        require(
            self.jumprelu_threshold_lr_scale is None or self.jumprelu_threshold_lr_scale > 0,
            "sae.jumprelu_threshold_lr_scale must be positive (or unset for sqrt(d_in))",
        )
        require(
            0 < self.threshold_ema_lr <= 1,
            f"sae.threshold_ema_lr must be in (0, 1], got {self.threshold_ema_lr}",
        )
        if self.layers is not None:
            object.__setattr__(self, "layers", _parse_layers(self.layers))
        if self.matryoshka_widths is not None:
            widths = self.matryoshka_widths
            ok = isinstance(widths, (list, tuple)) and len(widths) >= 1
            ok = ok and all(isinstance(w, int) and not isinstance(w, bool) for w in widths)
            ok = ok and widths[0] >= 1
            ok = ok and all(a < b for a, b in zip(widths, widths[1:], strict=False))
            require(
                ok,
                "sae.matryoshka_widths must be strictly increasing positive integers, e.g. "
                f"[576, 1152, 2304, 4608, 9216], got {widths!r}",
            )
            require(
                self.width is None or widths[-1] == self.width,
                f"sae.matryoshka_widths must end at sae.width={self.width}, got {widths[-1]}",
            )
            # TOML gives a list; a tuple keeps the frozen config hashable and comparable.
            object.__setattr__(self, "matryoshka_widths", tuple(widths))

    def hooks_read(self) -> list[str]:
        """The hooks this SAE's batches need: ``hook`` and ``output_hook``; with a list of
        ``layers`` (a cross-layer transcoder, or a replacement set before it is expanded) those
        two at each listed layer (the ``blocks.N.`` of each name replaced)."""
        pair = [h for h in (self.hook, self.output_hook) if h is not None]
        if not isinstance(self.layers, tuple) or self.output_hook is None:
            return pair
        return [_BLOCK_PREFIX.sub(f"blocks.{layer}.", h) for layer in self.layers for h in pair]

    def d_sae(self, d_in: int) -> int:
        """Number of features for activations of width ``d_in``."""
        return self.width if self.width is not None else self.expansion * d_in

    def k_aux_for(self, d_in: int) -> int:
        return self.k_aux if self.k_aux is not None else d_in // 2

    def jumprelu_bandwidth_for(self, d_in: int) -> float:
        """ε in saelab's training units: activations are ≈ sqrt(d_in) × Gemma Scope's."""
        return self.jumprelu_bandwidth * math.sqrt(d_in)

    def jumprelu_init_threshold_for(self, d_in: int) -> float:
        """Initial θ in saelab's training units (see :meth:`jumprelu_bandwidth_for`)."""
        return self.jumprelu_init_threshold * math.sqrt(d_in)

    def jumprelu_threshold_lr_scale_for(self, d_in: int) -> float:
        """θ's learning rate ÷ the run's (see ``jumprelu_threshold_lr_scale``)."""
        scale = self.jumprelu_threshold_lr_scale
        return scale if scale is not None else math.sqrt(d_in)

    def matryoshka_widths_for(self, d_sae: int) -> tuple[int, ...]:
        """Prefix sizes for ``d_sae`` features: the configured ones, or the default fractions."""
        if self.matryoshka_widths is not None:
            return self.matryoshka_widths
        ends = (max(1, d_sae * n // 16) for n in (1, 2, 4, 8))
        return tuple(dict.fromkeys((*ends, d_sae)))


_BLOCK_PREFIX = re.compile(r"^blocks\.(\d+|\{layer\})\.")


def _parse_layers(value: Any) -> str | tuple[int, ...]:
    """``sae.layers`` as ``"all"`` or a tuple of distinct non-negative layer numbers."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return "all"
        try:
            value = [int(v) for v in text.replace(" ", "").strip("[]()").split(",") if v]
        except ValueError as exc:
            raise SaelabError(
                f"sae.layers must be `all` or layer numbers such as 0,3,5, got {value!r}"
            ) from exc
    ok = isinstance(value, list | tuple) and len(value) >= 1
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    require(ok, f"sae.layers must be `all` or non-negative layer numbers, got {value!r}")
    dup = sorted({v for v in value if list(value).count(v) > 1})
    require(not dup, f"sae.layers lists layer {dup[0] if dup else ''} twice; list each once")
    return tuple(sorted(value))


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 2_000_000
    """Training tokens (activations) fed to each SAE."""
    batch_size: int = 4096
    """Activations per optimiser step."""
    lr: float | None = None
    """Adam learning rate; default depends on the architecture and width."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_warmup_frac: float = 0.01
    """Fraction of steps over which the learning rate rises linearly from 0."""
    lr_decay_frac: float = 0.2
    """Fraction of final steps over which the learning rate decays to 0 (shape: ``lr_decay``)."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity penalty rises linearly from 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip per SAE; 0 disables."""
    checkpoint_every_tokens: int = 0
    """Write a resumable checkpoint every this many tokens; 0 means only at the end."""
    log_every_steps: int = 10
    """Steps between JSONL/TensorBoard log lines."""
    lr_decay: str = "linear"
    """Shape of the final decay over ``lr_decay_frac``: ``linear`` (April-2024 recipe) or
    ``cosine`` (half a cosine from 1 to 0)."""
    autocast_bf16: bool = False
    """Run each SAE training step under bfloat16 autocast (CUDA only; weights and optimiser stay
    float32)."""
    resample_every_steps: int = 0
    """Dead-feature resampling (Bricken et al. 2023) after every this many steps; 0 turns it off.
    Anthropic resampled at steps 25k, 50k, 75k and 100k, i.e. 25000 here."""
    resample_until_frac: float = 0.5
    """Resampling only happens up to this fraction of the training steps."""
    resample_dead_window_tokens: int | None = None
    """A feature that has not fired in this many tokens is resampled; default half the resampling
    interval (the paper: not fired in the last 12,500 of 25,000 steps)."""
    resample_sample_tokens: int = 819_200
    """Inputs whose reconstruction loss weights the choice of new directions: those of the training
    batches just before each resample (at most one resampling interval of them)."""
    resample_weighting: str = "loss_squared"
    """Chance of an input being chosen: ∝ ``loss_squared`` (the paper's literal reading), ∝
    ``loss`` (‖x − x̂‖², as dictionary_learning's norm²) or ``uniform``."""
    resample_lr_warmup_steps: int = 1000
    """After a resample the learning rate restarts at 0.1× and returns to 1× along a cosine over
    this many steps (Gated-SAE paper App. D.1.1); 0 disables."""
    distributed: str = "ddp"
    """Under ``torchrun``: ``ddp`` (each process runs the model on its share of the text and
    trains on 1/N of every batch, gradients averaged) or ``sae`` (each process trains every N-th
    SAE on all the activations). Ignored by a single process."""

    def __post_init__(self) -> None:
        require(self.tokens >= 1, f"train.tokens must be positive, got {self.tokens}")
        require(self.batch_size >= 1, f"train.batch_size must be positive, got {self.batch_size}")
        require(self.lr is None or self.lr > 0, f"train.lr must be positive, got {self.lr}")
        for name in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"train.{name} must be between 0 and 1, got {value}")
        require(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        require(self.checkpoint_every_tokens >= 0, "train.checkpoint_every_tokens must be >= 0")
        require(self.log_every_steps >= 1, "train.log_every_steps must be >= 1")
        require(
            self.lr_decay in LR_DECAYS,
            f"train.lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}",
        )
        require(
            self.resample_every_steps >= 0,
            "train.resample_every_steps must be >= 0 (0 turns resampling off)",
        )
        require(
            0 < self.resample_until_frac <= 1,
            f"train.resample_until_frac must be in (0, 1], got {self.resample_until_frac}",
        )
        require(
            self.resample_dead_window_tokens is None or self.resample_dead_window_tokens >= 1,
            "train.resample_dead_window_tokens must be positive (or unset for half the interval)",
        )
        require(self.resample_sample_tokens >= 1, "train.resample_sample_tokens must be positive")
        require(
            self.resample_weighting in RESAMPLE_WEIGHTINGS,
            f"train.resample_weighting must be one of {', '.join(RESAMPLE_WEIGHTINGS)}, "
            f"got {self.resample_weighting!r}",
        )
        require(
            self.resample_lr_warmup_steps >= 0,
            "train.resample_lr_warmup_steps must be >= 0 (0 disables the warm-up)",
        )
        require(
            self.distributed in DIST_MODES,
            f"train.distributed must be one of {', '.join(DIST_MODES)}, got {self.distributed!r}",
        )

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.batch_size))

    @property
    def resample_window_tokens(self) -> int:
        """Tokens without firing after which resampling counts a feature dead."""
        if self.resample_dead_window_tokens is not None:
            return self.resample_dead_window_tokens
        return max(1, self.resample_every_steps * self.batch_size // 2)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    saes: tuple[SAEConfig, ...] = (SAEConfig(),)
    """One or more SAEs, all trained from the same activation stream."""
    seed: int = 0
    """Seeds text order, shuffling and SAE initialisation."""

    def __post_init__(self) -> None:
        require(len(self.saes) >= 1, "a run needs at least one [[sae]] table")
        # Distinct SAE folders are checked when the run starts (saelab.saes.registry).
        require(
            not self.train.autocast_bf16 or self.model.device.startswith("cuda"),
            "train.autocast_bf16 needs model.device = 'cuda'; turn it off to train on the CPU",
        )

    @property
    def hooks(self) -> list[str]:
        """Hook points needed by the SAEs (transcoders' output hooks too), deduplicated, in
        first-seen order."""
        needed = (h for s in self.saes for h in s.hooks_read())
        return list(dict.fromkeys(needed))


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sae": SAEConfig}


def value_fits(value: Any, hint: Any) -> bool:
    """Whether a TOML/JSON value has a config field's type (``int``, ``float | None``,
    ``tuple[int, ...]`` as a list, ...); a bool is not a number, an int is a float."""
    if isinstance(hint, types.UnionType):
        return any(value_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list | tuple) and all(value_fits(v, item) for v in value)
    return isinstance(hint, type) and isinstance(value, hint)


def type_name(hint: Any) -> str:
    """``int``, ``float | None``, ``tuple[int, ...]``: a field's type as written."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    require(
        isinstance(table, dict),
        f"[{where}] must be a table of fields, got {table!r}; write [{where}] and the fields "
        "below it",
    )
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    require(
        not unknown,
        f"unknown field(s) {', '.join(unknown)} in [{where}]; valid: {', '.join(sorted(known))}",
    )
    values = {k: _coerce(known[k], v, where) for k, v in table.items()}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        # TOML values keep their own type: `k = 1.5` or `hook = ["a"]` must not reach the run.
        whole = isinstance(value, float) and value.is_integer()
        if whole and int in (hints[key], *typing.get_args(hints[key])):
            values[key] = value = int(value)  # `tokens = 2e6`
        require(
            value_fits(value, hints[key]),
            f"{where}.{key} must be of type {type_name(hints[key])}, got {value!r}",
        )
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise SaelabError(f"bad [{where}] table: {exc}") from exc


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Turn flag strings into the field's type; TOML values already have types."""
    if not isinstance(value, str):
        return value
    kind = str(f.type)
    # Before the numeric parse: `--set train.lr=none` means "back to the default (None)".
    if "None" in kind and value.lower() == "none":
        return None
    if kind.startswith("tuple[int"):  # `--set sae.matryoshka_widths=64,128,512`
        try:
            return tuple(int(v) for v in value.replace(" ", "").strip("[]()").split(","))
        except ValueError as exc:
            raise SaelabError(
                f"{where}.{f.name} must be comma-separated integers, got {value!r}"
            ) from exc
    try:
        if kind.startswith("int"):
            if "e" not in value.lower():
                return int(value)
            number = float(value)  # 2e5; but 2.5e0 is not a whole number
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        if kind.startswith("float"):
            return float(value)
    except ValueError as exc:
        raise SaelabError(f"{where}.{f.name} must be a number, got {value!r}") from exc
    if kind.startswith("bool"):
        return value.lower() in ("1", "true", "yes")
    return value


def run_config_from_dict(raw: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(raw) - {"model", "data", "train", "sae", "seed"})
    require(
        not unknown, f"unknown section(s) {', '.join(unknown)}; valid: model data train sae seed"
    )
    sae_tables = raw.get("sae", [{}])
    if isinstance(sae_tables, dict):
        sae_tables = [sae_tables]
    require(
        isinstance(sae_tables, list),
        f"sae must be a [sae] table or [[sae]] tables, got {sae_tables!r}",
    )
    seed = raw.get("seed", 0)
    if isinstance(seed, str):  # --seed and --set seed=... arrive as text
        require(seed.strip().lstrip("-").isdigit(), f"seed must be an integer, got {seed!r}")
        seed = int(seed)
    require(value_fits(seed, int), f"seed must be an integer, got {seed!r}")
    return RunConfig(
        model=_build(ModelConfig, raw.get("model", {}), "model"),
        data=_build(DataConfig, raw.get("data", {}), "data"),
        train=_build(TrainConfig, raw.get("train", {}), "train"),
        saes=tuple(_build(SAEConfig, t, "sae") for t in sae_tables),
        seed=seed,
    )


def load_run_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Read a TOML run file (or start from defaults) and apply ``section.field`` overrides.

    An override of ``sae.field`` applies to every ``[[sae]]`` table.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        require(p.exists(), f"config file {p} does not exist")
        require(p.is_file(), f"{p} is a folder, not a TOML run file; pass the run file")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SaelabError(f"{p} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise SaelabError(
                f"{p} is not UTF-8 text (byte {exc.start}); pass a TOML run file"
            ) from exc
        # An empty file is a mistake (an unsaved editor buffer, a wrong path), not a request for
        # an all-defaults run that takes hours.
        require(
            bool(raw),
            f"{p} is empty: write the run's [model], [data], [train] and [[sae]] tables in it "
            "(see examples/sweep_l0.toml)",
        )
    for key, value in (overrides or {}).items():
        if key == "seed":
            raw["seed"] = value
            continue
        section, _, name = key.partition(".")
        require(
            section in _SECTIONS and bool(name),
            f"override {key!r} must look like section.field with section in {', '.join(_SECTIONS)}",
        )
        if section == "sae":
            tables = raw.setdefault("sae", [{}])
            if isinstance(tables, dict):
                tables = raw["sae"] = [tables]
            for table in tables:
                table[name] = value
        else:
            raw.setdefault(section, {})[name] = value
    return run_config_from_dict(raw)


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    def clean(obj: Any) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}

    return {
        "seed": cfg.seed,
        "model": clean(cfg.model),
        "data": clean(cfg.data),
        "train": clean(cfg.train),
        "sae": [clean(s) for s in cfg.saes],
    }


def dump_run_config(cfg: RunConfig) -> str:
    """TOML text that :func:`load_run_config` reads back to an equal config."""
    return tomli_w.dumps(run_config_to_dict(cfg))
