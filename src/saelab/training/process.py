"""Tuning of the training process itself (not of any model): settings a run makes once, at its
start, because a training loop allocates the same memory over and over.

Example:
    >>> reuse_freed_memory()  # before the first step of a CPU run; a no-op elsewhere
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_MALLOC_TUNED = False


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed blocks of up to 32 MB for reuse instead of unmapping them.

    A step allocates and frees the same 20 MB gradients and work buffers every time. glibc's
    default returns such blocks to the kernel, and the next step faults each 4 KiB page back in
    (measured 5–10 % of a TopK step in a VM). A training process reuses that memory at once, so
    holding it costs nothing; elsewhere (not Linux/glibc) this does nothing. Idempotent.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or sys.platform != "linux":
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB free at the heap top
    except (OSError, AttributeError):
        log.debug("glibc mallopt unavailable; freed memory goes back to the kernel")


def tune_for_training(device: str) -> None:
    """Everything a training run on ``device`` sets up for its process: today, for the CPU,
    :func:`reuse_freed_memory` (CUDA has its own caching allocator)."""
    if device == "cpu" or device.startswith("cpu:"):
        reuse_freed_memory()
