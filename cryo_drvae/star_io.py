"""Read RELION particle STAR files (3.0 and 3.1+) and write them back in 3.1+ format.

>>> table = read_particles("Extract/job005/particles.star")
>>> apix = pixel_sizes(table)                       # (n,) Å/px, from each particle's optics group
>>> write_particles("out_data.star", table, {CLASS_NUMBER: labels + 1})
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import starfile
from numpy.typing import ArrayLike, NDArray

from .errors import InputFileError
from .io_utils import atomic_path

logger = logging.getLogger(__name__)

# --- RELION column names (exactly as starfile returns them) -------------------------------
IMAGE_NAME = "rlnImageName"
MICROGRAPH_NAME = "rlnMicrographName"
OPTICS_GROUP = "rlnOpticsGroup"
OPTICS_GROUP_NAME = "rlnOpticsGroupName"
IMAGE_PIXEL_SIZE = "rlnImagePixelSize"
IMAGE_SIZE = "rlnImageSize"
IMAGE_DIMENSIONALITY = "rlnImageDimensionality"
VOLTAGE = "rlnVoltage"
SPHERICAL_ABERRATION = "rlnSphericalAberration"
AMPLITUDE_CONTRAST = "rlnAmplitudeContrast"
MAGNIFICATION = "rlnMagnification"
DETECTOR_PIXEL_SIZE = "rlnDetectorPixelSize"
DEFOCUS_U = "rlnDefocusU"
DEFOCUS_V = "rlnDefocusV"
DEFOCUS_ANGLE = "rlnDefocusAngle"
ORIGIN_X = "rlnOriginX"                 # RELION 3.0, pixels
ORIGIN_Y = "rlnOriginY"
ORIGIN_X_ANGST = "rlnOriginXAngst"      # RELION 3.1+, Å
ORIGIN_Y_ANGST = "rlnOriginYAngst"
ANGLE_ROT = "rlnAngleRot"
ANGLE_TILT = "rlnAngleTilt"
ANGLE_PSI = "rlnAnglePsi"
CLASS_NUMBER = "rlnClassNumber"
GROUP_NUMBER = "rlnGroupNumber"
NORM_CORRECTION = "rlnNormCorrection"
LOG_LIKELI_CONTRIBUTION = "rlnLogLikeliContribution"
MAX_VALUE_PROB_DISTRIBUTION = "rlnMaxValueProbDistribution"
PARTICLE_FIGURE_OF_MERIT = "rlnParticleFigureOfMerit"   # RELION: "developmental FOM for a particle"
NR_OF_SIGNIFICANT_SAMPLES = "rlnNrOfSignificantSamples"
COORDINATE_X = "rlnCoordinateX"
COORDINATE_Y = "rlnCoordinateY"
PHASE_SHIFT = "rlnPhaseShift"
CTF_BFACTOR = "rlnCtfBfactor"
CTF_SCALEFACTOR = "rlnCtfScalefactor"
MICROGRAPH_ORIGINAL_PIXEL_SIZE = "rlnMicrographOriginalPixelSize"
# model / optimiser / pipeline files
REFERENCE_IMAGE = "rlnReferenceImage"
ESTIMATED_RESOLUTION = "rlnEstimatedResolution"
PARTICLE_NUMBER = "rlnParticleNumber"
PIXEL_SIZE = "rlnPixelSize"
NR_CLASSES = "rlnNrClasses"
PIPELINE_NODE_NAME = "rlnPipeLineNodeName"
PIPELINE_NODE_TYPE = "rlnPipeLineNodeType"              # RELION 3.1: integer
PIPELINE_NODE_TYPE_LABEL = "rlnPipeLineNodeTypeLabel"   # RELION 4/5: text

#: Columns that hold text even when every value looks like a number (keeps leading zeros).
STRING_COLUMNS = [IMAGE_NAME, MICROGRAPH_NAME, OPTICS_GROUP_NAME, "rlnGroupName", "rlnCtfImage",
                  REFERENCE_IMAGE, "rlnMicrographMovieName", "rlnImageOriginalName"]
#: Per-particle columns of a RELION 3.0 file that move into data_optics on conversion.
LEGACY_OPTICS_COLUMNS = [VOLTAGE, SPHERICAL_ABERRATION, AMPLITUDE_CONTRAST, MAGNIFICATION,
                         DETECTOR_PIXEL_SIZE, IMAGE_PIXEL_SIZE, IMAGE_SIZE, IMAGE_DIMENSIONALITY]
STAR_VERSION_COMMENT = "# version 30001"

StarBlock = Union[pd.DataFrame, Mapping[str, object]]


@dataclass
class ParticleTable:
    """Particles of one STAR file, with their optics groups.

    Attributes
    ----------
    path : Path
        The STAR file that was read.
    particles : pandas.DataFrame
        One row per particle, in file order; columns exactly as starfile returned them.
    optics : pandas.DataFrame or None
        The ``data_optics`` table; ``None`` for a RELION 3.0 file (single data block).
    image_sign : numpy.ndarray or None
        ``(n,)`` factor the stored pixels are multiplied by when read (cryoSPARC's
        ``blob/sign``, see :mod:`cryo_drvae.cs_io`); ``None``: pixels as stored (RELION).
    """

    path: Path
    particles: pd.DataFrame
    optics: pd.DataFrame | None
    image_sign: NDArray[np.float32] | None = None

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def is_legacy(self) -> bool:
        """True for a RELION 3.0 file (optics values repeated on every particle row)."""
        return self.optics is None

    def per_particle(self) -> pd.DataFrame:
        """Particles with their optics-group columns joined onto each row.

        Returns
        -------
        pandas.DataFrame
            Same index and row order as ``particles``. Holds the optics columns (voltage in kV,
            Cs in mm, amplitude contrast, ...) and always ``rlnImagePixelSize`` (Å/px); for a
            3.0 file it is ``rlnDetectorPixelSize`` (µm) * 1e4 / ``rlnMagnification`` unless
            the file has ``rlnImagePixelSize`` itself. A column present in both tables keeps
            the particle's value.
        """
        joined = self.particles
        if self.optics is not None:
            rows = _optics_rows(self)
            extra = {col: self.optics[col].to_numpy()[rows] for col in self.optics.columns
                     if col != OPTICS_GROUP and col not in joined.columns}
            joined = pd.concat([joined, pd.DataFrame(extra, index=joined.index)], axis=1)
        else:
            joined = joined.copy()
        if IMAGE_PIXEL_SIZE not in joined.columns:
            joined[IMAGE_PIXEL_SIZE] = _pixel_size_from_detector(joined)
        return joined


def read_particles(path: str | os.PathLike, pixel_size: float | None = None) -> ParticleTable:
    """Read a RELION particles STAR file, 3.0 (one block) or 3.1/4/5 (optics + particles).

    Parameters
    ----------
    path : str or PathLike
        The particles STAR file, e.g. ``Extract/job005/particles.star``.
    pixel_size : float, optional
        Å/px for particles whose STAR file gives none (RELION's ``--angpix``); it is written into
        the table (``data_optics``, or the 3.0 rows), so the outputs carry it. A pixel size the
        file does give wins (with a warning when they differ).

    Returns
    -------
    ParticleTable

    Raises
    ------
    InputFileError
        If the file is missing, is not a STAR file, has no particles block, no
        ``rlnImageName`` column, no particles, references an optics group that
        ``data_optics`` lacks, or gives no pixel size.
    """
    path = Path(path)
    blocks = read_star_blocks(path)
    particles, optics = _pick_blocks(path, blocks)
    if IMAGE_NAME not in particles.columns:
        raise InputFileError(f"{path}: the particles block has no '{IMAGE_NAME}' column; "
                             f"pass a particles STAR file (e.g. from Extract)")
    if len(particles) == 0:
        raise InputFileError(f"{path}: the particles block contains no particles; "
                             f"pass a particles STAR file with at least one particle")
    table = ParticleTable(path=path, particles=particles, optics=optics)
    if pixel_size:
        _fill_pixel_size(table, float(pixel_size))
    _check_pixel_sizes(table)
    logger.info("read %d particles from %s (%s format)", len(table), path,
                "RELION 3.0" if table.is_legacy else "RELION 3.1+")
    return table


def pixel_sizes(table: ParticleTable) -> NDArray[np.float64]:
    """Pixel size in Å/px of each particle, shape ``(n,)``, from its optics group."""
    particles, optics = table.particles, table.optics
    if IMAGE_PIXEL_SIZE in particles.columns:
        return _float_column(particles, IMAGE_PIXEL_SIZE)
    if optics is None:
        return _pixel_size_from_detector(particles)
    if IMAGE_PIXEL_SIZE in optics.columns:
        return _float_column(optics, IMAGE_PIXEL_SIZE)[_optics_rows(table)]
    return table.per_particle()[IMAGE_PIXEL_SIZE].to_numpy(dtype=np.float64)


def origins_px(table: ParticleTable) -> NDArray[np.float64]:
    """Prior shifts ``(x, y)`` in pixels, shape ``(n, 2)``; zeros where the file has none.

    Taken from ``rlnOriginXAngst/YAngst`` divided by the pixel size (3.1+), else from the
    RELION 3.0 ``rlnOriginX/Y`` (already pixels). Missing values count as 0.
    """
    cols = table.particles.columns
    out = np.zeros((len(table), 2), dtype=np.float64)
    if ORIGIN_X_ANGST in cols or ORIGIN_Y_ANGST in cols:
        apix = pixel_sizes(table)
        for axis, name in enumerate((ORIGIN_X_ANGST, ORIGIN_Y_ANGST)):
            if name in cols:
                out[:, axis] = _float_column(table.particles, name) / apix
    else:
        for axis, name in enumerate((ORIGIN_X, ORIGIN_Y)):
            if name in cols:
                out[:, axis] = _float_column(table.particles, name)
    return np.nan_to_num(out, nan=0.0)


def write_particles(path: str | os.PathLike, table: ParticleTable,
                    new_columns: Mapping[str, ArrayLike], image_size: int | None = None) -> None:
    """Write particles as a RELION 3.1+ STAR file (``data_optics`` + ``data_particles``).

    Every input column and the row order are kept. ``new_columns`` are appended, or replace
    an input column of the same name in place. A RELION 3.0 input is converted as
    ``relion_convert_star`` does: one optics group per distinct (voltage, Cs, Q0, pixel size),
    those columns (and ``rlnMagnification``/``rlnDetectorPixelSize``) move to ``data_optics``,
    each row gets ``rlnOpticsGroup``, and ``rlnOriginX/Y`` (px) become ``rlnOriginXAngst/YAngst``.
    Floats are written with full precision, so values read back are identical.

    Parameters
    ----------
    path : str or PathLike
        Output STAR file; written atomically (temporary name, then rename).
    table : ParticleTable
        The particles that were read.
    new_columns : mapping of str to array_like
        Column name -> ``(n,)`` values, in input row order.
    image_size : int, optional
        Box size in px for ``rlnImageSize`` in ``data_optics`` when the input lacks it.

    Raises
    ------
    ValueError
        If a new column does not have one value per particle, or a 3.0 input has no
        ``rlnImageSize`` and ``image_size`` was not given.
    """
    if table.is_legacy:
        optics, particles = _convert_legacy(table, image_size)
    else:
        optics, particles = _current_format(table, image_size)
    particles = _with_new_columns(particles, new_columns)
    write_star_blocks(path, {"optics": optics, "particles": particles})
    logger.info("wrote %d particles to %s", len(particles), path)


def write_star_blocks(path: str | os.PathLike, blocks: Mapping[str, StarBlock],
                      version_line: bool = True) -> None:
    """Write STAR data blocks atomically, RELION style (``# version 30001`` before each block).

    A DataFrame becomes a ``loop_`` block; a mapping becomes a key/value block; the name ``""``
    gives a bare ``data_`` block. Floats keep full precision (shortest repr that reads back
    identical); text containing whitespace is double-quoted; the separator is a tab.
    ``version_line=False`` omits the version comments (RELION 3.0 files have none).
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            for name, block in blocks.items():
                version = f"\n{STAR_VERSION_COMMENT}\n" if version_line else ""
                handle.write(f"{version}\ndata_{name}\n\n")
                if isinstance(block, pd.DataFrame):
                    _write_loop(handle, block)
                else:
                    _write_key_values(handle, block)
                handle.write("\n")


# --- reading helpers ---------------------------------------------------------------------

def read_star_blocks(path: str | os.PathLike, what: str = "RELION particles STAR file",
                     example: str = "Extract/job005/particles.star") -> dict[str, StarBlock]:
    """All data blocks of a STAR file: name -> DataFrame (loop) or dict (key/value block).

    Text columns of ``STRING_COLUMNS`` stay text. ``what`` and ``example`` word the errors.

    Raises
    ------
    InputFileError
        If the file is missing, cannot be parsed, or holds no data block.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: {what} not found; check the path (e.g. {example})")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=STRING_COLUMNS)
    except Exception as exc:  # starfile raises many types on malformed text
        raise InputFileError(f"{path}: cannot be parsed as a STAR file ({type(exc).__name__}: "
                             f"{exc}); pass a {what}") from None
    if not blocks:
        raise InputFileError(f"{path}: no STAR data blocks found (not a STAR file?); "
                             f"pass a {what}")
    return blocks


def _pick_blocks(path: Path, blocks: dict[str, StarBlock]) -> tuple[pd.DataFrame,
                                                                       pd.DataFrame | None]:
    """(particles, optics) of a 3.1+ file, or (single loop block, None) of a 3.0 file."""
    optics = blocks.get("optics")
    if isinstance(optics, Mapping):  # a one-row table written as key/value pairs
        optics = pd.DataFrame([dict(optics)])
    particles = blocks.get("particles")
    if particles is None and optics is None:
        loops = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
        particles = loops[0] if len(loops) == 1 else None
    if isinstance(particles, Mapping):
        particles = pd.DataFrame([dict(particles)])
    if not isinstance(particles, pd.DataFrame):
        raise InputFileError(f"{path}: no particles block (blocks found: "
                             f"{', '.join('data_' + k for k in blocks)}); pass a particles "
                             f"STAR file with a data_particles block (e.g. from Extract)")
    return particles, optics


def _optics_rows(table: ParticleTable) -> NDArray[np.intp]:
    """Row of ``table.optics`` for each particle."""
    path, optics, particles = table.path, table.optics, table.particles
    if optics is None:  # a 3.0 table has one implicit group
        return np.zeros(len(particles), dtype=np.intp)
    if OPTICS_GROUP not in particles.columns or OPTICS_GROUP not in optics.columns:
        if len(optics) == 1:
            return np.zeros(len(particles), dtype=np.intp)
        raise InputFileError(f"{path}: data_optics has {len(optics)} groups but "
                             f"'{OPTICS_GROUP}' is missing; add '{OPTICS_GROUP}' to both blocks")
    ids = pd.Index(optics[OPTICS_GROUP].to_numpy())
    if not ids.is_unique:
        raise InputFileError(f"{path}: data_optics lists an optics group twice; "
                             f"give each group a unique '{OPTICS_GROUP}'")
    rows = ids.get_indexer(particles[OPTICS_GROUP].to_numpy())
    if (rows < 0).any():
        missing = sorted(set(particles[OPTICS_GROUP].to_numpy()[rows < 0].tolist()))
        raise InputFileError(f"{path}: particles reference optics group(s) {missing[:5]} "
                             f"absent from data_optics; fix '{OPTICS_GROUP}' or add the "
                             f"groups to data_optics")
    return rows


def _pixel_size_from_detector(frame: pd.DataFrame) -> NDArray[np.float64]:
    """RELION 3.0 pixel size, Å: detector pixel (µm) * 1e4 / magnification; NaN if absent."""
    if DETECTOR_PIXEL_SIZE in frame.columns and MAGNIFICATION in frame.columns:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (_float_column(frame, DETECTOR_PIXEL_SIZE) * 1e4
                    / _float_column(frame, MAGNIFICATION))
    return np.full(len(frame), np.nan)


def image_sizes(table: ParticleTable) -> NDArray[np.float64] | None:
    """``rlnImageSize`` (px) of each particle from its optics group (or 3.0 row); None if absent."""
    if IMAGE_SIZE in table.particles.columns:
        return _float_column(table.particles, IMAGE_SIZE)
    if table.optics is not None and IMAGE_SIZE in table.optics.columns:
        return _float_column(table.optics, IMAGE_SIZE)[_optics_rows(table)]
    return None


def _fill_pixel_size(table: ParticleTable, value: float) -> None:
    """Give particles without a valid pixel size ``value`` (Å/px), in place."""
    with np.errstate(invalid="ignore"):
        apix = pixel_sizes(table)
        bad = ~(np.isfinite(apix) & (apix > 0))
    if (~bad).any() and not np.allclose(apix[~bad], value, rtol=1e-3):
        logger.warning("%s: --angpix %g ignored for %d particles: the STAR file gives %.4g Å/px",
                       table.path, value, int((~bad).sum()), float(np.median(apix[~bad])))
    if not bad.any():
        return
    if table.optics is None or IMAGE_PIXEL_SIZE in table.particles.columns:
        table.particles[IMAGE_PIXEL_SIZE] = np.where(bad, value, apix)
    else:
        rows = _optics_rows(table)
        current = (_float_column(table.optics, IMAGE_PIXEL_SIZE) if IMAGE_PIXEL_SIZE in table.optics.columns
                   else np.full(len(table.optics), np.nan))
        missing = np.zeros(len(table.optics), dtype=bool)
        missing[np.unique(rows[bad])] = True
        table.optics[IMAGE_PIXEL_SIZE] = np.where(missing, value, current)
    logger.info("%s: pixel size %g Å/px (--angpix) for %d particles without one", table.path, value,
                int(bad.sum()))


def _check_pixel_sizes(table: ParticleTable) -> None:
    """Raise if any particle lacks a finite, positive pixel size."""
    apix = pixel_sizes(table)
    bad = ~(np.isfinite(apix) & (apix > 0))
    if bad.any() and _has_pixel_size_column(table):
        where = "data_particles" if IMAGE_PIXEL_SIZE in table.particles.columns else "data_optics"
        frame = table.particles if where == "data_particles" else table.optics
        values = frame[IMAGE_PIXEL_SIZE].astype(str)
        shown = values[~(pd.to_numeric(frame[IMAGE_PIXEL_SIZE], errors="coerce") > 0)].unique()[:3]
        raise InputFileError(f"{table.path}: '{IMAGE_PIXEL_SIZE}' in {where} is not a positive number "
                             f"for {int(bad.sum())} of {len(apix)} particles (e.g. "
                             f"{', '.join(repr(v) for v in shown)}); set it to the pixel size in Å/px")
    if bad.any():
        raise InputFileError(f"{table.path}: no valid pixel size for {int(bad.sum())} of "
                             f"{len(apix)} particles; add '{IMAGE_PIXEL_SIZE}' (Å/px) to "
                             f"data_optics, or '{DETECTOR_PIXEL_SIZE}' and '{MAGNIFICATION}' "
                             f"to a RELION 3.0 file, or pass --angpix <Å/px>")


def _has_pixel_size_column(table: ParticleTable) -> bool:
    return IMAGE_PIXEL_SIZE in table.particles.columns or (
        table.optics is not None and IMAGE_PIXEL_SIZE in table.optics.columns)


def _float_column(frame: pd.DataFrame, name: str) -> NDArray[np.float64]:
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)


# --- writing helpers ---------------------------------------------------------------------

def _current_format(table: ParticleTable, image_size: int | None) -> tuple[pd.DataFrame,
                                                                             pd.DataFrame]:
    """Optics and particles of a 3.1+ table, ready to write (copies)."""
    optics = pd.DataFrame() if table.optics is None else table.optics.copy()
    particles = table.particles.copy()
    if OPTICS_GROUP not in particles.columns:  # read_particles allows this for one group only
        if OPTICS_GROUP not in optics.columns:
            optics[OPTICS_GROUP] = 1
        particles[OPTICS_GROUP] = optics[OPTICS_GROUP].iloc[0]
    if IMAGE_SIZE not in optics.columns and image_size is not None:
        optics[IMAGE_SIZE] = int(image_size)
    return optics, particles


def _convert_legacy(table: ParticleTable, image_size: int | None) -> tuple[pd.DataFrame,
                                                                             pd.DataFrame]:
    """Build data_optics from the per-row optics values of a RELION 3.0 table."""
    per_row = table.per_particle()
    keys = [c for c in (VOLTAGE, SPHERICAL_ABERRATION, AMPLITUDE_CONTRAST) if c in per_row]
    keys.append(IMAGE_PIXEL_SIZE)
    group_index = per_row.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
    first_rows = pd.Series(np.arange(len(per_row))).groupby(group_index).first().to_numpy()
    sizes = _legacy_image_sizes(table, per_row, first_rows, image_size)
    n_groups = len(first_rows)
    optics = pd.DataFrame({OPTICS_GROUP_NAME: [f"opticsGroup{g}" for g in range(1, n_groups + 1)],
                           OPTICS_GROUP: np.arange(1, n_groups + 1)})
    for col in keys[:-1]:
        optics[col] = per_row[col].to_numpy()[first_rows]
    optics[IMAGE_PIXEL_SIZE] = per_row[IMAGE_PIXEL_SIZE].to_numpy(dtype=np.float64)[first_rows]
    optics[IMAGE_SIZE] = sizes
    optics[IMAGE_DIMENSIONALITY] = 2

    apix = per_row[IMAGE_PIXEL_SIZE].to_numpy(dtype=np.float64)
    particles = _origins_to_angst(table.particles, apix)
    particles = particles.drop(columns=[c for c in LEGACY_OPTICS_COLUMNS if c in particles])
    particles[OPTICS_GROUP] = group_index + 1
    return optics, particles


def _legacy_image_sizes(table: ParticleTable, per_row: pd.DataFrame, first_rows: NDArray,
                        image_size: int | None) -> NDArray[np.int64]:
    """rlnImageSize per optics group: from the table if present, else ``image_size``."""
    if IMAGE_SIZE in per_row.columns:
        return per_row[IMAGE_SIZE].to_numpy()[first_rows].astype(np.int64)
    if image_size is None:
        raise ValueError(f"{table.path}: RELION 3.0 table has no '{IMAGE_SIZE}'; "
                         f"pass image_size=<box size in px> to write_particles")
    return np.full(len(first_rows), int(image_size), dtype=np.int64)


def _origins_to_angst(particles: pd.DataFrame, apix: NDArray[np.float64]) -> pd.DataFrame:
    """Replace rlnOriginX/Y (px) by rlnOriginXAngst/YAngst (Å) at the same column positions."""
    particles = particles.copy()
    for old, new in ((ORIGIN_X, ORIGIN_X_ANGST), (ORIGIN_Y, ORIGIN_Y_ANGST)):
        if old not in particles.columns:
            continue
        angst = _float_column(particles, old) * apix
        if new in particles.columns:
            particles = particles.drop(columns=[old])
        else:
            position = particles.columns.get_loc(old)
            particles = particles.drop(columns=[old])
            particles.insert(position, new, angst)
    return particles


def _with_new_columns(particles: pd.DataFrame,
                      new_columns: Mapping[str, ArrayLike]) -> pd.DataFrame:
    """Add or overwrite (in place of the old column) each new column."""
    for name, values in new_columns.items():
        array = np.asarray(values)
        if array.shape != (len(particles),):
            raise ValueError(f"new column '{name}' has shape {array.shape}, "
                             f"expected ({len(particles)},)")
        particles[name] = array
    return particles


def _write_loop(handle, frame: pd.DataFrame) -> None:
    """Write one ``loop_`` block: header lines, then rows via pandas (fast for 1e6 rows)."""
    handle.write("loop_\n")
    for number, name in enumerate(frame.columns, 1):
        handle.write(f"_{name} #{number}\n")
    quoted = frame.copy(deep=False)
    for name in frame.columns:
        column = frame[name]
        if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
            quoted[name] = _quote_strings(column)
    quoted.to_csv(handle, sep="\t", header=False, index=False, float_format=None,
                  na_rep="nan", quoting=csv.QUOTE_NONE, lineterminator="\n")


def _quote_strings(column: pd.Series) -> pd.Series:
    """Double-quote values that are empty or contain whitespace, as STAR requires."""
    text = column.astype(str)
    needs = text.str.contains(r"\s", regex=True) | (text == "")
    if needs.any():
        text = text.where(~needs, '"' + text + '"')
    return text


def _write_key_values(handle, block: Mapping[str, object]) -> None:
    """Write one key/value block, ``_rlnName value`` per line."""
    for key, value in block.items():
        handle.write(f"_{key}\t{_format_value(value)}\n")


def _format_value(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value)
    return f'"{text}"' if (text == "" or any(ch.isspace() for ch in text)) else text
