"""Atomic writes of files and folders: a reader never sees a half-written one, even if the writer
dies; what a killed writer leaves behind is found and removed by the next run.

Temp names are ``.NAME.COMMAND-PID-RANDOM`` (files end in ``.tmp``): :data:`COMMAND` is the
``saelab`` command that writes (``main()`` sets it), the pid tells a later run whether the writer
is still alive, and the first four hex digits of RANDOM name the host, so that a pid is only
judged on the machine it belongs to (a folder shared over the network). See
:func:`remove_leftovers`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saelab.errors import SaelabError

log = logging.getLogger(__name__)

COMMAND = "saelab"
"""The command named in this process's temp names (``saelab <command>`` sets it with
:func:`set_command`; library use keeps ``saelab``)."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
"""The process's umask, read once: temp files and folders are created with the mode a plain
``open()`` or ``mkdir()`` gives (``0o666 & ~_UMASK``, ``0o777 & ~_UMASK``)."""

_HOST = f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFF:04x}"
_TEMP_NAME = re.compile(
    r"\.(?P<name>.+)\.(?P<tag>[A-Za-z][\w-]*?)-(?P<pid>\d+)-(?P<host>[0-9a-f]{4})[0-9a-f]{4}"
    r"(?P<file>\.tmp)?"
)
_OLD = "-old"
"""Suffix of the tag of a folder moved aside by :func:`publish_folder`."""


def set_command(name: str) -> None:
    """Name the temp files and folders this process writes after the command ``name``."""
    global COMMAND
    COMMAND = name


def _temp_path(path: Path, tag: str | None, suffix: str = "") -> Path:
    random = f"{_HOST}{secrets.token_hex(2)}"
    return path.parent / f".{path.name}.{tag or COMMAND}-{os.getpid()}-{random}{suffix}"


def _new_temp(path: Path, tag: str | None, *, folder: bool) -> Path:
    """Create an empty temp file or folder beside ``path``; its mode is what a plain ``open()``
    or ``mkdir()`` gives (the umask applies), and the mode survives the rename."""
    for _ in range(100):
        tmp = _temp_path(path, tag, "" if folder else ".tmp")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temp name", str(path))  # pragma: no cover


def _errno_of(exc: BaseException) -> int | None:
    """The OS error code of ``exc``: an ``OSError``'s, or one quoted by a library that wraps it
    (safetensors raises ``SafetensorError('... (os error 28)')``)."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SaelabError):  # its words are the user's message, not a library's
        return None
    found = re.search(r"os error (\d+)", str(exc))
    return int(found.group(1)) if found else None


def _blame(exc: BaseException, tmp: Path, path: Path) -> None:
    """Raise an OS failure of writing ``tmp`` as one of ``path``: the user knows that name, not
    the temp one (and some libraries name no file at all)."""
    code = _errno_of(exc)
    if code is None:
        return
    named = getattr(exc, "filename", None)
    if named is None or Path(named) == tmp or Path(named).is_relative_to(tmp):
        raise OSError(code, os.strerror(code), str(path)) from exc


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it onto ``path``.

    On any failure the temp file is removed and ``path`` keeps what it held; an OS failure is
    raised as an ``OSError`` that names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path, None, folder=False)
    try:
        write(tmp)
        # Some writers (safetensors) make the file anew, owner-only (0600): give it the usual mode.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _blame(exc, tmp, path)
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


def temp_folder_beside(path: str | Path, tag: str | None = None) -> Path:
    """A new, empty hidden folder beside ``path`` (``.NAME.TAG-PID-RANDOM``, TAG by default
    :data:`COMMAND`) with the usual mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _new_temp(path, tag, folder=True)


def publish_folder(tmp: str | Path, path: str | Path) -> Path:
    """Rename the finished folder ``tmp`` onto ``path``.

    An old ``path`` is moved aside first and removed only after the rename, and put back if the
    rename fails: a reader finds the old folder or the new one, never a mixture or nothing. (A
    writer killed between the two renames leaves the old folder aside; :func:`remove_leftovers`
    puts it back.)
    """
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = temp_folder_beside(path, COMMAND + _OLD)
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
def write_folder_atomically(path: str | Path, tag: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; when the block ends without error it replaces
    ``path`` (see :func:`publish_folder`), otherwise it is removed and ``path`` is untouched.
    An OS failure inside the block is raised as an ``OSError`` that names ``path``.

    Example::

        with write_folder_atomically("runs/site") as tmp:
            (tmp / "index.html").write_text(html)
    """
    path = Path(path)
    tmp = temp_folder_beside(path, tag)
    try:
        yield tmp
        publish_folder(tmp, path)
    except BaseException as exc:
        _blame(exc, tmp, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _stale(entry: Path, command: str) -> re.Match[str] | None:
    """The parsed temp name of ``entry`` if it is a leftover of a dead ``command`` writer of
    this host; None for anything else (other names, other commands, other hosts, live pids)."""
    found = _TEMP_NAME.fullmatch(entry.name)
    if (
        found is None
        or found["tag"] not in (command, command + _OLD)
        or found["host"] != _HOST
        or int(found["pid"]) == os.getpid()
        or _is_alive(int(found["pid"]))
    ):
        return None
    return found


def _remove_leftover(entry: Path, found: re.Match[str]) -> None:
    target = entry.parent / found["name"]
    if found["tag"].endswith(_OLD) and (entry / target.name).exists() and not target.exists():
        # Killed between publish_folder's two renames: the old folder is the only result.
        os.replace(entry / target.name, target)
        log.warning("put back %s, which an interrupted run had moved aside", target)
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def remove_leftovers(path: str | Path, command: str | None = None) -> int:
    """Remove what killed runs of ``command`` (default :data:`COMMAND`) left: temp files and
    folders of ``path`` beside it and, if ``path`` is a folder, any inside it. Logs one line if
    there were any; returns how many.

    Only names of this module's scheme whose writer (pid, on this host) is gone are touched.
    """
    path, command = Path(path), command or COMMAND
    prefix = f".{path.name}."
    entries = [path.parent / e.name for e in _scan(path.parent) if e.name.startswith(prefix)]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            entries += [Path(root, name) for name in (*dirs, *files) if name.startswith(".")]
            dirs[:] = [d for d in dirs if not _TEMP_NAME.fullmatch(d)]  # removed whole
    removed = 0
    for entry in entries:
        if (found := _stale(entry, command)) is None:
            continue
        try:
            _remove_leftover(entry, found)
        except OSError as exc:  # not ours to fix (permissions); the run can go on beside it
            log.warning("could not remove %s, left by an interrupted run: %s", entry, exc)
            continue
        removed += 1
    if removed:
        log.warning(
            "removed %d leftover(s) of an interrupted saelab %s run in %s", removed, command, path
        )
    return removed


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []
