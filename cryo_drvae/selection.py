"""Subset selection of good classes, as RELION's Select job (and its 4.0 class ranker) writes it.

>>> paths = select_classes(SelectionConfig("Class2D/job010/run", "Select/job012/", min_score=0.9))
>>> paths["particles"]          # Select/job012/particles.star: the kept particles, every column kept

A class is kept when it has members and passes every given criterion: ``rlnClassScore >= min_score``
(``scoring``), ``rlnEstimatedResolution <= min_resolution`` (Å) and membership of ``classes``.
With ``classes`` alone, exactly those classes are kept. Within the kept classes, particles whose
``rlnParticleFigureOfMerit`` (their fit to the class average, ``screening``) is below ``min_fom``
are dropped: aggregates and broken particles that joined a real view's class; a data STAR without
that column (RELION's Class2D) gets it measured here. The score is read from the model STAR;
a model without it (e.g. RELION's own Class2D output) is scored here from its class averages and
data STAR (``scoring.class_scores``).

Outputs in the output folder, all written only after every input has been read and checked:
``particles.star`` (optics table and every column of the kept particles, row order kept),
``class_averages.star`` (the kept classes' ``data_model_classes`` rows, best score first),
``rank_model.star`` (``data_model_general`` and every class with ``rlnClassScore`` and ``rlnSelected``)
and ``rank_classes.png`` (gallery, best score first, kept classes framed green, rejected ones red and faded).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from . import plots, scoring, screening, star_io
from .config import DIAMETER_FRACTION
from .errors import ConfigError, InputFileError
from .io_utils import ensure_output_prefix
from .stack import ParticleStack

logger = logging.getLogger(__name__)

#: Default --min_score: see docs/selection.md for how it was chosen.
DEFAULT_MIN_SCORE = 0.9
SELECTED_COLUMN = "rlnSelected"
_MISSING_IMAGES_FIX = ("the images are needed to measure each particle's fit: run select from the project "
                       "folder the classification ran in, or pass --min_fom 0 to keep whole classes")
OUTPUT_NAMES = {"particles": "particles.star", "class_averages": "class_averages.star",
                "rank_model": "rank_model.star", "gallery": "rank_classes.png"}


@dataclass(frozen=True)
class SelectionConfig:
    """What to select.

    Attributes
    ----------
    input : classification prefix (``Class2D/job010/run``), its ``_model.star`` or ``_data.star``,
        or a job folder holding one run (the last ``run_itNNN`` when there are several).
    output_dir : folder for the Select outputs (created).
    min_score : keep classes with ``rlnClassScore >= min_score`` (None: ``DEFAULT_MIN_SCORE``, or no
        score criterion when ``classes`` is given).
    min_resolution : keep classes whose estimated resolution is at least this good, Å (None: any).
    classes : 1-based class numbers to keep (None: all that pass the criteria).
    min_fom : within kept classes, keep particles with ``rlnParticleFigureOfMerit >= min_fom``
        (None: ``screening.DEFAULT_MIN_FOM``, measured here when the data STAR lacks the column;
        0: keep them all).
    """

    input: str
    output_dir: str
    min_score: float | None = None
    min_resolution: float | None = None
    classes: tuple[int, ...] | None = None
    min_fom: float | None = None

    def __post_init__(self) -> None:
        if self.min_fom is not None and not 0.0 <= self.min_fom <= 1.0:
            raise ConfigError(f"--min_fom must be in [0, 1], got {self.min_fom}")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"--min_score must be in [0, 1], got {self.min_score}")
        if self.min_resolution is not None and self.min_resolution <= 0:
            raise ConfigError(f"--min_resolution must be > 0 Å, got {self.min_resolution}")
        if self.classes is not None and (not self.classes or min(self.classes) < 1):
            raise ConfigError(f"--classes must list class numbers >= 1 (e.g. 1,4,7), got {self.classes}")

    @property
    def effective_min_score(self) -> float | None:
        """The score threshold applied: the given one, else the default unless classes are listed."""
        if self.min_score is not None:
            return self.min_score
        return None if self.classes is not None else DEFAULT_MIN_SCORE

    @property
    def effective_min_fom(self) -> float:
        """The figure-of-merit threshold applied: the given one, else the default."""
        return screening.DEFAULT_MIN_FOM if self.min_fom is None else self.min_fom


@dataclass
class Selection:
    """A classification's classes with their scores and which are kept."""

    prefix: str
    general: dict
    classes: pd.DataFrame          # data_model_classes, with rlnClassScore and rlnSelected
    particles: star_io.ParticleTable
    averages_path: Path
    min_fom: float = 0.0           # particles of kept classes below this figure of merit are dropped

    @property
    def kept(self) -> np.ndarray:
        """``(K,)`` bool, class k (0-based) kept."""
        return self.classes[SELECTED_COLUMN].to_numpy() == 1

    def labels(self) -> np.ndarray:
        """``(n,)`` 0-based class of each particle."""
        return pd.to_numeric(self.particles.particles[star_io.CLASS_NUMBER]).to_numpy(np.int64) - 1

    def in_kept_classes(self) -> np.ndarray:
        """``(n,)`` bool, particle in a kept class."""
        return self.kept[self.labels()]

    def kept_particles(self) -> np.ndarray:
        """``(n,)`` bool, particle kept: in a kept class and fitting its average."""
        return self.in_kept_classes() & self.fitting_particles()

    def dropped_per_class(self) -> np.ndarray:
        """``(K,)`` particles of each kept class left out for a figure of merit below ``min_fom``."""
        return np.bincount(self.labels()[self.in_kept_classes() & ~self.fitting_particles()],
                           minlength=len(self.classes))

    def fitting_particles(self) -> np.ndarray:
        """``(n,)`` bool, figure of merit at least ``min_fom`` (all True without the column)."""
        table = self.particles.particles
        if not self.min_fom or star_io.PARTICLE_FIGURE_OF_MERIT not in table:
            return np.ones(len(table), bool)
        return pd.to_numeric(table[star_io.PARTICLE_FIGURE_OF_MERIT]).to_numpy(np.float64) >= self.min_fom


