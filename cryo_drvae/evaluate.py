"""Score a classification against the simulator's ground truth.

>>> scores = evaluate_run("sim/truth.csv", "Class2D/run_data.star")
>>> format_scores(scores)    # 'accuracy 0.973  NMI 0.941  ARI 0.935  (2000 particles, 10 classes)'

Accuracy matches predicted to true classes one-to-one (Hungarian algorithm on the contingency
table), so it works when the number of predicted classes differs: particles of unmatched
predicted classes count as wrong.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from . import star_io
from .errors import InputFileError

logger = logging.getLogger(__name__)

IMAGE_NAME = star_io.IMAGE_NAME
CLASS_NUMBER = star_io.CLASS_NUMBER


@dataclass(frozen=True)
class Scores:
    """Agreement of predicted with true labels; class sizes are those of the prediction."""

    accuracy: float
    nmi: float
    ari: float
    n_particles: int
    n_true_classes: int
    n_pred_classes: int
    smallest_class: int
    largest_class: int


def score_labels(true_labels: ArrayLike, predicted_labels: ArrayLike) -> Scores:
    """Accuracy (best one-to-one class matching), NMI and ARI of two labelings.

    Parameters
    ----------
    true_labels, predicted_labels : array-like, shape (n_particles,)
        Any hashable labels; their values need not correspond.

    Raises
    ------
    ValueError
        If the two have different lengths or are empty.
    """
    true = np.asarray(true_labels)
    pred = np.asarray(predicted_labels)
    if true.shape != pred.shape or true.ndim != 1 or len(true) == 0:
        raise ValueError(f"need two non-empty 1D label arrays of equal length, "
                         f"got shapes {true.shape} and {pred.shape}")
    table = contingency_matrix(true, pred)                     # (n_true, n_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    _, sizes = np.unique(pred, return_counts=True)
    return Scores(
        accuracy=float(table[rows, cols].sum() / len(true)),
        nmi=float(normalized_mutual_info_score(true, pred)),
        ari=float(adjusted_rand_score(true, pred)),
        n_particles=len(true),
        n_true_classes=table.shape[0],
        n_pred_classes=table.shape[1],
        smallest_class=int(sizes.min()),
        largest_class=int(sizes.max()),
    )


def normalise_image_name(name: str) -> str:
    """``"000012@Particles/x.mrcs"`` and ``"12@./Particles/x.mrcs"`` -> ``"12@Particles/x.mrcs"``."""
    index, _, path = str(name).strip().partition("@")
    try:
        index = str(int(index))
    except ValueError:
        pass
    return f"{index}@{posixpath.normpath(path)}"


def _read_classified(data_star: str | os.PathLike) -> pd.DataFrame:
    """The particle block of a classification's data STAR file (3.0 or 3.1+)."""
    blocks = star_io.read_star_blocks(data_star, what="2D classification's _data.star",
                                      example="Class2D/job010/run_it025_data.star")
    table = blocks.get("particles")
    if table is None:
        table = next((b for b in blocks.values() if isinstance(b, pd.DataFrame) and IMAGE_NAME in b), None)
    if table is None or IMAGE_NAME not in table:
        raise InputFileError(f"{data_star}: no particle block with a {IMAGE_NAME} column; "
                             f"pass the _data.star of a 2D classification")
    if CLASS_NUMBER not in table:
        raise InputFileError(f"{data_star}: block 'particles' has no {CLASS_NUMBER} column; pass "
                             f"a classification's _data.star (e.g. run_it025_data.star), not its input")
    return table


def _read_truth(truth_csv: str | os.PathLike) -> pd.DataFrame:
    try:
        truth = pd.read_csv(truth_csv, comment="#")
    except FileNotFoundError:
        raise InputFileError(f"{truth_csv}: file not found; pass the truth.csv written by "
                             f"cryo-drvae simulate") from None
    missing = [c for c in ("image_name", "class") if c not in truth]
    if missing:
        raise InputFileError(f"{truth_csv}: missing column(s) {', '.join(missing)}; pass the "
                             f"truth.csv written by cryo-drvae simulate")
    return truth


def _unique_keys(names: pd.Series, source: str | os.PathLike) -> pd.Index:
    keys = pd.Index(names.map(normalise_image_name))
    if keys.has_duplicates:
        dup = keys[keys.duplicated()][:3].tolist()
        raise InputFileError(f"{source}: image(s) listed more than once, e.g. {', '.join(dup)}; "
                             f"each particle must appear once")
    return keys


def _missing_message(source: str | os.PathLike, other: str | os.PathLike, missing: list[str]) -> str:
    return (f"{source}: {len(missing)} image(s) of {other} are not listed, e.g. "
            f"{', '.join(missing[:3])}; compare a classification of exactly the simulated particle "
            f"set with its own truth.csv (no subset selection, same image paths)")


def evaluate_run(truth_csv: str | os.PathLike, data_star: str | os.PathLike) -> Scores:
    """Score a classification's ``_data.star`` against a simulation's ``truth.csv``.

    Rows are matched by image name (``rlnImageName`` vs ``image_name``), ignoring the zero
    padding of the slice number and ``./`` in paths; row order does not matter.

    Raises
    ------
    InputFileError
        If a file is missing, lacks ``rlnClassNumber`` (or the truth columns), lists an image
        twice, or if an image is in one file but not the other.
    """
    truth = _read_truth(truth_csv)
    data = _read_classified(data_star)
    truth_keys = _unique_keys(truth["image_name"], truth_csv)
    data_keys = _unique_keys(data[IMAGE_NAME], data_star)
    not_in_data = truth_keys.difference(data_keys, sort=False).tolist()
    if not_in_data:
        raise InputFileError(_missing_message(data_star, truth_csv, not_in_data))
    not_in_truth = data_keys.difference(truth_keys, sort=False).tolist()
    if not_in_truth:
        raise InputFileError(_missing_message(truth_csv, data_star, not_in_truth))
    predicted = pd.Series(data[CLASS_NUMBER].to_numpy(), index=data_keys).reindex(truth_keys)
    scores = score_labels(truth["class"].to_numpy(), predicted.to_numpy())
    logger.info("%s vs %s: %s", data_star, truth_csv, format_scores(scores))
    return scores


def true_classes(truth_csv: str | os.PathLike, image_names: pd.Series) -> np.ndarray:
    """The simulator's class of each image name (0 = junk), matched as :func:`evaluate_run` does.

    Raises
    ------
    InputFileError
        If the truth file is missing or lacks one of the images.
    """
    truth = _read_truth(truth_csv)
    classes = pd.Series(truth["class"].to_numpy(), index=_unique_keys(truth["image_name"], truth_csv))
    keys = pd.Index(image_names.map(normalise_image_name))
    missing = keys.difference(classes.index, sort=False).tolist()
    if missing:
        raise InputFileError(_missing_message(truth_csv, "the particles given", missing))
    return classes.reindex(keys).to_numpy()


def format_scores(scores: Scores) -> str:
    """One line: ``accuracy 0.973  NMI 0.941  ARI 0.935  (2000 particles, 10 classes)``."""
    classes = f"{scores.n_true_classes} classes"
    if scores.n_pred_classes != scores.n_true_classes:
        classes += f", {scores.n_pred_classes} predicted"
    return (f"accuracy {scores.accuracy:.3f}  NMI {scores.nmi:.3f}  ARI {scores.ari:.3f}  "
            f"({scores.n_particles} particles, {classes})")
