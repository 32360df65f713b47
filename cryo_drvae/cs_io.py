"""cryoSPARC particle datasets (.cs) in, and the classification back out in cryoSPARC's terms.

>>> table = read_any("P3/J12/J12_particles.cs", data_dir="P3")   # a .cs or a particles STAR
>>> paths = write_cs_outputs("Class2D/run", table, result, seed=0)  # _particles.cs, _templates.cs

A .cs becomes the ParticleTable a RELION 3.0 STAR would give (optics values on every row), so the
rest of the job cannot tell them apart; ``blob/sign`` multiplies the pixels as they are read. The
field <-> column conventions (pyem's ``csparc2star`` mapping) are tabulated in docs/cryosparc.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
from cryosparc.dataset import Dataset
from numpy.typing import NDArray

from . import star_io
from .errors import InputFileError
from .io_utils import atomic_path, make_output_folder
from .outputs import ClassificationResult
from .stack import _parse_image_names
from .star_io import ParticleTable

logger = logging.getLogger(__name__)

CS_SUFFIX = ".cs"
#: What :func:`write_cs_outputs` adds to an output prefix.
CS_OUTPUT_SUFFIXES = ("_class_averages.mrc", "_templates.cs", "_particles.cs")
#: Fields a particle .cs must have to be classified.
REQUIRED_FIELDS = ("blob/path", "blob/idx", "blob/psize_A")
#: cryoSPARC field -> (RELION column, factor from the .cs unit to the RELION unit).
CTF_FIELDS = {
    "ctf/accel_kv": (star_io.VOLTAGE, 1.0),
    "ctf/cs_mm": (star_io.SPHERICAL_ABERRATION, 1.0),
    "ctf/amp_contrast": (star_io.AMPLITUDE_CONTRAST, 1.0),
    "ctf/df1_A": (star_io.DEFOCUS_U, 1.0),
    "ctf/df2_A": (star_io.DEFOCUS_V, 1.0),
    "ctf/df_angle_rad": (star_io.DEFOCUS_ANGLE, 180.0 / np.pi),
    "ctf/phase_shift_rad": (star_io.PHASE_SHIFT, 180.0 / np.pi),
    "ctf/bfactor": (star_io.CTF_BFACTOR, 1.0),
    "ctf/scale": (star_io.CTF_SCALEFACTOR, 1.0),
}
#: Aberrations cryoSPARC may have refined that neither this job nor its RELION path models.
IGNORED_ABERRATIONS = ("ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/shift_A")
#: The alignments2D fields written, with cryoSPARC's dtypes.
ALIGNMENT_FIELDS = [("alignments2D/class", "<u4"), ("alignments2D/pose", "<f4"),
                    ("alignments2D/shift", "<f4", (2,)), ("alignments2D/psize_A", "<f4"),
                    ("alignments2D/class_posterior", "<f4"), ("alignments2D/class_ess", "<f4"),
                    ("alignments2D/split", "<u4")]
#: How far above the .cs file's folder a project folder is looked for (``P3/J12/x.cs`` -> ``P3``).
PARENT_LEVELS = 3


@dataclass
class CsParticleTable(ParticleTable):
    """A :class:`ParticleTable` read from a cryoSPARC .cs; ``dataset`` is the file as read."""

    dataset: Dataset | None = None


def is_cs_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == CS_SUFFIX


def read_any(path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             pixel_size: float | None = None) -> ParticleTable:
    """Particles of a cryoSPARC ``.cs`` (:func:`read_cs_particles`) or of a RELION STAR file
    (``pixel_size``: Å/px for a STAR file that has none, ``--angpix``)."""
    if is_cs_file(path):
        return read_cs_particles(path, data_dir)
    return star_io.read_particles(path, pixel_size=pixel_size)


def read_cs_particles(path: str | os.PathLike,
                      data_dir: str | os.PathLike | None = None) -> CsParticleTable:
    """Read a cryoSPARC particle dataset with cryosparc-tools and convert it to RELION columns.

    Parameters
    ----------
    path : str or PathLike
        The particle ``.cs`` file, e.g. ``P3/J12/J12_particles.cs`` or an Export job's file.
    data_dir : str or PathLike, optional
        The cryoSPARC project folder that ``blob/path`` is relative to. Default: the working
        directory; then the .cs file's folder and up to ``PARENT_LEVELS`` folders above it.

    Returns
    -------
    CsParticleTable
        ``particles`` holds ``rlnImageName`` (the blob path as written when it resolves against
        ``data_dir``, else the path where it was found), ``rlnImagePixelSize``, ``rlnImageSize``
        and the CTF columns the .cs has; ``optics`` is None; ``image_sign`` is ``blob/sign``.

    Raises
    ------
    InputFileError
        If the file is missing or not a cryoSPARC dataset, lacks a required field, holds no
        particles, or some blobs are not found (one error naming them).
    """
    path = Path(path)
    dataset = _load_dataset(path)
    fields = set(dataset.fields())
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise InputFileError(f"{path}: no {', '.join(missing)} field(s) (fields found: "
                             f"{', '.join(sorted(fields)[:12])}); pass a particle .cs with a blob "
                             f"slot, e.g. an Extract job's particles or a job's passthrough")
    if len(dataset) == 0:
        raise InputFileError(f"{path}: the dataset holds no particles; pass a particle .cs "
                             f"with at least one particle")
    base = Path(data_dir) if data_dir is not None else Path.cwd()
    names = _image_names(path, dataset, base)
    particles = pd.DataFrame({star_io.IMAGE_NAME: names})
    if "location/micrograph_path" in fields:
        particles[star_io.MICROGRAPH_NAME] = [_strip_marker(p) for p in
                                              _as_text(dataset["location/micrograph_path"])]
    for field, (column, factor) in CTF_FIELDS.items():
        if field in fields:
            particles[column] = np.asarray(dataset[field], dtype=np.float64) * factor
    particles[star_io.IMAGE_PIXEL_SIZE] = np.asarray(dataset["blob/psize_A"], dtype=np.float64)
    if "blob/shape" in fields:
        particles[star_io.IMAGE_SIZE] = np.asarray(dataset["blob/shape"])[:, -1].astype(np.int64)
    _check_pixel_size(path, particles[star_io.IMAGE_PIXEL_SIZE].to_numpy())
    _warn_missing_ctf(path, fields)
    _warn_ignored_aberrations(path, dataset, fields)
    sign = (np.asarray(dataset["blob/sign"], dtype=np.float32) if "blob/sign" in fields
            else np.ones(len(dataset), dtype=np.float32))
    if not np.all(np.abs(sign) == 1):
        raise InputFileError(f"{path}: blob/sign must be +1 or -1, found {sorted(set(sign.tolist()))[:4]}; "
                             f"pass a particle .cs written by cryoSPARC")
    table = CsParticleTable(path=path, particles=particles, optics=None, image_sign=sign,
                            dataset=dataset)
    logger.info("read %d particles from %s (cryoSPARC dataset, %d fields; blob/sign %s)",
                len(table), path, len(fields), ", ".join(f"{v:g}" for v in np.unique(sign)))
    return table


def star_to_dataset(table: ParticleTable, box_size: int | None = None, seed: int = 0) -> Dataset:
    """Describe RELION particles as a cryoSPARC particle dataset (blob + ctf slots).

    The inverse of :func:`read_cs_particles`, with cryoSPARC's dtypes (float32): ``blob/path``
    is the stack as named in ``rlnImageName`` (relative to the RELION project folder),
    ``blob/sign`` is +1 (RELION stacks are used as stored), ``ctf/exp_group_id`` is the optics
    group - 1, and ``uid`` is drawn from ``seed``. Used by ``--cs_out`` for a STAR input.

    Raises
    ------
    InputFileError
        If a CTF column is missing, or no box size is known (no ``rlnImageSize`` and no
        ``box_size``).
    """
    joined = table.per_particle()
    n = len(joined)
    names, slices = _parse_image_names(table.path, joined[star_io.IMAGE_NAME])
    box = _box_sizes(table, joined, box_size)
    dataset = Dataset.allocate(n, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                                   ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
                                   ("ctf/type", "O"), ("ctf/exp_group_id", "<u4")]
                               + [(f, "<f4") for f in CTF_FIELDS])
    dataset["uid"] = _uids(n, seed)
    dataset["blob/path"] = names.to_numpy(dtype=object)
    dataset["blob/idx"] = slices
    dataset["blob/shape"] = np.stack([box, box], axis=1)
    dataset["blob/psize_A"] = joined[star_io.IMAGE_PIXEL_SIZE].to_numpy(np.float64)
    dataset["blob/sign"] = 1.0
    dataset["ctf/type"] = "imported"
    group = (joined[star_io.OPTICS_GROUP].to_numpy(np.int64) - 1 if star_io.OPTICS_GROUP in joined
             else np.zeros(n, dtype=np.int64))
    dataset["ctf/exp_group_id"] = np.clip(group, 0, None)
    defaults = {star_io.PHASE_SHIFT: 0.0, star_io.CTF_BFACTOR: 0.0, star_io.CTF_SCALEFACTOR: 1.0}
    for field, (column, factor) in CTF_FIELDS.items():
        if column in joined.columns:
            dataset[field] = joined[column].to_numpy(np.float64) / factor
        elif column in defaults:
            dataset[field] = defaults[column]
        else:
            raise InputFileError(f"{table.path}: no '{column}' column for cryoSPARC's {field}; "
                                 f"run CTF estimation before extraction, or leave out --cs_out")
    return dataset


def write_cs_outputs(prefix: str | os.PathLike, table: ParticleTable, result: ClassificationResult,
                     seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Write ``<prefix>_class_averages.mrc``, ``<prefix>_templates.cs``, ``<prefix>_particles.cs``.

    Written when the input was a .cs, or for any input with ``force`` (``--cs_out``); returns
    ``{}`` otherwise. Each file is written atomically, the particles last.

    ``_particles.cs``: every field of the input dataset (a STAR input is described by
    :func:`star_to_dataset`), in input row order, with the alignments2D slot replaced by this
    result: ``class`` (0-based, = slice of the averages), ``pose`` (in-plane angle, rad, in
    [0, 2 pi) as cryoSPARC writes it),
    ``shift`` (px, of ``psize_A`` = ``blob/psize_A``), ``class_posterior`` (confidence),
    ``class_ess`` (1 / class_posterior, exact when the rest of the posterior sits on equally
    likely classes) and ``split`` (seeded random halves 0/1). A previous alignments2D slot is
    dropped: its fields belong to another classification.

    ``_templates.cs``: one row per class with ``blob/path`` (the .mrc as named by ``prefix``),
    ``blob/idx`` = class, ``blob/shape``, ``blob/psize_A``, ``blob/sign`` +1 (the averages are
    protein-positive) and ``blob/res_A`` (estimated resolution; 999 for an empty class).
    """
    if not (force or isinstance(table, CsParticleTable)):
        return {}
    make_output_folder(prefix)            # writability: checked once, when the run claimed the prefix
    prefix = os.fspath(prefix)
    paths = {key: Path(f"{prefix}{suffix}") for key, suffix in
             zip(("cs_class_averages", "cs_templates", "cs_particles"), CS_OUTPUT_SUFFIXES)}
    source = getattr(table, "dataset", None)
    if source is None:
        source = star_to_dataset(table, int(result.class_averages.shape[-1]), seed)
    particles = particles_dataset(source, result, seed)
    templates = templates_dataset(result, os.fspath(paths["cs_class_averages"]), seed)
    write_averages_mrc(paths["cs_class_averages"], result)
    save_dataset(paths["cs_templates"], templates)
    save_dataset(paths["cs_particles"], particles)
    logger.info("wrote cryoSPARC outputs %s and %s (%d classes)", paths["cs_particles"],
                paths["cs_templates"], result.n_classes)
    return paths


