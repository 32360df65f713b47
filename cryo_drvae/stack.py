"""Lazy, validated access to the particle images that a STAR file points at.

>>> with ParticleStack.from_table(table, data_dir="/data/project") as stack:
...     for indices, images in stack.iter_batches(1024):   # images: (batch, box, box) float32
...         ...
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np
import pandas as pd
from mrcfile.mrcmemmap import MrcMemmap
from numpy.typing import ArrayLike, NDArray

from .errors import InputFileError
from .normalise import normalise_background
from .star_io import IMAGE_NAME, IMAGE_SIZE, ParticleTable, image_sizes

logger = logging.getLogger(__name__)
#: The remedy for missing stacks that ``classify`` gives (its --data_dir).
MISSING_STACKS_FIX = "pass --data_dir <project folder>"

#: Stacks kept memory-mapped at once; others are re-opened on demand (file-descriptor limit).
MAX_OPEN_STACKS = 64
_MRC_HEADER_BYTES = 1024


@dataclass(frozen=True)
class ImageLocation:
    """Where one particle image lives: a stack file and a 0-based slice in it."""

    stack_path: Path
    slice_index: int

    def relion_name(self) -> str:
        """The ``rlnImageName`` form, ``000123@path`` (1-based slice)."""
        return f"{self.slice_index + 1:06d}@{self.stack_path}"


@dataclass(frozen=True)
class _StackInfo:
    """What validation learnt about one stack file."""

    path: Path
    n_images: int
    box_size: int


class ParticleStack:
    """Particle images of a :class:`~cryo_drvae.star_io.ParticleTable`, read lazily.

    Build it with :meth:`from_table`. Images are memory-mapped and copied out per batch,
    so memory stays bounded by the batch size; reads are grouped by stack file, and a run of
    consecutive slices is one slice of the memmap. At most ``MAX_OPEN_STACKS`` files stay
    open (least recently used are closed and re-opened on demand), so projects with
    thousands of micrograph stacks stay within the open-file limit.

    Attributes
    ----------
    n_particles : int
        Number of particles (rows of the table).
    box_size : int
        Image side length in pixels (all images are ``box_size x box_size``).
    """

    def __init__(self, stacks: list[_StackInfo], stack_codes: NDArray[np.int64],
                 slices: NDArray[np.int64], sign: NDArray[np.float32] | None = None) -> None:
        self._stacks = stacks
        self._codes = stack_codes
        self._slices = slices
        self._sign = None if sign is None or np.all(sign == 1) else np.asarray(sign, np.float32)
        self._open: OrderedDict[int, MrcMemmap] = OrderedDict()
        self.n_particles = int(len(slices))
        self.box_size = stacks[0].box_size
        self.background_radius: float | None = None   # set: images normalised as RELION does

    def normalise(self, background_radius_px: float) -> ParticleStack:
        """From now on, :meth:`read` returns images whose background (outside
        ``background_radius_px``) has mean 0 and sd 1, each image on its own."""
        self.background_radius = float(background_radius_px)
        return self

    # --- construction --------------------------------------------------------------------

    @classmethod
    def from_table(cls, table: ParticleTable, data_dir: str | os.PathLike | None = None,
                   missing_fix: str = MISSING_STACKS_FIX) -> ParticleStack:
        """Locate, open and check every stack that the table's ``rlnImageName`` refers to.

        Parameters
        ----------
        table : ParticleTable
            Particles as read by :func:`~cryo_drvae.star_io.read_particles`.
        data_dir : str or PathLike, optional
            RELION project folder that the relative stack paths start from. Default: the
            current working directory. A stack not found there is looked up relative to the
            STAR file's own folder.
        missing_fix : str
            What the missing-stacks error tells the user to do (the command's own remedy).

        Returns
        -------
        ParticleStack

        Raises
        ------
        InputFileError
            If stacks are missing (one error listing the first 3), a file is not a readable
            MRC file or is truncated, images are not square, box sizes differ between
            stacks or from the table's ``rlnImageSize``, or a slice number lies outside its stack.
        """
        star = table.path
        if IMAGE_NAME not in table.particles.columns:
            raise InputFileError(f"{star}: no '{IMAGE_NAME}' column; pass a particles STAR "
                                 f"file (e.g. from Extract)")
        names, slices = _parse_image_names(star, table.particles[IMAGE_NAME])
        codes, unique_names = pd.factorize(names)
        base = Path(data_dir) if data_dir is not None else Path.cwd()
        paths = _resolve_stack_paths(star, list(unique_names), base, missing_fix)
        stacks, opened = _open_and_validate(paths, codes, slices)
        try:
            _check_image_size(table, stacks[0])
        except BaseException:
            for mrc in opened.values():
                mrc.close()
            raise
        logger.info("found %d particles in %d stacks, box %d px", len(slices), len(stacks),
                    stacks[0].box_size)
        stack = cls(stacks, codes.astype(np.int64), slices, table.image_sign)
        stack._open = opened
        return stack

    # --- access --------------------------------------------------------------------------

    def location(self, index: int) -> ImageLocation:
        """Stack file and 0-based slice of particle ``index`` (row of the table)."""
        return ImageLocation(self._stacks[self._codes[index]].path, int(self._slices[index]))

    def read(self, indices: ArrayLike) -> NDArray[np.float32]:
        """Copy the images of the given particles, in the order given.

        Parameters
        ----------
        indices : array_like of int
            Rows of the particle table, shape ``(m,)``, any order, repeats allowed.

        Returns
        -------
        numpy.ndarray
            ``(m, box_size, box_size)`` float32, times the table's ``image_sign`` where it has one.

        Raises
        ------
        IndexError
            If an index is outside ``[0, n_particles)``.
        InputFileError
            If an image contains NaN or Inf pixels (names the stack and slice).
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_particles):
            raise IndexError(f"particle indices must lie in [0, {self.n_particles}), got "
                             f"{indices.min()}..{indices.max()}")
        out = np.empty((indices.size, self.box_size, self.box_size), dtype=np.float32)
        codes = self._codes[indices]
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for group in np.split(order, bounds):
            if group.size:
                code = int(codes[group[0]])
                out[group] = self._read_slices(code, self._slices[indices[group]])
        if self._sign is not None:   # cryoSPARC blob/sign: stored contrast -> protein-positive
            out *= self._sign[indices][:, None, None]
        return out

    def iter_batches(self, batch_size: int, particles: ArrayLike | None = None
                     ) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
        """Yield ``(indices, images)`` of ``particles`` (default: all, in file order), a batch at a time.

        Each batch is read only when requested, so memory is bounded by one batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chosen = np.arange(self.n_particles) if particles is None else np.asarray(particles, np.int64)
        for start in range(0, len(chosen), batch_size):
            indices = chosen[start:start + batch_size]
            yield indices, self.read(indices)

    def close(self) -> None:
        """Close every open stack file."""
        while self._open:
            _, mrc = self._open.popitem()
            mrc.close()

    def __len__(self) -> int:
        return self.n_particles

    def __enter__(self) -> ParticleStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickle without open files (e.g. for DataLoader workers); they re-open lazily."""
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    # --- internals -----------------------------------------------------------------------

    def _read_slices(self, code: int, slices: NDArray[np.int64]) -> NDArray[np.float32]:
        """Images at 0-based ``slices`` of one stack, float32 copies, checked finite."""
        data = self._data(code)
        first, last = int(slices[0]), int(slices[-1])
        if last - first + 1 == slices.size and np.all(np.diff(slices) == 1):
            block = data[first:last + 1]            # one contiguous read from the memmap
        else:
            block = data[slices]
        block = np.asarray(block, dtype=np.float32).copy()
        _release_pages(data)
        finite = np.isfinite(block).all(axis=(1, 2))
        if not finite.all():
            bad = int(slices[np.argmin(finite)]) + 1
            raise InputFileError(f"{self._stacks[code].path}: image {bad} ({bad:06d}@...) "
                                 f"contains NaN/Inf pixels; re-extract or remove those "
                                 f"particles")
        if self.background_radius is not None:
            block, sd = normalise_background(block, self.background_radius)
            flat = ~(sd > 0)
            if flat.any():
                bad = int(slices[np.argmax(flat)]) + 1
                raise InputFileError(f"{self._stacks[code].path}: image {bad} ({bad:06d}@...) has a "
                                     f"constant background and cannot be normalised; re-extract or "
                                     f"remove those particles")
        return block

    def _data(self, code: int) -> np.ndarray:
        """Memory-mapped ``(n_images, box, box)`` array of one stack (LRU of open files)."""
        mrc = self._open.get(code)
        if mrc is None:
            mrc, _ = _open_mmap(self._stacks[code].path)
            self._open[code] = mrc
            if len(self._open) > MAX_OPEN_STACKS:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
        else:
            self._open.move_to_end(code)
        data = mrc.data
        return data[np.newaxis] if data.ndim == 2 else data


