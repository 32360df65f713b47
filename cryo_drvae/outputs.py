"""Write a classification as RELION Class2D-style outputs (data STAR, model STAR, averages).

>>> check_outputs_writable("Class2D/job010/run_it001")        # before any work starts
>>> paths = write_run_outputs("Class2D/job010/run_it001", table, result)
>>> paths["model_star"]                                           # open it in Subset selection
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from . import scoring, star_io
from .errors import OutputError
from .io_utils import atomic_path, ensure_output_prefix, make_output_folder

logger = logging.getLogger(__name__)

#: RELION's own value for a resolution or accuracy that is undefined or not estimated.
UNDEFINED_VALUE = 999.0
#: Per-class particle count column in data_model_classes. RELION defines this label
#: ("Number of particles") and uses it for per-class counts in its consensus tables; the
#: model reader and the 2D selection GUI ignore it, but users can sort on it.
CLASS_COUNT_COLUMN = star_io.PARTICLE_NUMBER

# Neutral ML statistics that RELION's 2D classification adds; written only where absent.
_NEUTRAL_PARTICLE_COLUMNS: dict[str, object] = {
    star_io.ANGLE_ROT: 0.0,
    star_io.ANGLE_TILT: 0.0,
    star_io.NORM_CORRECTION: 1.0,
    star_io.LOG_LIKELI_CONTRIBUTION: 0.0,
    star_io.NR_OF_SIGNIFICANT_SAMPLES: 1,
}


@dataclass
class ClassificationResult:
    """Everything a run produces per particle and per class.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(n,)`` int, 0-based class of each particle, in input row order.
    psi_deg : numpy.ndarray
        ``(n,)`` in-plane angle in degrees, RELION convention.
    origin_px : numpy.ndarray
        ``(n, 2)`` x, y shift in pixels of the original image, RELION convention.
    confidence : numpy.ndarray
        ``(n,)`` assignment confidence in [0, 1] (written as rlnMaxValueProbDistribution).
    class_averages : numpy.ndarray
        ``(K, box, box)`` float32 class averages at the original box size.
    class_resolution : numpy.ndarray
        ``(K,)`` estimated resolution per class in Å (inf or large for empty classes).
    pixel_size : float
        Pixel size of the averages, Å/px.
    history : list of dict
        One entry per round: ``{"round": int, "changed_fraction": float, "loss": float, ...}``.
    particle_diameter_px : float
        Particle diameter in px of the averages, the circle ``scoring`` measures inside (0 = 60 % of the box).
    figure_of_merit : numpy.ndarray or None
        ``(n,)`` how well each particle fits its class average at its pose, in [0, 1]
        (``screening``; written as rlnParticleFigureOfMerit), None when not measured.
    """

    labels: np.ndarray
    psi_deg: np.ndarray
    origin_px: np.ndarray
    confidence: np.ndarray
    class_averages: np.ndarray
    class_resolution: np.ndarray
    pixel_size: float
    history: list[dict] = field(default_factory=list)
    particle_diameter_px: float = 0.0    # mask diameter for the class score (0 = 60 % of the box)
    figure_of_merit: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        """Number of classes K (slices of ``class_averages``)."""
        return int(self.class_averages.shape[0])

    def class_counts(self) -> NDArray[np.int64]:
        """``(K,)`` number of particles in each class."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.n_classes)


def output_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """The three output file names for a prefix, e.g. ``run_it001`` -> ``run_it001_data.star``."""
    prefix = os.fspath(prefix)
    return {"data_star": Path(f"{prefix}_data.star"),
            "model_star": Path(f"{prefix}_model.star"),
            "class_averages": Path(f"{prefix}_class_averages.mrcs")}


def check_outputs_writable(prefix: str | os.PathLike) -> None:
    """Create the folder of ``prefix`` and prove that a file can be written there.

    Call this before any work starts, so a bad ``--o`` fails in seconds, not hours.

    Raises
    ------
    OutputError
        If the prefix is an existing folder, or its folder cannot be created or written.
    """
    if Path(prefix).is_dir():
        raise OutputError(f"{prefix}: is a folder, expected a file prefix; give a prefix "
                          f"such as {Path(prefix) / 'run'}")
    folder = ensure_output_prefix(prefix).parent
    try:  # os.access says yes to root even on read-only mounts; really try a write
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cryo_drvae_probe"):
            pass
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write in the output folder ({exc.strerror}); "
                          f"choose an --o prefix in a writable folder") from None