def particles_dataset(source: Dataset, result: ClassificationResult, seed: int = 0) -> Dataset:
    """``source`` (uid and every field kept) with this result as its alignments2D slot."""
    n = len(source)
    if len(result.labels) != n:
        raise ValueError(f"result has {len(result.labels)} labels for a dataset of {n} particles")
    stale = [f for f in source.fields() if f.startswith("alignments2D/")]
    out = source.copy()
    if stale:
        out = out.drop_fields(stale)
        logger.info("replacing the input's alignments2D slot (%d fields)", len(stale))
    out.add_fields(ALIGNMENT_FIELDS)
    confidence = np.clip(np.asarray(result.confidence, dtype=np.float64), 1e-6, 1.0)
    out["alignments2D/class"] = np.asarray(result.labels, dtype=np.uint32)
    out["alignments2D/pose"] = np.mod(np.deg2rad(np.asarray(result.psi_deg, dtype=np.float64)), 2 * np.pi)
    out["alignments2D/shift"] = np.asarray(result.origin_px, dtype=np.float64)
    out["alignments2D/psize_A"] = np.asarray(source["blob/psize_A"], dtype=np.float64)
    out["alignments2D/class_posterior"] = np.asarray(result.confidence, dtype=np.float64)
    out["alignments2D/class_ess"] = 1.0 / confidence
    out["alignments2D/split"] = (np.random.default_rng(seed).permutation(n) % 2).astype(np.uint32)
    return out


