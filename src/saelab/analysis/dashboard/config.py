"""The options of ``saelab dashboard`` (:class:`DashboardConfig`; the statistics it computes
take :class:`~saelab.analysis.features.config.FeaturesConfig`) and ``saelab serve``
(:class:`ServeConfig`). Field names are the keywords of
:func:`~saelab.analysis.dashboard.site.build_dashboard` and
:func:`~saelab.analysis.dashboard.serve.serve`.

Example::

    cfg = DashboardConfig(top=100)
    build_dashboard("runs/sae/my-sae", "site", **dataclasses.asdict(cfg))
"""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import require


@dataclass(frozen=True)
class DashboardConfig:
    stats_dir: str | None = None
    """Use the feature statistics in this folder. Default: SAE_DIR/features, computed when
    missing."""
    recompute: bool = False
    """Compute the statistics even where they exist."""
    features: str | None = None
    """Pages only for these features, e.g. 0-99,200. Default: every feature."""
    top: int | None = None
    """Pages only for the N densest features. Default: every feature."""

    def __post_init__(self) -> None:
        require(self.top is None or self.top >= 1, f"--top must be at least 1, got {self.top}")
        require(
            self.features is None or self.top is None,
            "give --features or --top, not both",
        )


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port to listen on; 0 picks a free one."""

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65_535, f"--port must be in 0..65535, got {self.port}")
