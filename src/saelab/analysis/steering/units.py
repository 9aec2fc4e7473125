"""The ``max_act`` unit of SAE-feature steering, read from saved feature statistics.

``saelab features`` already measured every feature's largest activation, over more tokens than
steering would read again. :func:`stats_max_act` takes it from ``SAE_DIR/features`` (or a folder
named with ``--stats``) after checking that the statistics are of this SAE: same hook, widths and
architecture, the same SAE folder when they record one and do not live inside it, and a row for
the feature (statistics of a slice of the features hold only those, listed in ``feature_ids``).

Example:
    >>> folder = find_stats_dir("runs/demo/blocks.6.hook_resid_post-topk-x16-k32", None)
    >>> stats_max_act(folder, sae, 3, sae_dir="runs/demo/blocks.6.hook_resid_post-topk-x16-k32")
    {'max_act': 7.25, 'max_act_source': 'stats', 'stats': '/…/features', 'stats_tokens': 65536}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from saelab.analysis.features import DEFAULT_STATS_DIRNAME, META_FILENAME, FeatureStats
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder


def find_stats_dir(sae_dir: str | Path | None, stats: str | Path | None) -> Path | None:
    """The statistics folder to read: ``stats`` when given (it must hold statistics), else
    ``SAE_DIR/features`` when it holds them, else None (the unit is measured)."""
    if stats is not None:
        return Path(stats).expanduser()
    if sae_dir is None:
        return None
    default = Path(sae_dir).expanduser() / DEFAULT_STATS_DIRNAME
    return default if (default / META_FILENAME).is_file() else None


def _same_folder(recorded: str, sae_dir: str | Path) -> bool:
    """Whether the SAE folder the statistics record is ``sae_dir``. A relative record was
    relative to wherever ``saelab features`` ran, so its trailing components must match."""
    here = Path(sae_dir).expanduser().resolve()
    path = Path(recorded).expanduser()
    if path.resolve() == here:
        return True
    parts = Path(os.path.normpath(path)).parts
    return not path.is_absolute() and ".." not in parts and here.parts[-len(parts) :] == parts


def _check_same_sae(
    stats: FeatureStats, directory: Path, sae: SparseAutoencoder, sae_dir: str | Path | None
) -> None:
    fix = "pass --stats with this SAE's statistics (saelab features SAE_DIR) or --max-act X"
    expected = {
        "hook": sae.cfg.hook,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "architecture": sae.architecture,
    }
    for key, value in expected.items():
        if key in stats.meta and stats.meta[key] != value:
            raise SaelabError(
                f"the feature statistics in {directory} are of another SAE ({key} "
                f"{stats.meta[key]!r}, this SAE's is {value!r}); {fix}"
            )
    recorded = stats.meta.get("sae_dir")
    inside = (
        sae_dir is not None and directory.resolve().parent == Path(sae_dir).expanduser().resolve()
    )
    # Statistics inside the SAE's folder moved with it; elsewhere the recorded folder decides.
    if recorded and sae_dir is not None and not inside and not _same_folder(recorded, sae_dir):
        raise SaelabError(
            f"the feature statistics in {directory} are of the SAE at {recorded}, not "
            f"{sae_dir}; {fix}"
        )


def _row_of(stats: FeatureStats, feature: int, directory: Path) -> int:
    rows = (stats.feature_ids == feature).nonzero().flatten().tolist()
    if not rows:
        ids = stats.feature_ids
        held = f"{stats.n_features} features, {int(ids.min())}..{int(ids.max())}"
        raise SaelabError(
            f"feature {feature} is not in the feature statistics in {directory} (they hold "
            f"{held}); rerun saelab features for it, or pass --max-act X"
        )
    return rows[0]


def stats_max_act(
    directory: str | Path,
    sae: SparseAutoencoder,
    feature: int,
    *,
    sae_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Feature ``feature``'s max activation from the statistics in ``directory``, with where it
    came from, for ``vector.json``: ``max_act``, ``max_act_source`` (``"stats"``), ``stats``
    (the folder), ``stats_tokens`` and ``stats_dataset``.

    One-line errors when the statistics are of another SAE or hook (``sae_dir``, when known, is
    compared with the folder they record), lack the feature, or saw it never fire.
    """
    directory = Path(directory).expanduser()
    stats = FeatureStats.load(directory)
    _check_same_sae(stats, directory, sae, sae_dir)
    row = _row_of(stats, feature, directory)
    max_act = float(stats.max_act[row])
    if not max_act > 0:
        raise SaelabError(
            f"feature {feature} never fired on the {stats.n_tokens} tokens of the feature "
            f"statistics in {directory}; use --sae-units resid_norm or activation, or --max-act X"
        )
    return {
        "max_act": max_act,
        "max_act_source": "stats",
        "stats": str(directory.resolve()),
        "stats_tokens": stats.n_tokens,
        "stats_dataset": stats.meta.get("dataset"),
    }
