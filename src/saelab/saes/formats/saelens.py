"""``saelens``: saelab's own folders (``cfg.json`` + ``sae_weights.safetensors``), read and
written by :mod:`saelab.saes.storage`, which SAELens loads as they are."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saelab.saes.base import SparseAutoencoder
from saelab.saes.formats.common import LoadedSAE, SAEFormat, without_hooks
from saelab.saes.storage import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, save_sae


def _holds_saelens(path: Path) -> bool:
    return (path / WEIGHTS_FILENAME).is_file()


def _read_saelens(path: Path, hook: str | None, output_hook: str | None) -> LoadedSAE:
    sae = load_sae(path)
    if hook or output_hook:
        sae.cfg = dataclasses.replace(
            sae.cfg, hook=hook or sae.cfg.hook, output_hook=output_hook or sae.cfg.output_hook
        )
    return LoadedSAE(sae, "saelens")


def _write_saelens(sae: SparseAutoencoder, folder: Path) -> list[str]:
    save_sae(sae, folder, metadata=without_hooks(sae.metadata))
    return []


FORMAT = SAEFormat(
    "saelens", f"{CFG_FILENAME} + {WEIGHTS_FILENAME}", _holds_saelens, _read_saelens, _write_saelens
)
