"""The static dashboard site: ``index.html``, ``features/<id>.html`` and ``dashboard.json``.

The site is written into a hidden temp folder beside ``out`` and renamed onto it only when every
page is written, so an error or Ctrl-C never leaves half a site; an older dashboard in ``out`` is
replaced, any other non-empty folder is refused. The pages need nothing outside the folder (no
CDN, no fonts, no network), so they work offline, from ``file://`` and from ``saelab serve``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from saelab import __version__
from saelab.analysis.dashboard.pages import (
    INDEX_FILENAME,
    PAGES_DIRNAME,
    feature_page,
    index_page,
    preview_and_search_tokens,
    shown_meta,
)
from saelab.analysis.dashboard.render import feature_ids
from saelab.atomic import write_folder_atomically
from saelab.errors import SaelabError
from saelab.outputs import check_output_location
from saelab.saes.storage import CFG_FILENAME

if TYPE_CHECKING:  # annotations only: `saelab serve` needs no model stack
    from saelab.analysis.features import FeatureStats

log = logging.getLogger(__name__)

MANIFEST_FILENAME = "dashboard.json"
"""Marks a folder as a saelab dashboard (and so safe to replace); lists what it holds."""
DEFAULT_TOKENS = 65_536
"""Tokens the statistics are computed over when none are given (as ``saelab features``)."""


def parse_feature_selection(spec: str, available: Sequence[int]) -> list[int]:
    """``"0-99,200,300-310"`` → sorted distinct feature ids, each one of ``available``."""
    have = set(available)
    span = f"{min(have)}-{max(have)}" if have else "none"
    chosen: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise SaelabError(
                f"--features {spec!r}: {part!r} is not a feature id or range; "
                "write e.g. 0-99,200,300-310"
            ) from None
        wanted = set(range(lo, hi + 1))
        if lo > hi or not wanted <= have:
            raise SaelabError(
                f"--features {spec!r}: {part!r} is reversed or outside the features these "
                f"statistics hold ({span}, {len(have)} features)"
            )
        chosen |= wanted
    if not chosen:
        raise SaelabError(f"--features {spec!r} names no features; write e.g. 0-99")
    return sorted(chosen)


def choose_pages(
    stats: FeatureStats, features: str | None = None, top: int | None = None
) -> list[int]:
    """Feature ids that get a page: all (default), a ``features`` selection such as ``"0-99"``,
    or the ``top`` N features by density (dead features never count among them)."""
    ids = feature_ids(stats)
    if features is not None and top is not None:
        raise SaelabError("give either --features or --top, not both")
    if features is not None:
        return parse_feature_selection(features, ids)
    if top is not None:
        if top < 1:
            raise SaelabError(f"--top {top}: give a positive number of features")
        density = [float(d) for d in stats.density.tolist()]
        alive = (i for i in range(len(ids)) if density[i] > 0)
        ranked = sorted(alive, key=lambda i: (-density[i], ids[i]))
        return sorted(ids[i] for i in ranked[:top])
    return sorted(ids)


def default_title(meta: dict[str, Any]) -> str:
    """``SAE folder name · hook · model`` from the statistics' metadata, what it names of them."""
    parts = [Path(str(meta["sae_dir"])).name] if meta.get("sae_dir") else []
    parts += [str(meta[k]) for k in ("hook", "model") if meta.get(k)]
    return " · ".join(parts) if parts else "saelab feature dashboard"


def _is_dashboard(folder: Path) -> bool:
    return (folder / MANIFEST_FILENAME).is_file() and (folder / INDEX_FILENAME).is_file()


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SaelabError(f"{out} is a file; give --out a new folder or an old dashboard folder")
    if out.is_dir() and any(out.iterdir()) and not _is_dashboard(out):
        raise SaelabError(
            f"{out} is a non-empty folder that is not a saelab dashboard; "
            "give --out a new or empty folder (an old dashboard folder is replaced)"
        )


PAGE_BYTES = 40_960
INDEX_BYTES_PER_FEATURE = 1_024
"""Rough sizes for the free-space check: a feature page (its top examples) and a feature's
row in the index. Measured with the default 20 examples: pages of 14-71 kB (median 34 kB),
about 0.9 kB of index per feature."""


def _site_bytes(n_features: int, n_pages: int) -> int:
    return n_pages * PAGE_BYTES + n_features * INDEX_BYTES_PER_FEATURE


