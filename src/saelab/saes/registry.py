"""The one list of SAE architectures: it drives loading, the CLI choices and the docs."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from saelab.saes.base import SparseAutoencoder

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}
"""saelab architecture name → class, filled by :func:`register` as each module is imported."""

_T = TypeVar("_T", bound="type[SparseAutoencoder]")


def register(cls: _T) -> _T:
    ARCHITECTURES[cls.architecture] = cls
    return cls


def architecture_class(name: str) -> type[SparseAutoencoder]:
    from saelab.errors import SaelabError

    if name not in ARCHITECTURES:
        raise SaelabError(
            f"unknown SAE architecture {name!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def from_saelens_architecture(name: str) -> type[SparseAutoencoder]:
    from saelab.errors import SaelabError

    # Several saelab architectures may save as one SAELens architecture (batchtopk and matryoshka
    # as "jumprelu"); a file of it loads as the saelab architecture of the same name, if any.
    if name in ARCHITECTURES and ARCHITECTURES[name].saelens_architecture == name:
        return ARCHITECTURES[name]
    for cls in ARCHITECTURES.values():
        if cls.saelens_architecture == name:
            return cls
    supported = ", ".join(sorted({c.saelens_architecture for c in ARCHITECTURES.values()}))
    raise SaelabError(
        f"SAE architecture {name!r} in cfg.json is not supported yet; supported: {supported}"
    )