def templates_dataset(result: ClassificationResult, mrc_path: str, seed: int = 0) -> Dataset:
    """One row per class describing slice ``class`` of ``mrc_path`` (cryoSPARC templates)."""
    k, box = result.n_classes, int(result.class_averages.shape[-1])
    counts = result.class_counts()
    resolution = np.asarray(result.class_resolution, dtype=np.float64).copy()
    resolution[~np.isfinite(resolution) | (counts == 0)] = 999.0
    templates = Dataset.allocate(k, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                                     ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("blob/res_A", "<f4")])
    templates["uid"] = _uids(k, seed + 1)
    templates["blob/path"] = np.array([mrc_path] * k, dtype=object)
    templates["blob/idx"] = np.arange(k, dtype=np.uint32)
    templates["blob/shape"] = np.full((k, 2), box, dtype=np.uint32)
    templates["blob/psize_A"] = float(result.pixel_size)
    templates["blob/sign"] = 1.0
    templates["blob/res_A"] = resolution
    return templates


def write_averages_mrc(path: Path, result: ClassificationResult) -> None:
    """The class averages as one float32 .mrc stack, slice = class (empty classes blank)."""
    averages = np.array(result.class_averages, dtype=np.float32, copy=True)
    averages[result.class_counts() == 0] = 0.0
    averages[~np.isfinite(averages)] = 0.0
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(averages)
            mrc.header.ispg = 0          # a stack of images, as cryoSPARC writes its classes
            mrc.voxel_size = float(result.pixel_size)