def write_run_outputs(prefix: str | os.PathLike, table: star_io.ParticleTable,
                      result: ClassificationResult) -> dict[str, Path]:
    """Write ``<prefix>_class_averages.mrcs``, ``<prefix>_model.star``, ``<prefix>_data.star``.

    Every file is written atomically; the data STAR comes last, so its presence means the
    run's outputs are complete.

    The data STAR holds the input particles (3.1+ format, all input columns) plus
    ``rlnClassNumber`` (1-based), ``rlnAnglePsi``, ``rlnOriginXAngst/YAngst`` (origin in px
    times each particle's pixel size), ``rlnMaxValueProbDistribution`` (confidence) and, when
    measured, ``rlnParticleFigureOfMerit`` (the particle's fit to its class average, ``screening``); where
    the input lacks them, RELION's neutral values ``rlnGroupNumber`` 1, ``rlnAngleRot`` 0,
    ``rlnAngleTilt`` 0, ``rlnNormCorrection`` 1, ``rlnLogLikeliContribution`` 0 and
    ``rlnNrOfSignificantSamples`` 1.

    The model STAR has ``data_model_general`` and ``data_model_classes``, one row per class
    in class order (empty classes included, with an all-zero slice). ``rlnReferenceImage``
    is ``NNNNNN@<prefix>_class_averages.mrcs`` with the prefix exactly as given (RELION wants
    project-relative paths). Accuracies are not estimated and hold RELION's ``999``; a
    non-finite resolution is written as ``999``; ``rlnOverallFourierCompleteness`` is 1 (0 for
    an empty class). The particle count of each class is in ``rlnParticleNumber``, its quality
    score (0-1, higher is better, 0 for an empty class; ``scoring.class_scores``) in ``rlnClassScore``.

    Parameters
    ----------
    prefix : str or PathLike
        Output prefix, e.g. ``Class2D/job010/run_it001``, relative to the project folder.
    table : ParticleTable
        The particles that were classified.
    result : ClassificationResult
        The classification, in the table's row order.

    Returns
    -------
    dict of str to Path
        ``{"data_star": ..., "model_star": ..., "class_averages": ...}``.

    Raises
    ------
    OutputError
        If the output folder cannot be written.
    ValueError
        If the result's arrays do not match the table or each other.
    """
    _check_result(table, result)
    make_output_folder(prefix)            # writability: checked once, when the run claimed the prefix
    paths = output_paths(prefix)
    counts = result.class_counts()
    _write_class_averages(paths["class_averages"], result, counts)
    averages_name = f"{os.fspath(prefix)}_class_averages.mrcs"   # exactly as given
    star_io.write_star_blocks(paths["model_star"],
                              _model_blocks(averages_name, table, result, counts))
    star_io.write_particles(paths["data_star"], table, _particle_columns(table, result),
                            image_size=int(result.class_averages.shape[-1]))
    logger.info("wrote %d particles in %d classes to %s", len(table), result.n_classes,
                paths["data_star"])
    return paths


# --- helpers -----------------------------------------------------------------------------

def _check_result(table: star_io.ParticleTable, result: ClassificationResult) -> None:
    """Shapes must agree with the table and with each other."""
    n, k = len(table), result.n_classes
    expected = {"labels": (n,), "psi_deg": (n,), "origin_px": (n, 2), "confidence": (n,),
                "class_resolution": (k,)}
    for name, shape in expected.items():
        actual = np.shape(getattr(result, name))
        if actual != shape:
            raise ValueError(f"ClassificationResult.{name} has shape {actual}, expected {shape}")
    averages = np.shape(result.class_averages)
    if len(averages) != 3 or averages[1] != averages[2] or k < 1:
        raise ValueError(f"ClassificationResult.class_averages has shape {averages}, "
                         f"expected (K, box, box) with K >= 1")
    labels = np.asarray(result.labels)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"ClassificationResult.labels must lie in [0, {k}), got "
                         f"{labels.min()}..{labels.max()}")


