"""Interruptions (Ctrl-C, SIGTERM) as one exception, and the guard long loops stop under.

SIGTERM (what ``kill``, schedulers and container runtimes send) is turned into the same
:class:`KeyboardInterrupt` as Ctrl-C by :func:`terminate_as_interrupt`, so every command has one
way to stop. A library layer that tidies up after an interruption re-raises it as
:class:`Interrupted` with a ``detail`` (how far it got, what is safe on disk) and whether
``--resume`` continues it; the CLI prints that as one line and exits ``128 + signal``.

:class:`InterruptGuard` lets a loop stop at a safe point instead of wherever the signal lands:
while it is ``armed`` the first signal is only recorded (the loop polls :attr:`signum` and
stops between steps), a second one raises at once; inside :meth:`InterruptGuard.shield` (a
checkpoint being written) every signal waits until the write is over.

Example::

    with InterruptGuard() as guard:
        for step in steps:
            guard.armed = True          # from here on there is something worth saving
            train(step)
            if guard.signum is not None:
                with guard.shield():
                    save_checkpoint()
                raise Interrupted("interrupted; a checkpoint was written", resumable=True,
                                  signum=guard.signum)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)
"""The signals that mean "stop, tidily"."""


class Interrupted(KeyboardInterrupt):
    """A stop asked for by Ctrl-C or SIGTERM, after the library has tidied up.

    ``detail`` is the user-facing sentence (without ``saelab:``), None until a layer that knows
    what the interruption left has said so; ``resumable`` says whether the same command with
    ``--resume`` continues where it stopped; ``signum`` is the signal (None: a plain Ctrl-C
    seen by Python's own handler).
    """

    def __init__(
        self, detail: str | None = None, *, resumable: bool = False, signum: int | None = None
    ) -> None:
        super().__init__(*([detail] if detail else []))
        self.detail = detail
        self.resumable = resumable
        self.signum = signum


def is_accounted_for(exc: BaseException) -> bool:
    """Whether an interruption already says what it left (an :class:`Interrupted` with a
    ``detail``), so an outer layer passes it on unchanged."""
    return isinstance(exc, Interrupted) and exc.detail is not None


def signal_of(exc: BaseException) -> int:
    """The signal behind an interruption: its recorded one, else SIGINT (Python's Ctrl-C)."""
    signum = getattr(exc, "signum", None)
    return int(signum) if signum is not None else int(signal.SIGINT)


def exit_status(exc: BaseException) -> int:
    """The shell's status for a process stopped by the signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signal_of(exc)


def _in_main_thread() -> bool:
    # Python accepts signal handlers only from the main thread (a notebook's worker thread, a
    # server's request thread): elsewhere these helpers do nothing.
    return threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Interrupted` like Ctrl-C raises
    :class:`KeyboardInterrupt`; the previous handler is restored afterwards."""
    if not _in_main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum=signum)

    before = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class InterruptGuard:
    """Installed over a loop (a context manager): SIGINT and SIGTERM are recorded in
    :attr:`signum` while :attr:`armed` (the loop stops at its next safe point), raised at once
    as :class:`Interrupted` when not armed or on a second signal, and held back entirely inside
    :meth:`shield`. Outside the main thread it installs nothing and only ever reports None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        """The first signal received and not yet acted on."""
        self.armed = False
        """Whether a first signal waits for the loop's next safe point (set by the loop)."""
        self._shielded = 0
        self._before: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        if _in_main_thread():
            self._before = {s: signal.signal(s, self._handle) for s in HANDLED}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self._shielded or (self.armed and first):
            return
        raise Interrupted(signum=self.signum)

    @contextmanager
    def shield(self) -> Iterator[None]:
        """Hold every signal back until the block ends (a write that must not be cut short);
        one that came meanwhile is then raised, unless the guard is armed (the loop acts on
        it)."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1
        if not self._shielded and self.signum is not None and not self.armed:
            raise Interrupted(signum=self.signum)


@contextmanager
def held_back() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then raise one that came: for files
    that only make sense together (a result and its metadata), each written atomically.

    Example::

        with held_back():
            write_json(folder / "metrics.json", metrics)
            write_json(folder / "eval_info.json", info)
    """
    with InterruptGuard() as guard, guard.shield():
        yield


__all__ = [
    "HANDLED",
    "InterruptGuard",
    "Interrupted",
    "exit_status",
    "held_back",
    "is_accounted_for",
    "signal_of",
    "terminate_as_interrupt",
]