def write_dashboard(
    stats: FeatureStats,
    out: str | Path,
    pages: Iterable[int] | None = None,
    title: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the dashboard of ``stats`` to the folder ``out``; returns ``out/index.html``.

    The index lists every feature; ``pages`` (feature ids, default: all) also get
    ``features/<id>.html``. Logs the time taken.

    Example::

        stats = FeatureStats.load("runs/demo/SAE/features")
        write_dashboard(stats, "runs/demo/dashboard", pages=range(100))
    """
    out = Path(out)
    _check_target(out)
    ids = feature_ids(stats)
    row_of = {fid: i for i, fid in enumerate(ids)}
    page_ids = sorted(set(ids if pages is None else (int(f) for f in pages)))
    if unknown := [f for f in page_ids if f not in row_of]:
        raise SaelabError(
            f"no statistics for feature(s) {unknown[:5]}; choose pages among the "
            f"{len(ids)} features these statistics hold"
        )
    neighbours = {
        row_of[f]: (
            page_ids[k - 1] if k > 0 else None,
            page_ids[k + 1] if k + 1 < len(page_ids) else None,
        )
        for k, f in enumerate(page_ids)
    }
    title = title or default_title(stats.meta)
    check_output_location(out, need_bytes=_site_bytes(len(ids), len(page_ids)), replaced=True)
    start = time.perf_counter()
    with write_folder_atomically(out) as tmp:
        pages_dir = tmp / PAGES_DIRNAME
        pages_dir.mkdir()
        previews: list[list[str]] = []
        search: list[list[str]] = []
        density = [float(d) for d in stats.density.tolist()]
        for i in tqdm(range(len(ids)), desc="dashboard", unit="feature", disable=not progress):
            top = stats.top_examples(i) if density[i] > 0 else []
            preview, near = preview_and_search_tokens(top)
            previews.append(preview)
            search.append(near)
            if i in neighbours:
                html_text = feature_page(stats, i, title, *neighbours[i], top=top)
                (pages_dir / f"{ids[i]}.html").write_text(html_text, encoding="utf-8")
        (tmp / INDEX_FILENAME).write_text(
            index_page(stats, previews, search, neighbours.keys(), title), encoding="utf-8"
        )
        seconds = time.perf_counter() - start
        manifest = {
            "saelab_version": __version__,
            "title": title,
            "n_features": len(ids),
            "n_tokens": int(stats.n_tokens),
            "pages": len(page_ids),
            "seconds": round(seconds, 3),
            "meta": shown_meta(stats.meta),
        }
        (tmp / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    log.info(
        "dashboard of %d features (%d pages) written to %s in %.1f s (%.2f s per 1000 pages)",
        len(ids),
        len(page_ids),
        out,
        seconds,
        1000 * seconds / max(len(page_ids), 1),
    )
    return out / INDEX_FILENAME


def load_or_compute_stats(
    sae_dir: str | Path,
    stats_dir: str | Path | None = None,
    recompute: bool = False,
    progress: bool = True,
    **compute: Any,
) -> FeatureStats:
    """The feature statistics for the dashboard of the SAE at ``sae_dir``.

    ``stats_dir`` given: the statistics saved there (a one-line error when they are missing or
    corrupt). Otherwise ``SAE_DIR/features`` when it holds them, else they are computed with
    :func:`saelab.analysis.features.write_feature_stats` (keywords ``compute``: ``tokens``,
    ``context``, ``model``, ``data``, ``device``; ``None`` means the default) and saved there for
    next time. ``recompute`` computes them in any case, into ``stats_dir`` or ``SAE_DIR/features``.
    """
    # Here, not at the top: the features package loads the model stack, which `saelab serve`
    # (it imports this module) does without.
    from saelab.analysis.features import (
        DEFAULT_STATS_DIRNAME,
        META_FILENAME,
        FeatureStats,
        write_feature_stats,
    )

    sae_dir = Path(sae_dir)
    target = Path(stats_dir) if stats_dir is not None else sae_dir / DEFAULT_STATS_DIRNAME
    given = sorted(k for k, v in compute.items() if v is not None)
    if not recompute and (stats_dir is not None or (target / META_FILENAME).is_file()):
        stats = FeatureStats.load(target)  # a one-line error when missing or corrupt
        if given:
            log.warning(
                "using the feature statistics in %s (%d tokens); %s ignored: pass --recompute "
                "to compute them again",
                target,
                stats.n_tokens,
                ", ".join(given),
            )
        return stats
    if not (sae_dir / CFG_FILENAME).is_file():
        raise SaelabError(
            f"{sae_dir} is not an SAE folder (no {CFG_FILENAME}); pass the folder of a saved SAE"
        )
    log.info("computing feature statistics of %s into %s", sae_dir, target)
    kwargs = {k: v for k, v in compute.items() if v is not None}
    kwargs.setdefault("tokens", DEFAULT_TOKENS)
    stats, _ = write_feature_stats(sae_dir, target, progress=progress, **kwargs)
    return stats


def build_dashboard(
    sae_dir: str | Path,
    out: str | Path,
    *,
    stats_dir: str | Path | None = None,
    recompute: bool = False,
    features: str | None = None,
    top: int | None = None,
    progress: bool = True,
    **compute: Any,
) -> tuple[Path, FeatureStats]:
    """``saelab dashboard``: statistics (read or computed, see :func:`load_or_compute_stats`),
    then the site in ``out``. Returns ``out/index.html`` and the statistics."""
    stats = load_or_compute_stats(sae_dir, stats_dir, recompute, progress, **compute)
    pages = choose_pages(stats, features=features, top=top)
    return write_dashboard(stats, out, pages=pages, progress=progress), stats
