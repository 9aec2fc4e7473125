"""The one list of SAE architectures: it drives loading, the CLI choices, folder names and the
checks a run makes before it starts.

Example::

    check_run_saes(cfg.saes)                          # one-line errors before any model loads
    sae_folder_name(SAEConfig(k=32))                  # 'blocks.6.hook_resid_post-topk-x16-k32'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from saelab.config import SAEConfig, require
from saelab.errors import SaelabError
from saelab.registry import Registry

if TYPE_CHECKING:
    from saelab.saes.base import SparseAutoencoder

ARCHITECTURES: Registry[type[SparseAutoencoder]] = Registry("SAE architecture", sorted_names=True)
"""saelab architecture name → class, filled by :func:`register` as each module is imported."""

_T = TypeVar("_T", bound="type[SparseAutoencoder]")


def register(cls: _T) -> _T:
    """Class decorator: register the architecture under its ``architecture`` name."""
    return ARCHITECTURES.register(cls.architecture)(cls)


architecture_class = ARCHITECTURES.lookup
"""The class of an architecture name; an unknown name lists the architectures."""


def sae_folder_name(cfg: SAEConfig) -> str:
    """The SAE's folder inside its run: ``cfg.name``, else ``HOOK-ARCH-WIDTH-SETTING`` with
    ``WIDTH`` ``x16`` (expansion) or ``w4096`` (width) and the architecture's
    :meth:`~saelab.saes.base.SparseAutoencoder.folder_setting` (``k32``, ``l1_5``, ...); an SAE
    with its own ``seed`` gets ``-seedN`` after either."""
    seed = "" if cfg.seed is None else f"-seed{cfg.seed}"
    if cfg.name:
        return cfg.name + seed
    setting = architecture_class(cfg.architecture).folder_setting(cfg)
    width = f"w{cfg.width}" if cfg.width else f"x{cfg.expansion}"
    return f"{cfg.hook}-{cfg.architecture}-{width}-{setting}{seed}"


def check_sae_config(cfg: SAEConfig) -> None:
    """One-line error unless ``cfg`` names a known architecture whose settings it can run (a
    transcoder needs ``output_hook``, an autoencoder must not have one, ...)."""
    architecture_class(cfg.architecture).check_config(cfg)


def check_run_saes(saes: Sequence[SAEConfig]) -> None:
    """:func:`check_sae_config` for each SAE of a run, and no two sharing a folder."""
    from saelab.saes.replacement import check_layered_sae, set_folder_name

    for cfg in saes:
        if cfg.layers is not None:  # a replacement set: its members are checked as it expands
            check_layered_sae(cfg)
        else:
            check_sae_config(cfg)
    names = [set_folder_name(s) if s.layers is not None else sae_folder_name(s) for s in saes]
    shared = sorted({n for n in names if names.count(n) > 1})
    require(
        not shared,
        f"two SAEs would share the folder {shared[0] if shared else ''}; "
        "give them distinct `name` fields",
    )


def from_saelens_architecture(name: str) -> type[SparseAutoencoder]:
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