def parse_classes(text: str | None) -> tuple[int, ...] | None:
    """``"1,4,7"`` -> ``(1, 4, 7)``; None or empty -> None."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(t) for t in re.split(r"[,\s]+", text.strip()) if t)
    except ValueError:
        raise ConfigError(f"--classes: expected class numbers such as 1,4,7, got {text!r}") from None


def resolve_prefix(given: str) -> str:
    """The classification prefix for ``--i``: a prefix, a ``_model/_data/_optimiser.star`` or a folder."""
    path = Path(given)
    for suffix in ("_model.star", "_data.star", "_optimiser.star"):
        if path.name.endswith(suffix):
            return str(path)[: -len(suffix)]
    if path.is_dir():
        models = sorted(path.glob("*_model.star"), key=lambda p: (len(p.name), p.name))
        if not models:
            raise InputFileError(f"{given}: folder holds no *_model.star; pass a classification "
                                 f"prefix such as Class2D/job010/run")
        return str(models[-1])[: -len("_model.star")]
    return given


def _read_model(prefix: str) -> tuple[dict, pd.DataFrame]:
    path = Path(f"{prefix}_model.star")
    if not path.is_file():
        raise InputFileError(f"{path}: model STAR file not found; pass --i the prefix that classify "
                             f"--o was given (e.g. Class2D/job010/run)")
    blocks = star_io.read_star_blocks(path, what="2D classification's _model.star",
                                      example="Class2D/job010/run_model.star")
    classes = blocks.get("model_classes")
    if not isinstance(classes, pd.DataFrame) or star_io.REFERENCE_IMAGE not in classes:
        raise InputFileError(f"{path}: no data_model_classes block with rlnReferenceImage; pass a 2D "
                             f"classification's _model.star")
    general = blocks.get("model_general")
    return dict(general) if isinstance(general, dict) else {}, classes.reset_index(drop=True)


def _averages_path(prefix: str, classes: pd.DataFrame) -> Path:
    """The stack that ``rlnReferenceImage`` names (project-relative, else beside the model STAR)."""
    name = str(classes[star_io.REFERENCE_IMAGE].iloc[0]).partition("@")[2]
    for candidate in (Path(name), Path(prefix).parent / Path(name).name):
        if candidate.is_file():
            return candidate
    raise InputFileError(f"{prefix}_model.star: class averages {name} not found; run select from the "
                         f"project folder the classification ran in")


def _read_averages(path: Path) -> tuple[np.ndarray, float]:
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float32).reshape(-1, *mrc.data.shape[-2:]), \
            float(mrc.voxel_size.x)


def _scores(classes: pd.DataFrame, particles: star_io.ParticleTable, averages_path: Path,
            general: dict) -> np.ndarray:
    """The model's rlnClassScore, or scores computed here from the averages and members."""
    if scoring.SCORE_COLUMN in classes:
        return pd.to_numeric(classes[scoring.SCORE_COLUMN]).to_numpy(np.float64)
    logger.info("%s has no %s column: scoring its classes from the averages", averages_path,
                scoring.SCORE_COLUMN)
    averages, pixel_size = _read_averages(averages_path)
    pixel_size = float(general.get(star_io.PIXEL_SIZE, pixel_size) or pixel_size)
    k = len(classes)
    labels = pd.to_numeric(particles.particles[star_io.CLASS_NUMBER]).to_numpy(np.int64) - 1
    confidence = (pd.to_numeric(particles.particles[star_io.MAX_VALUE_PROB_DISTRIBUTION]).to_numpy(np.float64)
                  if star_io.MAX_VALUE_PROB_DISTRIBUTION in particles.particles else np.ones(len(labels)))
    counts = np.bincount(labels, minlength=k)[:k]
    resolution = (pd.to_numeric(classes[star_io.ESTIMATED_RESOLUTION]).to_numpy(np.float64)
                  if star_io.ESTIMATED_RESOLUTION in classes else np.full(k, scoring.UNDEFINED_RESOLUTION))
    features = scoring.class_features(averages[:k], counts, resolution, pixel_size,
                                      scoring.member_means(labels, confidence, k))
    return scoring.combine(features)