def save_dataset(path: str | os.PathLike, dataset: Dataset) -> None:
    """Write a .cs atomically (temporary name in the same folder, then rename)."""
    with atomic_path(Path(path)) as tmp:
        dataset.save(tmp)


# --- helpers -----------------------------------------------------------------------------

def _load_dataset(path: Path) -> Dataset:
    if not path.is_file():
        raise InputFileError(f"{path}: cryoSPARC particle file not found; check the path "
                             f"(e.g. P3/J12/J12_particles.cs)")
    try:
        return Dataset.load(path)
    except Exception as exc:  # cryosparc-tools raises several types on a foreign file
        raise InputFileError(f"{path}: cannot be read as a cryoSPARC dataset ({type(exc).__name__}: "
                             f"{exc}); pass a particle .cs written by cryoSPARC") from None


def _as_text(column) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(column)]


def _strip_marker(name: str) -> str:
    """cryoSPARC writes ``>`` before paths of imported files (``>J3/imported/x.mrc``)."""
    return name[1:] if name.startswith(">") else name


def _image_names(path: Path, dataset: Dataset, base: Path) -> list[str]:
    """``N@stack`` per particle, each blob located once; one error naming every missing blob."""
    blobs = pd.Series([_strip_marker(p) for p in _as_text(dataset["blob/path"])])
    codes, unique = pd.factorize(blobs)
    folders = [base] + [f for f in list(path.resolve().parents)[:PARENT_LEVELS]
                        if f != base.resolve()]
    located, missing = [], []
    for name in unique:
        blob = Path(name)
        candidates = [blob] if blob.is_absolute() else [folder / blob for folder in folders]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(name)
        # as written when it resolves against data_dir (the stack reader uses the same base)
        located.append(name if found == candidates[0] else str(found))
    if missing:
        shown = ", ".join(missing[:3])
        tried = ", ".join(str(f) for f in folders)
        raise InputFileError(f"{path}: {len(missing)} of {len(unique)} particle blobs not found "
                             f"(e.g. {shown}); blob/path was resolved against {tried}; pass "
                             f"--data_dir <cryoSPARC project folder>")
    slices = np.asarray(dataset["blob/idx"], dtype=np.int64) + 1
    stacks = np.asarray(located, dtype=object)[codes]
    return [f"{s:06d}@{p}" for s, p in zip(slices, stacks)]


