"""What a training run says when it is interrupted: how far its last checkpoint is, and whether
there is anything to ``--resume`` from. The trainer, the run's set-up and the sweep's held-out
measurement all stop through :func:`interruptions_reported`.

Example::

    with interruptions_reported(out_dir, "interrupted before training started"):
        stream = build_stream(cfg)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from saelab.signals import Interrupted, is_accounted_for, signal_of
from saelab.training.checkpoint import latest_checkpoint, load_state


def interruption(out_dir: Path | None, where: str, signum: int) -> Interrupted:
    """An interruption that stopped ``where`` it was (a sentence), saying how far the last
    checkpoint of ``out_dir`` is: resumable from it, or nothing to resume without one."""
    path = None if out_dir is None else latest_checkpoint(out_dir)
    if path is None:
        return Interrupted(
            f"{where}; no checkpoint was written, so there is nothing to resume", signum=signum
        )
    saved = load_state(path, "trainer")
    step, tokens = int(saved["step"]), int(saved["tokens"])
    return Interrupted(
        f"{where}; the last checkpoint is at step {step:,} ({tokens:,} tokens)",
        resumable=True,
        signum=signum,
    )


@contextlib.contextmanager
def interruptions_reported(out_dir: Path | None, where: str | Callable[[], str]) -> Iterator[None]:
    """Within the block an interruption that nothing has accounted for becomes
    :func:`interruption`; ``where`` says what was under way (or makes the sentence then)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if is_accounted_for(exc):
            raise
        sentence = where if isinstance(where, str) else where()
        raise interruption(out_dir, sentence, signal_of(exc)) from None
