"""Other tools' SAE layouts, read and written, so users can bring and take SAEs.

Three layouts, one registry (:data:`FORMATS`), which also drives the ``saelab convert`` choices:
``saelens`` (saelab's own folders, :mod:`.saelens`), ``sparsify`` (EleutherAI, :mod:`.sparsify`)
and ``dictionary_learning`` (saprmarks, :mod:`.dictionary_learning`). Each module says how its
files map onto saelab's tensors; :mod:`.common` holds what they share (bias folding, the
``saelab`` section that makes saelab → X → saelab keep every name).

Example::

    done = convert_sae("runs/demo/my-sae", "exports/my-sae", to="sparsify")
    loaded = read_sae("exports/my-sae")        # auto-detected; loaded.sae is a TopKSAE
"""

from saelab.saes.formats.common import LoadedSAE, SAEFormat
from saelab.saes.formats.convert import (
    FORMATS,
    Conversion,
    convert_sae,
    detect_format,
    read_sae,
    write_sae,
)
from saelab.saes.formats.dictionary_learning import DL_CLASSES

__all__ = [
    "DL_CLASSES",
    "FORMATS",
    "Conversion",
    "LoadedSAE",
    "SAEFormat",
    "convert_sae",
    "detect_format",
    "read_sae",
    "write_sae",
]