def _particle_columns(table: star_io.ParticleTable,
                      result: ClassificationResult) -> dict[str, NDArray]:
    """New data-STAR columns, in the order RELION's Class2D adds them."""
    n, present = len(table), set(table.particles.columns)
    origin_angst = np.asarray(result.origin_px, dtype=np.float64) \
        * star_io.pixel_sizes(table)[:, None]
    columns: dict[str, NDArray] = {}
    if star_io.GROUP_NUMBER not in present:
        columns[star_io.GROUP_NUMBER] = np.ones(n, dtype=np.int64)
    for name in (star_io.ANGLE_ROT, star_io.ANGLE_TILT):
        if name not in present:
            columns[name] = np.full(n, _NEUTRAL_PARTICLE_COLUMNS[name])
    columns[star_io.ANGLE_PSI] = np.asarray(result.psi_deg, dtype=np.float64)
    columns[star_io.ORIGIN_X_ANGST] = origin_angst[:, 0]
    columns[star_io.ORIGIN_Y_ANGST] = origin_angst[:, 1]
    columns[star_io.CLASS_NUMBER] = np.asarray(result.labels, dtype=np.int64) + 1
    for name in (star_io.NORM_CORRECTION, star_io.LOG_LIKELI_CONTRIBUTION):
        if name not in present:
            columns[name] = np.full(n, _NEUTRAL_PARTICLE_COLUMNS[name])
    columns[star_io.MAX_VALUE_PROB_DISTRIBUTION] = np.asarray(result.confidence,
                                                              dtype=np.float64)
    if star_io.NR_OF_SIGNIFICANT_SAMPLES not in present:
        columns[star_io.NR_OF_SIGNIFICANT_SAMPLES] = np.ones(n, dtype=np.int64)
    if result.figure_of_merit is not None:
        columns[star_io.PARTICLE_FIGURE_OF_MERIT] = np.asarray(result.figure_of_merit, dtype=np.float64)
    return columns


def _clean_averages(result: ClassificationResult, counts: NDArray[np.int64]) -> NDArray:
    """float32 averages; empty classes all zero; non-finite pixels zeroed with a warning."""
    averages = np.array(result.class_averages, dtype=np.float32, copy=True)
    averages[counts == 0] = 0.0
    finite = np.isfinite(averages)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=(1, 2))) + 1
        logger.warning("class averages %s contain NaN/Inf pixels; writing them as 0",
                       bad.tolist())
        averages[~finite] = 0.0
    return averages


def _write_class_averages(path: Path, result: ClassificationResult,
                          counts: NDArray[np.int64]) -> None:
    """One float32 slice per class, header as RELION writes its classes.mrcs."""
    averages = _clean_averages(result, counts)
    k, box = averages.shape[0], averages.shape[-1]
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(averages)
            mrc.header.ispg = 0                      # image stack, not a volume
            mrc.header.mx, mrc.header.my, mrc.header.mz = box, box, k
            mrc.voxel_size = float(result.pixel_size)
            mrc.header.cella.z = 0.0                 # RELION stores z = 0 for 2D classes


def _model_blocks(averages_name: str, table: star_io.ParticleTable,
                  result: ClassificationResult,
                  counts: NDArray[np.int64]) -> dict[str, object]:
    """data_model_general (key/value) and data_model_classes (loop)."""
    k, box = result.n_classes, int(result.class_averages.shape[-1])
    resolution = np.asarray(result.class_resolution, dtype=np.float64).copy()
    resolution[~np.isfinite(resolution) | (counts == 0)] = UNDEFINED_VALUE
    occupied = resolution[counts > 0]
    general = {
        "rlnReferenceDimensionality": 2,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": box,
        "rlnCurrentResolution": float(occupied.min()) if occupied.size else UNDEFINED_VALUE,
        "rlnCurrentImageSize": box,
        star_io.PIXEL_SIZE: float(result.pixel_size),
        star_io.NR_CLASSES: k,
        "rlnNrBodies": 1,
        "rlnNrGroups": 1,
        "rlnIsHelix": 0,
        "rlnAveragePmax": float(np.mean(result.confidence)) if len(table) else 0.0,
    }
    classes = pd.DataFrame({
        star_io.REFERENCE_IMAGE: [f"{i:06d}@{averages_name}" for i in range(1, k + 1)],
        "rlnClassDistribution": counts / max(int(counts.sum()), 1),
        "rlnAccuracyRotations": np.full(k, UNDEFINED_VALUE),
        "rlnAccuracyTranslationsAngst": np.full(k, UNDEFINED_VALUE),
        star_io.ESTIMATED_RESOLUTION: resolution,
        "rlnOverallFourierCompleteness": np.where(counts > 0, 1.0, 0.0),
        "rlnClassPriorOffsetX": np.zeros(k),
        "rlnClassPriorOffsetY": np.zeros(k),
        CLASS_COUNT_COLUMN: counts.astype(np.int64),
        scoring.SCORE_COLUMN: scoring.class_scores(result, result.particle_diameter_px or None),
    })
    return {"model_general": general, "model_classes": classes}