def _check_pixel_size(path: Path, apix: NDArray[np.float64]) -> None:
    bad = ~(np.isfinite(apix) & (apix > 0))
    if bad.any():
        raise InputFileError(f"{path}: blob/psize_A is not a positive number for {int(bad.sum())} of "
                             f"{len(apix)} particles; fix the pixel size in cryoSPARC (e.g. re-import "
                             f"or re-extract) and export the particles again")


def _warn_missing_ctf(path: Path, fields: set[str]) -> None:
    needed = [f for f, (column, _) in CTF_FIELDS.items()
              if column in (star_io.DEFOCUS_U, star_io.DEFOCUS_V, star_io.DEFOCUS_ANGLE, star_io.VOLTAGE,
                            star_io.SPHERICAL_ABERRATION, star_io.AMPLITUDE_CONTRAST)]
    missing = [f for f in needed if f not in fields]
    if missing:
        logger.warning("%s: no %s (the ctf slot); pass a .cs that holds it (e.g. joined with the job's "
                       "passthrough file) or classify with --no_ctf", path, ", ".join(missing))


def _warn_ignored_aberrations(path: Path, dataset: Dataset, fields: set[str]) -> None:
    present = [f for f in IGNORED_ABERRATIONS if f in fields and np.any(np.asarray(dataset[f]) != 0)]
    if "ctf/anisomag" in fields:
        mag = np.asarray(dataset["ctf/anisomag"], dtype=np.float64).reshape(-1, 4)
        if np.any(mag != 0) and not np.allclose(mag, [1, 0, 0, 1]):
            present.append("ctf/anisomag")
    if present:
        logger.warning("%s: %s are refined but not modelled here (as for rlnBeamTilt* in a STAR); "
                       "2D classification is rarely affected", path, ", ".join(present))


def _box_sizes(table: ParticleTable, joined: pd.DataFrame, box_size: int | None) -> NDArray[np.int64]:
    if star_io.IMAGE_SIZE in joined.columns:
        return joined[star_io.IMAGE_SIZE].to_numpy(np.int64)
    if box_size is None:
        raise InputFileError(f"{table.path}: no '{star_io.IMAGE_SIZE}' for cryoSPARC's blob/shape; "
                             f"add it to data_optics")
    return np.full(len(joined), int(box_size), dtype=np.int64)


def _uids(n: int, seed: int) -> NDArray[np.uint64]:
    """Unique 64-bit row ids, drawn from ``seed`` (cryoSPARC draws them at random too)."""
    rng = np.random.default_rng(seed)
    uids = np.unique(rng.integers(1, np.iinfo(np.int64).max, size=n, dtype=np.int64))
    while len(uids) < n:  # a collision in 2**63: draw the few missing again
        uids = np.unique(np.concatenate([uids, rng.integers(1, np.iinfo(np.int64).max, n - len(uids))]))
    return rng.permutation(uids).astype(np.uint64)
