"""The options of ``saelab cache``: :class:`CacheConfig`. Field names are the keywords of
:func:`~saelab.data.cache.cache_model_activations` (and the
:class:`~saelab.data.cache.CacheArguments` it records), with ``model`` for its ``model_name``.

Example::

    cfg = CacheConfig(hooks=("blocks.3.hook_resid_post",), tokens=200_000)
"""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import DataConfig, SAEConfig, TrainConfig, require

_DATA = DataConfig()


@dataclass(frozen=True)
class CacheConfig:
    model: str = "default"
    """Model: hub id, local dir, .gguf file or 'default' (SmolLM2-135M)."""
    hooks: tuple[str, ...] = (SAEConfig().hook,)
    """Hook points to cache; repeat the flag for several."""
    tokens: int = TrainConfig().tokens
    """Tokens (rows) to cache."""
    dataset: str = _DATA.dataset
    """Text source: 'default' (Python docs), a .txt/.jsonl/.parquet path, or a HF dataset."""
    context: int = _DATA.context
    """Tokens per sequence, BOS included."""
    model_batch_size: int = _DATA.model_batch_size
    """Sequences per model forward pass."""
    seed: int = 0
    """Seed of the text order, the only randomness in writing a cache."""
    device: str = "cpu"
    """Where the model runs: cpu or cuda."""
    shard_tokens: int = 65_536
    """Rows per shard file."""
    dtype: str = "float32"
    """Stored dtype: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        # The rest (hooks, sizes, dtype) is checked by CacheArguments, which the cache builds
        # from these values before it loads the model.
        require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"--device must be cpu or cuda, got {self.device!r}",
        )
