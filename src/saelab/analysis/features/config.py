"""The options of ``saelab features`` (and of ``saelab dashboard`` when it computes the
statistics): :class:`FeaturesConfig`. Field names are the keywords of
:func:`~saelab.analysis.features.compute_feature_stats`.

Example::

    cfg = FeaturesConfig(tokens=16_384, top_k=10)
    write_feature_stats("runs/sae/blocks.6.hook_resid_post-topk-x16-k32", **dataclasses.asdict(cfg))
"""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import require


@dataclass(frozen=True)
class FeaturesConfig:
    tokens: int = 65_536
    """Tokens of text the statistics are gathered over."""
    context: int = 128
    """Tokens per sequence, BOS included."""
    top_k: int = 20
    """Top-activating examples kept per feature."""
    model: str | None = None
    """Model the SAE reads. Default: the one the SAE was trained on."""
    data: str | None = None
    """Text (a text spec). Default: the SAE's training text."""
    batch_size: int = 16
    """Sequences per model forward pass."""
    seed: int = 0
    """Seed of the text order and of the quantile samples."""
    device: str = "cpu"
    """Where the model and the SAE run: cpu or cuda."""

    def __post_init__(self) -> None:
        require(self.tokens >= 1, f"--tokens must be positive, got {self.tokens}")
        require(self.context >= 2, f"--context must be at least 2, got {self.context}")
        require(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"--device must be cpu or cuda, got {self.device!r}",
        )
