"""SIGTERM handled like Ctrl-C: SLURM sends it at a time limit, ``scancel`` and ``kill`` too.

Inside :func:`terminate_as_interrupt`, SIGTERM raises :class:`Terminated` (a
``KeyboardInterrupt``), so the same clean-up runs as for Ctrl-C: ``finally`` blocks remove the
scratch files and staged outputs, and the checkpoint of the last finished round stays.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived."""


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the clean-up short
    raise Terminated()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the block (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
