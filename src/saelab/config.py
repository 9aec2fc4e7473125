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
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from saelab.errors import SaelabError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SaelabError(message)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "default"
    """Hugging Face hub id, local directory, ``.gguf`` file, or ``default`` (SmolLM2-135M)."""
    device: str = "cpu"
    """Where the language model and the SAEs run: ``cpu`` or ``cuda``."""
    dtype: str = "float32"
    """Language model weights dtype: ``float32``, ``bfloat16`` or ``float16``."""

    def __post_init__(self) -> None:
        _require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"model.device must be 'cpu' or 'cuda', got {self.device!r}",
        )
        _require(
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

    def __post_init__(self) -> None:
        _require(self.context >= 2, f"data.context must be at least 2 tokens, got {self.context}")
        _require(self.model_batch_size >= 1, "data.model_batch_size must be at least 1")
        _require(
            0 <= self.skip_positions < self.context,
            f"data.skip_positions must be in [0, context), got {self.skip_positions}",
        )
        _require(self.buffer_size >= 1, "data.buffer_size must be at least 1")
        _require(self.norm_estimate_tokens >= 1, "data.norm_estimate_tokens must be positive")


@dataclass(frozen=True)
class SAEConfig:
    hook: str = "blocks.6.hook_resid_post"
    """Hook point whose activations the SAE reconstructs (see ``saelab hooks MODEL``)."""
    architecture: str = "topk"
    """SAE architecture; one of the names in ``saelab.saes.ARCHITECTURES``."""
    expansion: int = 16
    """Width multiplier: d_sae = expansion * d_in (ignored when ``width`` is set)."""
    width: int | None = None
    """Explicit number of features d_sae; overrides ``expansion``."""
    k: int = 32
    """TopK: active features per token."""
    l1_coefficient: float = 5.0
    """ReLU: weight of the decoder-norm-weighted L1 penalty (April-2024 recipe)."""
    k_aux: int | None = None
    """TopK AuxK: dead features used to model the residual; default d_in // 2."""
    aux_coefficient: float = 1 / 32
    """TopK AuxK: weight of the auxiliary loss (Gao et al. use 1/32)."""
    dead_window_tokens: int = 10_000_000
    """A feature that has not fired in this many training tokens counts as dead."""
    decoder_init_norm: float = 0.1
    """ReLU: norm of each decoder row at initialisation (April-2024 recipe)."""
    name: str | None = None
    """Folder name of this SAE inside the run directory; default derived from its settings."""

    def __post_init__(self) -> None:
        _require(self.expansion >= 1, f"sae.expansion must be >= 1, got {self.expansion}")
        _require(self.width is None or self.width >= 1, "sae.width must be positive")
        _require(self.k >= 1, f"sae.k must be >= 1, got {self.k}")
        _require(self.l1_coefficient >= 0, "sae.l1_coefficient must be >= 0")
        _require(self.aux_coefficient >= 0, "sae.aux_coefficient must be >= 0")
        _require(self.dead_window_tokens >= 1, "sae.dead_window_tokens must be positive")

    def d_sae(self, d_in: int) -> int:
        """Number of features for activations of width ``d_in``."""
        return self.width if self.width is not None else self.expansion * d_in

    def k_aux_for(self, d_in: int) -> int:
        return self.k_aux if self.k_aux is not None else d_in // 2

    @property
    def folder_name(self) -> str:
        if self.name:
            return self.name
        setting = f"k{self.k}" if self.architecture == "topk" else f"l1_{self.l1_coefficient:g}"
        width = f"w{self.width}" if self.width else f"x{self.expansion}"
        return f"{self.hook}-{self.architecture}-{width}-{setting}"


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
    """Fraction of final steps over which the learning rate decays linearly to 0."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity penalty rises linearly from 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip per SAE; 0 disables."""
    checkpoint_every_tokens: int = 0
    """Write a resumable checkpoint every this many tokens; 0 means only at the end."""
    log_every_steps: int = 10
    """Steps between JSONL/TensorBoard log lines."""

    def __post_init__(self) -> None:
        _require(self.tokens >= 1, f"train.tokens must be positive, got {self.tokens}")
        _require(self.batch_size >= 1, f"train.batch_size must be positive, got {self.batch_size}")
        _require(self.lr is None or self.lr > 0, f"train.lr must be positive, got {self.lr}")
        for name in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"train.{name} must be between 0 and 1, got {value}")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        _require(self.checkpoint_every_tokens >= 0, "train.checkpoint_every_tokens must be >= 0")
        _require(self.log_every_steps >= 1, "train.log_every_steps must be >= 1")

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.batch_size))


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
        _require(len(self.saes) >= 1, "a run needs at least one [[sae]] table")
        names = [s.folder_name for s in self.saes]
        shared = sorted({n for n in names if names.count(n) > 1})
        _require(
            not shared,
            f"two SAEs would share the folder {shared[0] if shared else ''}; "
            "give them distinct `name` fields",
        )

    @property
    def hooks(self) -> list[str]:
        """Hook points needed by the SAEs, deduplicated, in first-seen order."""
        return list(dict.fromkeys(s.hook for s in self.saes))


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sae": SAEConfig}


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    _require(
        not unknown,
        f"unknown field(s) {', '.join(unknown)} in [{where}]; valid: {', '.join(sorted(known))}",
    )
    try:
        return cls(**{k: _coerce(known[k], v, where) for k, v in table.items()})
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
    _require(
        not unknown, f"unknown section(s) {', '.join(unknown)}; valid: model data train sae seed"
    )
    sae_tables = raw.get("sae", [{}])
    if isinstance(sae_tables, dict):
        sae_tables = [sae_tables]
    return RunConfig(
        model=_build(ModelConfig, raw.get("model", {}), "model"),
        data=_build(DataConfig, raw.get("data", {}), "data"),
        train=_build(TrainConfig, raw.get("train", {}), "train"),
        saes=tuple(_build(SAEConfig, t, "sae") for t in sae_tables),
        seed=int(raw.get("seed", 0)),
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
        _require(p.is_file(), f"config file {p} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SaelabError(f"{p} is not valid TOML: {exc}") from exc
    for key, value in (overrides or {}).items():
        if key == "seed":
            raw["seed"] = int(value)
            continue
        section, _, name = key.partition(".")
        _require(
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
