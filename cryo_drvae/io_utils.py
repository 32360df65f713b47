"""Atomic output writing and output-folder checks.

Every output file is written to a temporary name in its final folder and renamed
into place, so a reader never sees a half-written STAR file, stack or checkpoint.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success."""
    final = Path(final)
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_output_prefix(prefix: str | os.PathLike) -> Path:
    """Create the folder of an output prefix and check it is writable.

    Raises
    ------
    OutputError
        If the folder cannot be created or written.
    """
    prefix = Path(prefix)
    folder = prefix.parent if str(prefix.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror}); "
                          f"choose an --o prefix in a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable; "
                          f"choose an --o prefix in a writable folder or fix its permissions")
    return prefix