def load_selection(cfg: SelectionConfig) -> Selection:
    """Read the classification, score its classes and decide which are kept (nothing is written).

    Raises
    ------
    InputFileError
        If the model or data STAR or the class averages are missing or malformed, or the data
        STAR names a class the model lacks.
    ConfigError
        If ``classes`` names a class the model lacks.
    """
    prefix = resolve_prefix(cfg.input)
    general, classes = _read_model(prefix)
    data_path = Path(f"{prefix}_data.star")
    if not data_path.is_file():
        raise InputFileError(f"{data_path}: data STAR file not found next to {prefix}_model.star; "
                             f"pass --i a complete classification")
    particles = star_io.read_particles(data_path)
    if star_io.CLASS_NUMBER not in particles.particles:
        raise InputFileError(f"{data_path}: no {star_io.CLASS_NUMBER} column; pass a classification's "
                             f"_data.star, not its input")
    k = len(classes)
    labels = pd.to_numeric(particles.particles[star_io.CLASS_NUMBER]).to_numpy(np.int64)
    if labels.min() < 1 or labels.max() > k:
        raise InputFileError(f"{data_path}: rlnClassNumber {labels.min()}..{labels.max()} outside the "
                             f"model's {k} classes; the data and model STAR files are from different runs")
    averages_path = _averages_path(prefix, classes)
    scores = _scores(classes, particles, averages_path, general)
    counts = np.bincount(labels - 1, minlength=k)
    keep = counts > 0
    if cfg.classes is not None:
        if max(cfg.classes) > k:
            raise ConfigError(f"--classes {max(cfg.classes)}: {prefix}_model.star has only {k} classes")
        keep &= np.isin(np.arange(1, k + 1), cfg.classes)
    if cfg.effective_min_score is not None:
        keep &= scores >= cfg.effective_min_score
    if cfg.min_resolution is not None:
        resolution = pd.to_numeric(classes[star_io.ESTIMATED_RESOLUTION]).to_numpy(np.float64)
        keep &= resolution <= cfg.min_resolution
    classes = classes.copy()
    classes[scoring.SCORE_COLUMN] = scores
    classes[SELECTED_COLUMN] = keep.astype(np.int64)
    if star_io.PARTICLE_NUMBER not in classes:
        classes[star_io.PARTICLE_NUMBER] = counts
    if cfg.effective_min_fom > 0:
        particles = _with_figure_of_merit(particles, averages_path, prefix, keep)
    return Selection(prefix, general, classes, particles, averages_path, cfg.effective_min_fom)


