"""The one exception type users see: a one-line message that says what to do; and the one line
an operating-system failure (a full disk, a read-only folder) becomes."""

from __future__ import annotations

import errno


class SaelabError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits 2."""


class UnknownHookError(SaelabError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class MissingPackageError(SaelabError, ImportError):
    """An optional package is needed; the message names the install command."""


_OS_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space on that disk or pass another {what}"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota or pass another {what}"),
    errno.EROFS: ("the file system is read-only", "choose a writable {what}"),
    errno.EACCES: ("permission denied", "choose a writable {what}"),
    errno.EPERM: ("operation not permitted", "choose a writable {what}"),
    errno.ENOTDIR: ("part of the path is a file, not a folder", "remove the file or pass a folder"),
    errno.EEXIST: ("a file of that name is in the way", "remove the file or pass a folder"),
    errno.EISDIR: ("a folder is where a file should go", "remove the folder or pass a file path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
}
"""errno → (the cause in words, what to do); ``{what}`` is the option that chose the place."""


def describe_os_error(exc: OSError, what: str = "--out") -> str:
    """``PATH: cause — what to do``: an operating-system failure as the one line users see.

    Example::

        describe_os_error(OSError(errno.ENOSPC, "No space left on device", "runs/sae"))
        # 'runs/sae: no space left on the device — free space on that disk or pass another --out'
    """
    code = exc.errno
    if code in _OS_CAUSES:
        cause, advice = _OS_CAUSES[code]
        line = f"{cause} — {advice.format(what=what)}"
    elif code:
        line = f"{exc.strerror} ({errno.errorcode.get(code, code)}) — check the path and the disk"
    else:  # a library's OSError without a code (a network failure, a model not found)
        text = str(exc).strip()
        line = text.splitlines()[0] if text else type(exc).__name__
    where = exc.filename if exc.filename is not None else exc.filename2
    return line if where is None else f"{where}: {line}"
