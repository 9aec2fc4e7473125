"""Output locations checked before long work starts, so that a two-hour run does not fail at
the end on a read-only folder, a file in the way or a full disk.

Example::

    check_output_location("runs/site", need_bytes=pages * DASHBOARD_PAGE_BYTES)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from saelab.atomic import remove_leftovers
from saelab.errors import SaelabError


def check_output_location(
    path: str | Path,
    *,
    kind: Literal["folder", "file"] = "folder",
    need_bytes: int = 0,
    what: str = "--out",
    replaced: bool = False,
) -> Path:
    """Fail with one line unless ``path`` can receive the output: no existing file is in the way
    of a folder (or a folder in the way of a file), the nearest existing folder is writable (and
    not on a read-only mount: root ignores permission bits, not those), and it has ``need_bytes``
    free. ``replaced``: the folder is written beside and renamed onto ``path`` (its parent must
    be writable too). Leftovers of killed runs of this command are removed first (see
    :func:`~saelab.atomic.remove_leftovers`). ``what`` names the option that chose ``path``.
    Creates nothing; returns ``path``.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise SaelabError(f"{path}: is a broken link — remove it or pass another {what}")
    nearest = next(p for p in (path, *path.absolute().parents) if p.exists())
    if kind == "file" and path.is_dir():
        raise SaelabError(f"{path}: is a folder, not a file — remove it or pass a file as {what}")
    if not nearest.is_dir() and (kind == "folder" or nearest != path):
        where = "is a file" if nearest == path else f"{nearest} is a file"
        fix = f"a folder as {what}" if kind == "folder" else f"another {what}"
        raise SaelabError(f"{path}: {where}, not a folder — remove the file or pass {fix}")
    if nearest == path and kind == "file":
        nearest = path.absolute().parent
    folders = [nearest] if nearest != path or not replaced else [nearest, nearest.parent]
    for folder in folders:
        _check_writable(path, folder, what)
    remove_leftovers(path)
    free = shutil.disk_usage(nearest).free
    if free < need_bytes:
        raise SaelabError(
            f"{path}: not enough free space (about {_size(need_bytes)} needed, {_size(free)} free "
            f"on {nearest}) — free space on that disk or pass another {what}"
        )
    return path


def _check_writable(path: Path, folder: Path, what: str) -> None:
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise SaelabError(
            f"{path}: {folder} is on a read-only file system — choose a writable {what}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SaelabError(
            f"{path}: permission denied ({folder} is not writable) — choose a writable {what}"
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
