"""The options of ``saelab steer``: how a vector is built (:class:`SteerVectorConfig`) and
how it is applied and scored (:class:`SteerConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Importing build registers every builder, so BUILDERS is complete below.
from saelab.analysis.steering.build import SAE_METHODS
from saelab.analysis.steering.registry import BUILDERS
from saelab.config import require

STEERING_METHODS = tuple(BUILDERS)
"""How ``saelab steer`` builds a steering vector (METHODS §8): contrastive activation addition
(mean difference at the answer position), ActAdd (one prompt pair, one vector per position),
mean-centring (target text mean minus general text mean), an SAE feature's decoder direction, or
clamping an SAE feature to a value (the SAE error term kept): the keys of
:data:`~saelab.analysis.steering.registry.BUILDERS`, in the order they register."""
STEERING_POSITIONS = ("all", "after_prompt", "front")
"""Where a vector is added: every position but BOS; positions from the end of the prompt on (the
tokens the model writes, CAA's rule); the first T positions after BOS, one row each (ActAdd)."""
SAE_UNITS = ("max_act", "resid_norm", "activation")
"""What coefficient 1 means for SAE-feature steering: the feature's largest activation on the
general text, the decoder contribution as long as the mean residual norm there, or a feature
activation of 1 (raw units)."""


@dataclass(frozen=True)
class SteerVectorConfig:
    method: str = "caa"
    """How the vector is built; one of :data:`STEERING_METHODS`."""
    hook: str | None = None
    """Where it is built and applied. Default: the SAE's own hook for the SAE methods, else
    ``blocks.6.hook_resid_post``."""
    pairs: str | None = None
    """caa: a .jsonl file of ``{"prompt", "positive", "negative"}`` lines (``target`` and
    ``contrast`` are read as ``positive`` and ``negative``)."""
    answer_offset: int = -1
    """caa: the answer position counted from the end of prompt + completion: -1 is its last
    token, -2 the one before (the "A" of a completion "(A)")."""
    positive: str | None = None
    """actadd: the prompt steered towards, e.g. ``Love``."""
    negative: str | None = None
    """actadd: the prompt steered away from, e.g. ``Hate`` (may be a single space)."""
    target: str | None = None
    """mean: the text whose mean activation is wanted, as a text spec (a .txt/.jsonl file, a
    folder or a hub dataset)."""
    general: str = "default"
    """mean, and the SAE units: the general text that is subtracted / measured (a text spec)."""
    tokens: int = 4096
    """mean, and the SAE units: tokens read from each of ``target`` and ``general``."""
    context: int = 128
    """Tokens per row when reading ``target`` and ``general``, BOS included; longer documents
    are cut into several rows."""
    sae: str | None = None
    """sae-feature / sae-clamp: the saved SAE folder."""
    feature: int | None = None
    """sae-feature / sae-clamp: the feature index."""
    sae_units: str = "max_act"
    """sae-feature / sae-clamp: what coefficient 1 means; one of :data:`SAE_UNITS`."""
    max_act: float | None = None
    """sae units ``max_act``: the feature's largest activation when known; default: from the
    feature statistics (``stats``), else measured on ``tokens`` tokens of ``general``."""
    stats: str | None = None
    """sae units ``max_act``: a folder of ``saelab features`` statistics of this SAE to take the
    feature's max activation from. Default: ``SAE_DIR/features`` when it holds them."""
    seed: int = 0
    """Order of the documents read from ``target`` and ``general``."""

    def __post_init__(self) -> None:
        require(
            self.method in STEERING_METHODS,
            f"steering method must be one of {', '.join(STEERING_METHODS)}, got {self.method!r}",
        )
        needs = {
            "caa": (self.pairs is not None, "--method caa needs --pairs FILE.jsonl"),
            "actadd": (
                self.positive is not None and self.negative is not None,
                "--method actadd needs --positive TEXT and --negative TEXT",
            ),
            "mean": (self.target is not None, "--method mean needs --target TEXT_SPEC"),
        }
        has_feature = self.sae is not None and self.feature is not None
        for method in SAE_METHODS:
            needs[method] = (has_feature, f"--method {method} needs --sae SAE_DIR and --feature I")
        ok, message = needs[self.method]
        require(ok, message)
        require(
            self.answer_offset < 0,
            f"--answer-offset counts from the end and must be negative (-1 is the last token), "
            f"got {self.answer_offset}",
        )
        require(self.tokens >= 1, f"--tokens must be at least 1, got {self.tokens}")
        require(self.context >= 2, f"--context must be at least 2, got {self.context}")
        require(
            self.feature is None or self.feature >= 0,
            f"--feature must be a feature index >= 0, got {self.feature}",
        )
        require(
            self.sae_units in SAE_UNITS,
            f"--sae-units must be one of {', '.join(SAE_UNITS)}, got {self.sae_units!r}",
        )
        require(
            self.max_act is None or self.max_act > 0,
            f"--max-act must be a positive activation, got {self.max_act}",
        )
        require(
            self.stats is None or self.uses_sae,
            f"--stats is for --method sae-feature or sae-clamp, not {self.method}; drop it",
        )

    @property
    def uses_sae(self) -> bool:
        return self.method in SAE_METHODS


@dataclass(frozen=True)
class SteerConfig:
    model: str = "default"
    """The model steered: hub id, local dir, ``.gguf`` file or ``default`` (SmolLM2-135M)."""
    device: str = "cpu"
    """Where the model runs: ``cpu`` or ``cuda``."""
    build: SteerVectorConfig | None = None
    """How to build the vector; None when ``vector`` names a saved one."""
    vector: str | None = None
    """Folder of a saved vector (``vector.json`` + ``vector.safetensors``) to use instead."""
    coefs: tuple[float, ...] = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    """Coefficients swept; the vector is multiplied by each (sae-clamp: the clamp value in
    units of ``sae_units``). A raw CAA or mean-centred vector is about as long as the residual
    stream, so useful values are often below 4."""
    positions: str | None = None
    """Where the vector is added, one of :data:`STEERING_POSITIONS`. Default: ``front`` for
    per-position (ActAdd) vectors, else ``all``."""
    eval: str | None = None
    """A .jsonl file of ``{"prompt", "target", "contrast"}`` lines whose completions are scored.
    Default for caa: its ``pairs`` file (in-sample); otherwise none (no effect measured)."""
    neutral: str = "default"
    """Text the cost (KL, CE increase) is measured on (a text spec)."""
    neutral_tokens: int = 1024
    """Tokens of ``neutral`` the cost is measured on; 0 skips the cost."""
    context: int = 128
    """Tokens per row of the neutral text, BOS included."""
    generate: tuple[str, ...] = ()
    """Prompts continued at every coefficient."""
    max_new_tokens: int = 30
    """Tokens generated per prompt and coefficient."""
    sample: bool = False
    """Sample (temperature, top-p) instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (with ``sample``)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with ``sample``)."""
    seed: int = 0
    """Seeds sampling and the order of the neutral text."""
    transfer_layers: str | None = None
    """Also apply the vector at the same hook type of these layers (``4-8``, ``2,4,6``) and
    report the effect retained."""
    transfer_model: str | None = None
    """Also apply the vector to this model (same d_model, e.g. base → chat) and report the
    effect retained."""
    explain_with: str | None = None
    """A saved SAE folder at the vector's hook: report the vector's top features in it (encoded,
    and least squares on the decoder rows), each with its density, and the share of the vector
    carried by dense features (density > 10 % and > 1 %)."""
    explain_top: int = 10
    """Features listed per decomposition with ``explain_with``."""

    def __post_init__(self) -> None:
        require(
            self.build is None or self.vector is None,
            "give either --method (to build a vector) or --vector DIR (to load one), not both",
        )
        require(
            self.build is not None or self.vector is not None,
            "say which vector to steer with: either --method (to build one) or --vector DIR",
        )
        require(len(self.coefs) >= 1, "--coefs needs at least one coefficient, e.g. -4,0,4")
        require(
            all(math.isfinite(c) for c in self.coefs),
            f"--coefs must be finite numbers, got {','.join(map(str, self.coefs))}",
        )
        require(
            self.positions is None or self.positions in STEERING_POSITIONS,
            f"--positions must be one of {', '.join(STEERING_POSITIONS)}, got {self.positions!r}",
        )
        require(self.neutral_tokens >= 0, "--neutral-tokens must be >= 0 (0 skips the cost)")
        require(self.context >= 2, f"--context must be at least 2, got {self.context}")
        require(self.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
        require(self.explain_top >= 1, f"--explain-top must be at least 1, got {self.explain_top}")
        require(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"--device must be 'cpu' or 'cuda', got {self.device!r}",
        )
