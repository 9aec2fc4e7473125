"""The options of ``saelab circuit``: what is attributed, kept and ablated."""

from __future__ import annotations

from dataclasses import dataclass

# Importing the methods registers them, so the registry is full before it is read below.
from saelab.analysis.circuits import attribution  # noqa: F401
from saelab.analysis.circuits.registry import ATTRIBUTION_METHODS
from saelab.config import require

CIRCUIT_METHODS = tuple(ATTRIBUTION_METHODS)
"""How ``saelab circuit`` attributes the metric to nodes: ``atp`` (attribution patching) or ``ig``
(integrated gradients), METHODS §9.1; the names registered in
:data:`~saelab.analysis.circuits.registry.ATTRIBUTION_METHODS`."""
ABLATIONS = ("mean", "zero")
"""What nodes outside a circuit are set to: their mean over the patch batch, or zero."""
KEEP_PER = ("position", "prompt")
"""Top-k feature keeping: k features at each position, or k per prompt (scores summed over its
positions)."""
RANK_BY = ("activation", "attribution")
"""What top-k feature keeping ranks features by: activation value or |attribution|."""


@dataclass(frozen=True)
class CircuitConfig:
    task: str = "ioi"
    """``ioi`` (built prompts, METHODS §9.2) or a .jsonl file of
    ``{"prompt", "correct", "incorrect"[, "corrupted_prompt"]}`` lines."""
    k: int = 10
    """Features kept per prompt (or per position) and rows of the top-feature table."""
    n_prompts: int = 32
    """Prompts built (ioi) or read from the start of the .jsonl file."""
    method: str = "atp"
    """Node attribution: ``atp`` (one gradient) or ``ig`` (integrated gradients)."""
    ig_steps: int = 10
    """Interpolation steps of integrated gradients."""
    ablation: str = "mean"
    """Faithfulness curve: features outside the circuit are ``mean``- or ``zero``-ablated."""
    ablate_errors: bool = False
    """Faithfulness curve: also ablate the SAE error nodes (default: they keep their values)."""
    keep_per: str = "position"
    """Top-k keeping: ``position`` (k per position) or ``prompt`` (k per prompt)."""
    rank_by: str = "activation"
    """Top-k keeping ranks features by ``activation`` value or ``attribution`` (|IE|)."""
    seed: int = 0
    """Seeds the IOI prompts (names, places, objects, templates)."""

    def __post_init__(self) -> None:
        require(self.k >= 1, f"circuit k must be at least 1, got {self.k}")
        require(self.n_prompts >= 1, f"--n-prompts must be at least 1, got {self.n_prompts}")
        require(self.ig_steps >= 1, f"--ig-steps must be at least 1, got {self.ig_steps}")
        for name, value, allowed in (
            ("method", self.method, tuple(ATTRIBUTION_METHODS)),
            ("ablation", self.ablation, ABLATIONS),
            ("keep_per", self.keep_per, KEEP_PER),
            ("rank_by", self.rank_by, RANK_BY),
        ):
            require(value in allowed, f"circuit {name} must be one of {allowed}, got {value!r}")
