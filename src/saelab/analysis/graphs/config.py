"""The options of ``saelab graph``: the prompt, the targets, the size of the graph, pruning and
interventions."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import require


@dataclass(frozen=True)
class GraphConfig:
    prompt: str
    """The text whose next token the graph explains (BOS is put in front)."""
    target_logits: str = "10"
    """A number N: the top logits at the last position, at most N and no more than cover
    --logit-prob of the probability; or comma-separated tokens (each one token, e.g. ' a,
    the') to attribute exactly those."""
    logit_prob: float = 0.95
    """With a number N of --target-logits: stop adding logits once they cover this probability."""
    max_features: int = 1000
    """At most this many feature nodes (rows); more active features than this are chosen by
    their influence on the logits, the rest fold into the error node of their layer and
    position. Rows are dense: (max-features + logits) × (active features + layers × positions
    + positions) float32 numbers must fit in --max-adjacency-mb."""
    batch_size: int = 32
    """Targets per batched backward pass (memory grows with it: one prompt copy per target)."""
    max_adjacency_mb: float = 2048
    """Keep the rows dense (see --max-features) up to this many MB; beyond it, build the graph
    in chunks (features chosen up front by their direct effect on the logits, each batch folded
    to the chosen features' columns) and refuse only what does not fit even so."""
    node_threshold: float = 0.8
    """Pruning: keep the nodes carrying this fraction of the cumulative influence on the logits."""
    edge_threshold: float = 0.98
    """Pruning: keep the edges carrying this fraction of the cumulative edge influence."""
    ablate: tuple[str, ...] = ()
    """Features to set to zero, L:POS:ID (comma-separated or repeated): the unfrozen model is
    rerun with the edit and the measured change of the target logits is printed next to the
    graph's predicted change."""
    scale: tuple[str, ...] = ()
    """Features to multiply, L:POS:ID=F (as --ablate)."""
    clamp: tuple[str, ...] = ()
    """Features to set to a value, L:POS:ID=V (as --ablate)."""
    generate: int = 0
    """With an edit: also generate this many tokens greedily with and without it."""

    def __post_init__(self) -> None:
        for name in ("node_threshold", "edge_threshold", "logit_prob"):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            require(0 <= value <= 1, f"{flag} must be in [0, 1], got {value:g}")
        require(
            self.max_features >= 0, f"--max-features must be at least 0, got {self.max_features}"
        )
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.max_adjacency_mb > 0, "--max-adjacency-mb must be positive")
        require(self.generate >= 0, f"--generate must be at least 0, got {self.generate}")
        require(bool(self.target_logits.strip()), "--target-logits needs a number or tokens")
        if self.target_logits.strip().isdigit():
            require(int(self.target_logits) >= 1, "--target-logits must be at least 1")

    @property
    def n_target_logits(self) -> int | None:
        """The number of top logits, or None when tokens were given."""
        text = self.target_logits.strip()
        return int(text) if text.isdigit() else None

    @property
    def target_tokens(self) -> list[str]:
        """The target tokens given (empty with a number)."""
        if self.n_target_logits is not None:
            return []
        return [t for t in self.target_logits.split(",") if t != ""]
