"""Atomic writes of files and folders: a reader never sees a half-written one, even if the writer
dies."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates the file owner-only (0600); give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    # safetensors refuses views that share storage; contiguous clones keep it happy.
    owned = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return write_atomically(path, lambda p: save_file(owned, str(p), metadata=metadata))


def temp_folder_beside(path: str | Path, tag: str = "tmp") -> Path:
    """A new, empty hidden folder beside ``path`` (``.NAME.TAG-PID-RANDOM``) with the usual mode.

    The pid in the name tells a later run whether the writer is still alive.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}-{os.getpid()}-", dir=path.parent))
    # mkdtemp makes the folder owner-only (0700); a shared or served folder should read like any
    # other, and the mode survives the rename.
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def publish_folder(tmp: str | Path, path: str | Path) -> Path:
    """Rename the finished folder ``tmp`` onto ``path``.

    An old ``path`` is moved aside first and removed only after the rename, and put back if the
    rename fails: a reader finds the old folder or the new one, never a mixture or nothing.
    """
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = temp_folder_beside(path, "old")
        os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old / path.name, path)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def write_folder_atomically(path: str | Path, tag: str = "tmp") -> Iterator[Path]:
    """Yield a temp folder beside ``path``; when the block ends without error it replaces
    ``path`` (see :func:`publish_folder`), otherwise it is removed and ``path`` is untouched.

    Example::

        with write_folder_atomically("runs/site") as tmp:
            (tmp / "index.html").write_text(html)
    """
    tmp = temp_folder_beside(path, tag)
    try:
        yield tmp
        publish_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