def _release_pages(data: np.ndarray) -> None:
    """Unmap the pages just read (they stay in the page cache), so that streaming a stack
    larger than RAM does not grow the process's resident memory."""
    base = data
    while base is not None and getattr(base, "_mmap", None) is None:
        base = base.base
    if base is not None and hasattr(base._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        base._mmap.madvise(mmap.MADV_DONTNEED)


# --- parsing and validation helpers -------------------------------------------------------

def _parse_image_names(star: Path, column: pd.Series) -> tuple[pd.Series, NDArray[np.int64]]:
    """Split ``000123@path`` into (path, 0-based slice), vectorised; bare ``path`` = slice 0."""
    text = column.astype(str).str.strip()
    parts = text.str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    names = parts[2].where(has_at, parts[0])
    head = parts[0].where(has_at, "1")
    try:
        numbers = head.astype(np.float64).to_numpy()
    except (TypeError, ValueError):  # some slice number is not a number
        numbers = pd.to_numeric(head, errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(numbers) | (numbers < 1) | (numbers != np.round(numbers))
    bad |= (names == "").to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise InputFileError(f"{star}: row {row + 1} has {IMAGE_NAME} '{column.iloc[row]}', "
                             f"expected 'N@stack.mrcs' with N >= 1; fix the STAR file")
    return names, numbers.astype(np.int64) - 1


def _resolve_stack_paths(star: Path, names: list[str], base: Path, missing_fix: str) -> list[Path]:
    """Resolve stack names as RELION does: against ``base``, then the STAR file's folder."""
    resolved, missing, beside_star = [], [], []
    for name in names:
        path = Path(name)
        candidates = [path] if path.is_absolute() else [base / path, star.parent / path]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(candidates[0])
        elif found is not candidates[0]:
            beside_star.append(name)
        resolved.append(found)
    if beside_star and not missing:
        logger.warning("%s: %d of %d image stacks (e.g. %s) are found only relative to the STAR file's "
                       "folder %s, not to %s; RELION resolves image paths against the project folder it "
                       "runs in, so relion_refine and RELION jobs will not find them: write rlnImageName "
                       "relative to the project folder (or run from %s)", star, len(beside_star), len(names),
                       beside_star[0], star.parent, base, star.parent)
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise InputFileError(f"{star}: {len(missing)} of {len(names)} image stacks not found "
                             f"(e.g. {shown}); relative paths were resolved against {base} "
                             f"and then {star.parent}; {missing_fix}")
    return resolved


def _open_mmap(path: Path) -> tuple[MrcMemmap, list[str]]:
    """Open a stack memory-mapped and permissively; return it and any warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except Exception as exc:  # mrcfile raises ValueError/OSError/... on garbage
            raise InputFileError(f"{path}: not a readable MRC stack ({exc}); re-run extraction "
                                 f"or re-copy the file") from None
    return mrc, [str(w.message) for w in caught]


def _open_and_validate(paths: list[Path], codes: NDArray, slices: NDArray[np.int64]
                       ) -> tuple[list[_StackInfo], OrderedDict[int, MrcMemmap]]:
    """Open and check every stack once; keep the first MAX_OPEN_STACKS open for reading."""
    stacks: list[_StackInfo] = []
    opened: OrderedDict[int, MrcMemmap] = OrderedDict()
    try:
        for code, path in enumerate(paths):
            info, mrc = _validate_stack(path)
            stacks.append(info)
            if len(opened) < MAX_OPEN_STACKS:
                opened[code] = mrc
            else:
                mrc.close()
        _check_same_box(stacks)
        _check_slices(stacks, codes, slices)
    except BaseException:
        for mrc in opened.values():
            mrc.close()
        raise
    return stacks, opened


def _validate_stack(path: Path) -> tuple[_StackInfo, MrcMemmap]:
    """Check one stack's header and size; return what was learnt and the open memmap."""
    mrc, messages = _open_mmap(path)
    try:
        return _stack_info(path, mrc, messages), mrc
    except BaseException:
        mrc.close()
        raise


def _stack_info(path: Path, mrc: MrcMemmap, messages: list[str]) -> _StackInfo:
    """Image count and box size of an open stack; InputFileError if unusable."""
    header = mrc.header
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if mrc.data is None:
        expected = _expected_bytes(mrc)
        actual = path.stat().st_size
        if expected is not None and actual < expected:
            raise InputFileError(f"{path}: truncated: {actual} bytes but the header "
                                 f"implies {expected} ({nz} images of {nx}x{ny}); "
                                 f"re-run extraction or re-copy the file")
        detail = "; ".join(messages) or "no image data"
        raise InputFileError(f"{path}: not a readable MRC stack ({detail}); re-run "
                             f"extraction or re-copy the file")
    shape = mrc.data.shape
    if mrc.data.ndim not in (2, 3) or shape[-1] != shape[-2]:
        raise InputFileError(f"{path}: images are {shape[-1]}x{shape[-2]} px "
                             f"(data shape {shape}), expected square 2D images; "
                             f"re-extract with a square box")
    n_images = 1 if mrc.data.ndim == 2 else shape[0]
    expected, actual = _expected_bytes(mrc), path.stat().st_size
    image_bytes = nx * ny * mrc.data.dtype.itemsize
    if expected is not None and actual - expected >= image_bytes:
        raise InputFileError(f"{path}: {actual} bytes but the header (mode {int(header.mode)}, "
                             f"{mrc.data.dtype}) implies {expected} for {nz} images of {nx}x{ny}: "
                             f"the data are probably of another type (e.g. float64 written "
                             f"under a float32 header); rewrite the stack as float32 MRC")
    return _StackInfo(path=path, n_images=int(n_images), box_size=int(shape[-1]))


def _expected_bytes(mrc: MrcMemmap) -> int | None:
    """File size the header implies, or None if its mode is unknown."""
    header = mrc.header
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError:
        return None
    n_values = int(header.nx) * int(header.ny) * int(header.nz)
    return _MRC_HEADER_BYTES + int(header.nsymbt) + n_values * dtype.itemsize


def _check_same_box(stacks: list[_StackInfo]) -> None:
    """All stacks must share one box size."""
    first = stacks[0]
    for info in stacks[1:]:
        if info.box_size != first.box_size:
            raise InputFileError(f"{info.path}: box size {info.box_size} px differs from "
                                 f"{first.box_size} px in {first.path}; re-extract with one "
                                 f"box size")


def _check_image_size(table: ParticleTable, first: _StackInfo) -> None:
    """The stacks' box must be the ``rlnImageSize`` the table declares."""
    declared = image_sizes(table)
    if declared is None:
        return
    wrong = np.isfinite(declared) & (declared != first.box_size)
    if wrong.any():
        raise InputFileError(f"{table.path}: {IMAGE_SIZE} is {int(declared[wrong][0])} px for "
                             f"{int(wrong.sum())} particles but the images in {first.path} are "
                             f"{first.box_size} px; fix {IMAGE_SIZE} in data_optics or point "
                             f"{IMAGE_NAME} at the right stacks")


def _check_slices(stacks: list[_StackInfo], codes: NDArray, slices: NDArray[np.int64]) -> None:
    """Every slice number must lie within its stack."""
    max_slice = pd.Series(slices).groupby(codes).max()
    for code, top in max_slice.items():
        info = stacks[int(code)]
        if top >= info.n_images:
            raise InputFileError(f"{info.path}: the STAR file asks for image {int(top) + 1} "
                                 f"({int(top) + 1:06d}@...) but the stack holds "
                                 f"{info.n_images} images; re-extract or fix {IMAGE_NAME}")
