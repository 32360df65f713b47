"""Per-particle arrays held in RAM or streamed from a scratch file on disk.

A :class:`RowStore` is an ``(n, *row_shape)`` float32 array. In RAM it wraps a tensor; on disk
it is a raw file read with plain positioned reads, so the pages go through the page cache and
do not stay mapped into the process: memory is bounded by the chunk being read, whatever ``n``.

>>> store = RowStore.on_disk("scratch/weighted.f32", n=200_000, row_shape=(700,))
>>> store.write(0, first_rows)
>>> for start, rows in store.chunks(4096):
...     ...
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from .errors import OutputError


class RowStore:
    """``(n, *row_shape)`` float32 rows, in RAM (``tensor``) or in a file (``path``)."""

    def __init__(self, n: int, row_shape: tuple[int, ...], tensor: torch.Tensor | None = None,
                 path: Path | None = None):
        self.n, self.row_shape = int(n), tuple(int(s) for s in row_shape)
        self.tensor, self.path = tensor, path
        self.row_floats = int(np.prod(self.row_shape)) if self.row_shape else 1
        self._fd: int | None = None

    @classmethod
    def in_memory(cls, n: int, row_shape: tuple[int, ...]) -> RowStore:
        return cls(n, row_shape, tensor=torch.empty(n, *row_shape))

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> RowStore:
        return cls(tensor.shape[0], tuple(tensor.shape[1:]), tensor=tensor)

    @classmethod
    def on_disk(cls, path: Path | str, n: int, row_shape: tuple[int, ...]) -> RowStore:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = int(n) * int(np.prod(row_shape)) * 4
        stats = os.statvfs(path.parent)
        free = stats.f_bavail * stats.f_frsize
        if free < size:           # the file is sparse: fail now, not with zeros read back later
            raise OutputError(f"{path.parent}: {free / 1e6:.1f} MB free but the scratch file "
                              f"{path.name} needs {size / 1e6:.1f} MB; free space there, pass "
                              f"--scratch_dir <folder on a larger disk>, or --preread_images")
        with open(path, "wb") as handle:
            handle.truncate(size)
        return cls(n, row_shape, path=path)

    # ---- shape -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.row_shape)

    # ---- access ----------------------------------------------------------------------
    def write(self, start: int, rows: torch.Tensor) -> None:
        """Store ``rows`` at rows ``start .. start + len(rows)``."""
        if self.tensor is not None:
            self.tensor[start:start + len(rows)] = rows
            return
        data = np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.float32)
        view = memoryview(data.reshape(-1)).cast("B")
        offset, done = start * self.row_floats * 4, 0
        while done < len(view):       # pwrite may write less than asked (e.g. the disk is full)
            try:
                count = os.pwrite(self._file(), view[done:], offset + done)
            except OSError as exc:
                raise self._write_error(done, len(view), exc.errno) from None
            if count <= 0:
                raise self._write_error(done, len(view), errno.ENOSPC)
            done += count

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start .. stop`` (a view in RAM, a fresh copy from disk)."""
        stop = min(stop, self.n)
        if self.tensor is not None:
            return self.tensor[start:stop]
        out = np.empty((stop - start, *self.row_shape), dtype=np.float32)
        self._read_into(out, start)
        return torch.from_numpy(out)

    def take(self, index: NDArray | torch.Tensor) -> torch.Tensor:
        """Rows at ``index`` (any order), as a new tensor."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if self.tensor is not None:
            return self.tensor[torch.from_numpy(index)]
        out = np.empty((index.size, *self.row_shape), dtype=np.float32)
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        breaks = np.flatnonzero(np.diff(sorted_index) != 1) + 1
        for run in np.split(np.arange(index.size), breaks):
            if run.size:
                block = np.empty((run.size, *self.row_shape), dtype=np.float32)
                self._read_into(block, int(sorted_index[run[0]]))
                out[order[run]] = block
        return torch.from_numpy(out)

    def __getitem__(self, key: slice | NDArray | torch.Tensor) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            if step == 1:
                return self.read(start, stop)
            key = np.arange(start, stop, step)
        return self.take(key)

    def chunks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, rows)`` for consecutive chunks of ``size`` rows."""
        for start in range(0, self.n, size):
            yield start, self.read(start, start + size)

    def to_memory(self) -> RowStore:
        """A RAM copy (itself if already in RAM)."""
        return self if self.tensor is not None else RowStore.wrap(self.read(0, self.n))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Close and delete the backing file (no-op in RAM)."""
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __getstate__(self) -> dict:
        """Pickle without the open file (DataLoader workers re-open it)."""
        return {**self.__dict__, "_fd": None}

    # ---- internals -------------------------------------------------------------------
    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR)
        return self._fd

    def _write_error(self, done: int, wanted: int, code: int | None) -> OutputError:
        reason = os.strerror(code) if code else "write failed"
        fix = ("free space there, pass --scratch_dir <folder on a larger disk>, or --preread_images "
               "to keep the working images in RAM" if code in (errno.ENOSPC, errno.EDQUOT)
               else "check the disk, or pass --scratch_dir <another folder>")
        return OutputError(f"{self.path}: scratch write failed after {done} of {wanted} bytes "
                           f"({reason}); {fix}")

    def _read_into(self, out: NDArray[np.float32], start: int) -> None:
        view = memoryview(out.reshape(-1)).cast("B")
        offset, done = start * self.row_floats * 4, 0
        while done < len(view):
            count = os.preadv(self._file(), [view[done:]], offset + done)
            if count <= 0:
                raise OSError(f"{self.path}: short read at byte {offset + done}")
            done += count
