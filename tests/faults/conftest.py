"""Output locations that fail the way disks do: read-only, full, or a file in the way.

As root (where ``mount`` works) the faults are real: a tmpfs mounted read-only, or a tiny tmpfs
filled to the last page. Elsewhere root's privilege is missing, so the same errno is simulated:
the file system reports itself read-only or full (``os.statvfs``, ``shutil.disk_usage``) and
every atomic write into the location raises EROFS or ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import saelab.atomic

IN_THE_WAY = b"a file in the way\n"


def _run(*command: str) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def can_mount(tmp_path_factory) -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = tmp_path_factory.mktemp("probe")
    if not _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)):
        return False
    _run("umount", str(probe))
    return True


def _fill(folder: Path) -> None:
    """Write until the disk says no: the free space left is less than a page."""
    with contextlib.suppress(OSError), (folder / "filler.bin").open("wb", buffering=0) as file:
        while True:
            file.write(b"\0" * 4096)
    assert shutil.disk_usage(folder).free == 0


def _simulate(monkeypatch: pytest.MonkeyPatch, root: Path, fault: str) -> None:
    """The location ``root`` behaves as a read-only or full file system."""
    code = errno.EROFS if fault == "read-only" else errno.ENOSPC

    def inside(path: str | os.PathLike) -> bool:
        return Path(path).absolute().is_relative_to(root)

    real_new_temp, real_statvfs, real_usage = (
        saelab.atomic._new_temp,
        os.statvfs,
        shutil.disk_usage,
    )

    def new_temp(path: Path, tag: str | None, *, folder: bool) -> Path:
        if inside(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_new_temp(path, tag, folder=folder)

    def statvfs(path):
        found = real_statvfs(path)
        if fault != "read-only" or not inside(path):
            return found
        fields = list(found)
        fields[8] |= os.ST_RDONLY  # f_flag
        return os.statvfs_result(fields)

    def disk_usage(path):
        found = real_usage(path)
        return found._replace(free=0) if fault == "full" and inside(path) else found

    monkeypatch.setattr(saelab.atomic, "_new_temp", new_temp)
    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


@pytest.fixture
def faulty_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_mount: bool
) -> Iterator[Callable[[str, Callable[[Path], None]], Path]]:
    """``make(fault, fill)``: a location holding what ``fill(folder)`` put there (an earlier
    result), then made read-only or full; for ``"file"`` a plain file."""
    mounted: list[Path] = []

    def make(fault: str, fill: Callable[[Path], None]) -> Path:
        root = tmp_path / "location"
        if fault == "file":
            root.write_bytes(IN_THE_WAY)
            return root
        root.mkdir()
        if can_mount:
            assert _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root))
            mounted.append(root)
        fill(root)
        if not can_mount:
            _simulate(monkeypatch, root.absolute(), fault)
        elif fault == "read-only":
            assert _run("mount", "-o", "remount,ro", str(root))
        else:
            _fill(root)
        return root

    yield make
    for root in mounted:
        if not _run("umount", str(root)):
            _run("umount", "-l", str(root))