def _particle_diameter_angst(prefix: str) -> float:
    """``rlnParticleDiameter`` of RELION's ``<prefix>_optimiser.star`` (Å), 0 when there is none."""
    path = Path(f"{prefix}_optimiser.star")
    if not path.is_file():
        return 0.0
    general = star_io.read_star_blocks(path, what="RELION optimiser STAR", example=path.name).get("optimiser_general")
    value = general.get("rlnParticleDiameter", 0) if isinstance(general, dict) else 0
    return max(float(value or 0), 0.0)


def _with_figure_of_merit(particles: star_io.ParticleTable, averages_path: Path, prefix: str,
                          kept_classes: np.ndarray) -> star_io.ParticleTable:
    """The data STAR with ``rlnParticleFigureOfMerit``, measured here when the classification did not
    write it (RELION's Class2D): one pass over the kept classes' particles' stacks."""
    if star_io.PARTICLE_FIGURE_OF_MERIT in particles.particles:
        return particles
    labels = pd.to_numeric(particles.particles[star_io.CLASS_NUMBER]).to_numpy(np.int64)
    rows = np.isin(labels, np.flatnonzero(kept_classes) + 1)
    logger.info("%s has no %s: measuring the fit of the %d particles of the kept classes to their "
                "class averages (one pass over their stacks; --min_fom 0 skips it)", particles.path,
                star_io.PARTICLE_FIGURE_OF_MERIT, int(rows.sum()))
    averages, _ = _read_averages(averages_path)
    subset = star_io.ParticleTable(particles.path, particles.particles[rows].reset_index(drop=True), particles.optics)
    diameter_px = _particle_diameter_angst(prefix) / float(star_io.pixel_sizes(particles)[0])
    radius = diameter_px / 2 if diameter_px > 0 else DIAMETER_FRACTION * averages.shape[-1] / 2
    fom = np.ones(len(labels))
    if rows.any():
        with ParticleStack.from_table(subset, missing_fix=_MISSING_IMAGES_FIX) as stack:
            fom[rows] = screening.figure_of_merit_from_table(subset, stack, averages, radius)
    table = particles.particles.copy()
    table[star_io.PARTICLE_FIGURE_OF_MERIT] = fom
    return star_io.ParticleTable(particles.path, table, particles.optics)


def write_selection(selection: Selection, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write particles.star, class_averages.star, rank_model.star and rank_classes.png."""
    folder = Path(output_dir)
    ensure_output_prefix(folder / "particles.star")
    paths = {key: folder / name for key, name in OUTPUT_NAMES.items()}
    kept_rows = selection.kept_particles()
    table = selection.particles
    kept_table = star_io.ParticleTable(table.path, table.particles[kept_rows].reset_index(drop=True),
                                       table.optics)
    classes = selection.classes
    order = np.argsort(-classes[scoring.SCORE_COLUMN].to_numpy(), kind="stable")
    averages, _ = _read_averages(selection.averages_path)
    counts = classes[star_io.PARTICLE_NUMBER].to_numpy(np.int64)
    dropped = selection.dropped_per_class()
    plots.plot_ranked_gallery(averages[: len(classes)], counts, classes[scoring.SCORE_COLUMN].to_numpy(),
                              selection.kept, paths["gallery"], dropped=dropped)
    general = selection.general or {star_io.NR_CLASSES: len(classes)}
    star_io.write_star_blocks(paths["rank_model"], {"model_general": general, "model_classes": classes})
    kept_classes = classes.iloc[[i for i in order if selection.kept[i]]]
    star_io.write_star_blocks(paths["class_averages"], {"model_classes": kept_classes})
    if not len(kept_table):
        logger.warning("no class passed the selection; particles.star has no particles")
    if dropped.any():
        logger.info("dropped %d particles of the kept classes that fit their class average poorly "
                    "(%s < %g; --min_fom 0 keeps them)", int(dropped.sum()), star_io.PARTICLE_FIGURE_OF_MERIT,
                    selection.min_fom)
    star_io.write_particles(paths["particles"], kept_table, {}, image_size=int(averages.shape[-1]))
    logger.info("kept %d of %d classes, %d of %d particles -> %s", int(selection.kept.sum()), len(classes),
                int(kept_rows.sum()), len(kept_rows), paths["particles"])
    return paths


def select_classes(cfg: SelectionConfig) -> dict[str, Path]:
    """Read, score, select and write (see the module docstring); returns the output paths."""
    return write_selection(load_selection(cfg), cfg.output_dir)
