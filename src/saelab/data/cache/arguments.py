"""The arguments of ``saelab cache``: everything that decides a cache's bytes.

Each field's docstring is its ``saelab cache`` flag's help. A resumed cache must be written with
the same arguments; :meth:`CacheArguments.recorded` is the form kept and compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from saelab.config import require, require_packing
from saelab.data.cache.index import CACHE_DTYPES, local_or_name


@dataclass(frozen=True)
class CacheArguments:
    """Everything that decides a cache's bytes; a resumed cache must be written with the same."""

    model: str
    """Model name as given (a local folder is recorded as its absolute path)."""
    hooks: tuple[str, ...]
    """Hook points, in order, duplicates dropped."""
    tokens: int
    """Rows (kept tokens) to cache in all."""
    dataset: str = "default"
    """Text spec (a local file is recorded as its absolute path)."""
    context: int = 128
    """Tokens per sequence."""
    model_batch_size: int = 32
    """Sequences per model forward pass."""
    seed: int = 0
    """Seed of the text order: the only randomness in writing a cache."""
    skip_positions: int = 1
    """Leading positions of each sequence that are not cached (1: BOS)."""
    norm_estimate_tokens: int = 32_768
    """The first rows whose mean norm gives each hook's scale."""
    shard_tokens: int = 65_536
    """Rows per shard."""
    dtype: str = "float32"
    """Stored dtype, one of :data:`CACHE_DTYPES`."""

    def __post_init__(self) -> None:
        require(bool(self.hooks), "no hook to cache; pass at least one --hook")
        require(self.tokens >= 1, f"--tokens must be positive, got {self.tokens}")
        require(self.shard_tokens >= 1, f"--shard-tokens must be positive, got {self.shard_tokens}")
        require(
            self.dtype in CACHE_DTYPES,
            f"--dtype {self.dtype!r} unknown; choose one of {', '.join(CACHE_DTYPES)}",
        )
        require(
            self.norm_estimate_tokens >= 1,
            f"--norm-estimate-tokens must be positive, got {self.norm_estimate_tokens}",
        )
        require_packing(self.context, self.model_batch_size, self.skip_positions)

    def recorded(self) -> dict[str, Any]:
        """The JSON form kept in ``progress.json`` and compared on resume."""
        out = asdict(self)
        out["hooks"] = list(self.hooks)
        out["model"] = local_or_name(self.model)
        out["dataset"] = local_or_name(self.dataset)
        return out
