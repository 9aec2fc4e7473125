"""The format of a finished activation cache: ``index.json`` and what it says about each shard.

Example:
    >>> index = read_cache_index("acts")
    >>> index.count, index.scales["blocks.6.hook_resid_post"]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.errors import SaelabError

INDEX_FILENAME = "index.json"
SHARD_PATTERN = "shard_{:05d}.safetensors"
FORMAT = "saelab-activation-cache"
FORMAT_VERSION = 1

CACHE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Dtypes a cache can store; the CLI's ``--dtype`` choices."""

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
"""How the safetensors header names each cache dtype."""

RECREATE = "recreate the cache with `saelab cache`"
"""The end of every message about a damaged or unreadable cache."""


@dataclass(frozen=True)
class CacheShard:
    file: str
    """File name inside the cache folder."""
    count: int
    """Rows (tokens) in this shard."""
    bytes: int
    """File size; a different size means a truncated or replaced file."""
    sha256: str
    """Checksum of the whole file."""


@dataclass(frozen=True)
class CacheIndex:
    """The content of ``index.json``."""

    model: str
    hooks: tuple[str, ...]
    d_in: dict[str, int]
    dtype: str
    scales: dict[str, float]
    """Per hook, √d_in / mean‖x‖ over the first ``norm_estimate_tokens`` rows (raw units)."""
    count: int
    """Rows in the whole cache."""
    shards: tuple[CacheShard, ...]
    context: int
    dataset: str
    seed: int
    skip_positions: int
    norm_estimate_tokens: int
    saelab_version: str

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        out["hooks"] = list(self.hooks)
        out["shards"] = [asdict(s) for s in self.shards]
        return out

    @property
    def cache_id(self) -> str:
        """A short fingerprint of the cached data (its shard checksums)."""
        joined = "\n".join(s.sha256 for s in self.shards)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    def metadata(self) -> dict[str, Any]:
        """What a saved SAE's ``cfg.json`` records about its training activations."""
        return {
            "model_name": self.model,
            "context_size": self.context,
            "dataset_path": self.dataset,
            "seqpos_slice": [self.skip_positions, None],
        }


def read_cache_index(cache_dir: str | Path) -> CacheIndex:
    """The index of the cache in ``cache_dir``; a missing or malformed one is a one-line error."""
    path = Path(cache_dir) / INDEX_FILENAME
    if not path.is_file():
        raise SaelabError(
            f"{cache_dir} is not an activation cache (no {INDEX_FILENAME}); create one with "
            "`saelab cache --out DIR`, or the writing was interrupted: run it again"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {raw.get('format')!r} v{raw.get('format_version')}")
        return CacheIndex(
            model=str(raw["model"]),
            hooks=tuple(raw["hooks"]),
            d_in={h: int(d) for h, d in raw["d_in"].items()},
            dtype=str(raw["dtype"]),
            scales={h: float(s) for h, s in raw["scales"].items()},
            count=int(raw["count"]),
            shards=tuple(CacheShard(**s) for s in raw["shards"]),
            context=int(raw["context"]),
            dataset=str(raw["dataset"]),
            seed=int(raw["seed"]),
            skip_positions=int(raw["skip_positions"]),
            norm_estimate_tokens=int(raw["norm_estimate_tokens"]),
            saelab_version=str(raw["saelab_version"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaelabError(
            f"{path} is not a saelab activation cache index ({reason}); {RECREATE}"
        ) from exc


def file_sha256(path: Path) -> str:
    """The sha256 checksum of the whole file, as recorded for each shard."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def local_or_name(spec: str) -> str:
    """Absolute path for a local file or folder (the cache is reused from elsewhere), else as is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec != "default" and path.exists() else spec
