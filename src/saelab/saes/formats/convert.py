"""The layouts' one registry (:data:`FORMATS`) and what users call: detect, read, write,
convert. An architecture that is not in :data:`~saelab.saes.registry.ARCHITECTURES` is refused
as "not supported yet"."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from saelab.atomic import write_folder_atomically
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.formats import dictionary_learning, saelens, sparsify
from saelab.saes.formats.common import LoadedSAE, SAEFormat

log = logging.getLogger(__name__)

FORMATS: dict[str, SAEFormat] = {
    fmt.name: fmt for fmt in (saelens.FORMAT, sparsify.FORMAT, dictionary_learning.FORMAT)
}
"""Every layout saelab reads and writes, by the name ``saelab convert --to/--from`` uses."""


@dataclass
class Conversion:
    """What :func:`convert_sae` did."""

    sae: SparseAutoencoder
    source_format: str
    target_format: str
    notes: list[str]


def detect_format(path: str | Path) -> str:
    """The layout of the SAE in folder ``path`` (a key of :data:`FORMATS`), from its files."""
    path = _existing_folder(path)
    found = [name for name, fmt in FORMATS.items() if fmt.holds(path)]
    if len(found) > 1:
        raise SaelabError(
            f"{path} holds files of several layouts ({', '.join(found)}); pick one with --from"
        )
    if not found:
        expected = "; ".join(f"{fmt.files} ({name})" for name, fmt in FORMATS.items())
        raise SaelabError(f"no SAE found in {path}: expected {expected}")
    return found[0]


def read_sae(
    path: str | Path,
    fmt: str = "auto",
    *,
    hook: str | None = None,
    output_hook: str | None = None,
) -> LoadedSAE:
    """Read the SAE in folder ``path`` (layout ``fmt`` or detected) in model units.

    ``hook`` / ``output_hook`` (transcoders) name what the files do not, or replace what they say.
    """
    reader = None if fmt == "auto" else _format(fmt)
    path = _existing_folder(path)
    reader = reader or FORMATS[detect_format(path)]
    loaded = reader.read(path, hook, output_hook)
    if output_hook and loaded.sae.cfg.output_hook is None:
        raise SaelabError(
            f"--output-hook is only for transcoders, and {path} holds a "
            f"{loaded.sae.architecture} SAE; drop it"
        )
    for note in loaded.notes:
        log.debug("%s: %s", path, note)
    return loaded


def write_sae(sae: SparseAutoencoder, path: str | Path, fmt: str) -> list[str]:
    """Write ``sae`` to the new (or empty) folder ``path`` in layout ``fmt``; returns notes.

    The files are written into a hidden folder beside ``path`` and renamed onto it, so ``path``
    never holds half an SAE; an existing SAE is never overwritten.
    """
    target = _format(fmt)
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SaelabError(f"{path} already exists and is not empty; pass a new folder")
    with write_folder_atomically(path, "convert") as stage:
        notes = target.write(sae, stage)
        if path.exists():
            # The empty folder the user made for it; rmdir refuses one that filled up meanwhile,
            # so the rename below never replaces an SAE.
            path.rmdir()
    return notes


def convert_sae(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    from_: str = "auto",
    hook: str | None = None,
    output_hook: str | None = None,
) -> Conversion:
    """Read the SAE in ``src`` (layout ``from_``, or detected) and write it to ``dst`` as ``to``.

    Example::

        convert_sae("ckpt/layers.6", "saes/l6", to="saelens")   # a sparsify SAE into saelab's
    """
    target = _format(to)
    loaded = read_sae(src, from_, hook=hook, output_hook=output_hook)
    notes = loaded.notes + write_sae(loaded.sae, dst, target.name)
    return Conversion(loaded.sae, loaded.format, target.name, notes)


def _existing_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise SaelabError(f"{path} does not exist; pass the folder that holds the SAE")
    if not path.is_dir():
        raise SaelabError(f"{path} is a file; pass the folder that holds it and its config")
    return path


def _format(name: str) -> SAEFormat:
    if name not in FORMATS:
        raise SaelabError(f"unknown SAE layout {name!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]
