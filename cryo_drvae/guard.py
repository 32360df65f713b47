"""Output-prefix protection: one run per prefix, and no silent overwrite of earlier results.

A run *claims* its output prefix before it writes anything there: it takes an exclusive lock
(``<o>_run.lock``, held with ``flock`` so that a killed run never leaves a stale lock), and
refuses when the outputs of an earlier run exist, unless ``--overwrite`` was given, or when an
interrupted run's checkpoint is there and neither ``--continue`` nor ``--overwrite`` was.

>>> with claim_prefix(cfg):        # the CLI and pipeline.run both do this; nesting is free
...     ...
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import RunConfig
from .errors import OutputError

#: Files a finished run leaves for a prefix (run.log is not one: a failed run leaves only it).
FINISHED_SUFFIXES = ("_data.star", "_model.star", "_class_averages.mrcs", "_classes.png",
                     "_convergence.png", "_config.yaml")
CHECKPOINT_SUFFIX = "_checkpoint.pt"
LOCK_SUFFIX = "_run.lock"

_held: dict[str, int] = {}      # lock path -> descriptor, for the locks this process holds


def lock_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}{LOCK_SUFFIX}")


def existing_outputs(prefix: str | os.PathLike) -> list[Path]:
    """Finished-run outputs of ``prefix`` that exist now."""
    return [p for p in (Path(f"{os.fspath(prefix)}{s}") for s in FINISHED_SUFFIXES) if p.exists()]


def check_prefix_free(cfg: RunConfig) -> None:
    """Refuse to overwrite an earlier run's outputs or to drop its checkpoint.

    Raises
    ------
    OutputError
        Outputs exist and ``--overwrite`` was not given; or a checkpoint exists and neither
        ``--continue`` nor ``--overwrite`` was given.
    """
    if cfg.overwrite:
        return
    found = existing_outputs(cfg.output_prefix)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise OutputError(f"{found[0]}{more}: outputs of an earlier run exist for --o {cfg.output_prefix}; "
                          f"pass --overwrite to replace them, or choose another --o")
    checkpoint = Path(f"{cfg.output_prefix}{CHECKPOINT_SUFFIX}")
    if checkpoint.exists() and not cfg.continue_run:
        raise OutputError(f"{checkpoint}: an interrupted run left this checkpoint; pass --continue "
                          f"to resume it, or --overwrite to start again from the beginning")


@contextmanager
def prefix_lock(prefix: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<prefix>_run.lock`` exclusively for the block (re-entrant within a process).

    Raises
    ------
    OutputError
        Another process holds the lock.
    """
    path = lock_path(prefix)
    key = os.path.abspath(path)
    if key in _held:                # this process already holds it (CLI, then pipeline.run)
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise OutputError(f"{path}: another cryo-drvae run ({holder}) is writing to --o {prefix}; "
                          f"wait for it to finish or choose another --o") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd
    try:
        yield path
    finally:
        del _held[key]
        path.unlink(missing_ok=True)   # unlink while still locked: a waiting run re-creates it
        os.close(fd)


@contextmanager
def claim_prefix(cfg: RunConfig, main_process: bool = True) -> Iterator[None]:
    """Lock the output prefix and check that the run may write there (main process only)."""
    if not main_process or os.path.abspath(lock_path(cfg.output_prefix)) in _held:
        yield                   # another rank, or claimed already by this process (the CLI, then run)
        return
    from .outputs import check_outputs_writable     # creates the folder the lock goes in

    check_outputs_writable(cfg.output_prefix)
    with prefix_lock(cfg.output_prefix):
        check_prefix_free(cfg)
        yield
