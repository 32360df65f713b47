"""Atomic output writing and output-folder checks.

Every output file is written to a temporary name in its final folder and renamed
into place, so a reader never sees a half-written STAR file, stack or checkpoint.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from .errors import OutputError


#: Renames that :func:`staged_outputs` holds back until every output is written.
_pending: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("pending_renames", default=None)


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    Inside :func:`staged_outputs` the rename waits until the whole set is written.

    Raises
    ------
    OutputError
        If writing the temporary file fails (e.g. the disk is full); nothing is left behind.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}")
    pending = _pending.get()
    try:
        yield tmp
        if pending is None:
            os.replace(tmp, final)
        else:
            pending.append((tmp, final))
    except OSError as exc:
        reason = exc.strerror or str(exc).splitlines()[0]
        raise OutputError(f"{final}: cannot be written ({reason}); no output was left half-written: "
                          f"free space on that disk or choose another output location (--o)") from None
    finally:
        if pending is None or (tmp, final) not in pending:
            tmp.unlink(missing_ok=True)


@contextmanager
def staged_outputs() -> Iterator[list[tuple[Path, Path]]]:
    """Write a set of outputs all or nothing: every :func:`atomic_path` inside writes its
    temporary file, and only when the block succeeds are they renamed into place, in the order
    written (renames need no space, so a full disk cannot leave a partial set).
    On any failure the temporary files are removed and no final file is touched."""
    pending: list[tuple[Path, Path]] = []
    token = _pending.set(pending)
    try:
        yield pending
    except BaseException as exc:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{exc.filename or 'an output file'}: cannot be written "
                              f"({exc.strerror or exc}); no output was written: free space on that "
                              f"disk or choose another output location (--o)") from None
        raise
    finally:
        _pending.reset(token)
    signals = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)   # no Ctrl-C between the renames
    try:
        for tmp, final in pending:
            os.replace(tmp, final)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def make_output_folder(prefix: str | os.PathLike) -> Path:
    """Create the folder of an output prefix (no writability check: a run checks that once, when
    it claims the prefix, ``guard.claim_prefix``). Returns the folder.

    Raises
    ------
    OutputError
        If the folder cannot be created.
    """
    prefix = Path(prefix)
    folder = prefix.parent if str(prefix.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror}); "
                          f"choose an --o prefix in a writable folder") from None
    return folder


def ensure_output_prefix(prefix: str | os.PathLike) -> Path:
    """Create the folder of an output prefix and check it is writable.

    Raises
    ------
    OutputError
        If the folder cannot be created or written.
    """
    prefix = Path(prefix)
    folder = make_output_folder(prefix)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable; "
                          f"choose an --o prefix in a writable folder or fix its permissions")
    return prefix
