"""The options of ``saelab convert``: :class:`ConvertConfig`. Field names are the keywords of
:func:`~saelab.saes.formats.convert_sae`.

Example::

    convert_sae("ckpt/layers.6", "saes/l6", **dataclasses.asdict(ConvertConfig(to="saelens")))
"""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import require
from saelab.saes.formats import FORMATS

AUTO = "auto"
"""``from_`` value that detects the source layout from its files."""


@dataclass(frozen=True)
class ConvertConfig:
    to: str
    """Layout to write."""
    from_: str = AUTO
    """Layout of SRC. Default: detected from its files."""
    hook: str | None = None
    """Hook name to record, when SRC's is missing or a raw module path."""
    output_hook: str | None = None
    """Transcoders: the hook they predict, when SRC does not record it."""

    def __post_init__(self) -> None:
        require(self.to in FORMATS, f"--to must be one of {', '.join(FORMATS)}, got {self.to!r}")
        require(
            self.from_ in (AUTO, *FORMATS),
            f"--from must be {AUTO} or one of {', '.join(FORMATS)}, got {self.from_!r}",
        )
