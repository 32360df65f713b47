"""Per-class quality score (``rlnClassScore``, 0-1, higher is better) from the class averages and members.

A class of real particle views has an average that is compact (its power sits inside the particle
circle), centred, not rotationally featureless, free of long straight edges, resolved to a good
fraction of Nyquist, and members that fit it confidently. Empty ice, ice/contaminant discs,
carbon edges, aggregates and broken particles each fail one or more of these. The score is a
weighted geometric mean of one factor in [0, 1] per property (``FEATURES`` below, docs/selection.md),
so a class that clearly fails one property scores low whatever the others say.

>>> scores = class_scores(result)                         # (K,) from a ClassificationResult
>>> table = class_features(averages, counts, resolution, pixel_size, mean_confidence)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter

from .config import DIAMETER_FRACTION
from .fourier import centred_radius, frequency_radius

logger = logging.getLogger(__name__)

SCORE_COLUMN = "rlnClassScore"
UNDEFINED_RESOLUTION = 999.0


@dataclass(frozen=True)
class ScoreWeights:
    """Exponents of the factors in the geometric mean (normalised to sum 1)."""

    compactness: float = 2.0
    centring: float = 1.0
    structure: float = 1.0
    straightness: float = 1.0
    resolution: float = 2.0
    confidence: float = 0.5
    contrast: float = 1.0
    detail: float = 1.0

    def as_dict(self) -> dict[str, float]:
        values = {k: float(v) for k, v in self.__dict__.items() if v}
        total = sum(values.values())
        return {k: v / total for k, v in values.items()}


#: Factor name -> what it measures (also the columns of ``class_features``).
FEATURES = {
    "compactness": "1 - (mean power outside the particle circle) / (mean power inside); "
                   "0 for empty ice, carbon and large discs",
    "centring": "exp(-(d / 0.4 r)^2), d the distance of the positive density's centroid from the box "
                "centre, r the particle radius",
    "structure": "share of the average's power inside the circle that its rotational average does NOT "
                 "hold, over 0.15 (saturating): a featureless round blob (ice ball) has almost none",
    "straightness": "1 - coherence^2 of the gradient structure tensor outside 0.7 r: a straight edge "
                    "(carbon) has all its gradients along one direction, a particle little signal there",
    "contrast": "sd inside the circle relative to the good classes' (count-weighted median over the classes "
                "the other factors score >= 0.5): (ratio - 0.5) / (0.85 - 0.5) below 1, 1 - (ratio - 1.6) / 1.4 "
                "above 1.6, clipped; one protein's views carry similar contrast, broken particles and "
                "blurred mixtures less, ice and carbon far more",
    "detail": "share of the power inside the circle at 1.5 box/D to box/4 cycles per box (D the particle "
              "diameter) of all power from 1 cycle up, relative to the good classes' (ratio mapped as for "
              "contrast below 1): smooth blobs (ice, contaminants) and edges have little inner detail",
    "resolution": "q / q_best, q = 2 pixel / resolution (share of Nyquist) and q_best the best "
                  "class's, mapped (ratio - 0.35) / (0.9 - 0.35) and clipped; 0 for an undefined "
                  "resolution or q below 3 % of Nyquist",
    "confidence": "0.5 + 0.5 x the members' mean assignment confidence (rlnMaxValueProbDistribution)",
}


def rotational_average(image: NDArray) -> NDArray[np.float64]:
    """The image averaged over all in-plane rotations about ``box // 2`` (same shape)."""
    box = image.shape[-1]
    r = centred_radius(box)
    index = np.round(r).astype(np.int64)
    sums = np.bincount(index.ravel(), weights=image.ravel())
    counts = np.bincount(index.ravel())
    profile = sums / np.maximum(counts, 1)
    return np.interp(r, np.arange(len(profile)), profile)


def _compactness(image: NDArray, radius: float) -> float:
    r = centred_radius(image.shape[-1])
    inside, outside = r <= radius, (r > 1.1 * radius) & (r < image.shape[-1] / 2)
    centred = image - np.median(image[outside])
    p_in, p_out = np.mean(centred[inside] ** 2), np.mean(centred[outside] ** 2)
    return float(np.clip(1.0 - p_out / max(p_in, 1e-30), 0.0, 1.0))


def _centring(image: NDArray, radius: float) -> float:
    box = image.shape[-1]
    r = centred_radius(box)
    outside = (r > 1.1 * radius) & (r < box / 2)
    weight = np.clip(image - np.median(image[outside]), 0.0, None)
    if weight.sum() <= 0:
        return 0.0
    coords = np.arange(box) - box // 2
    cx = float((weight.sum(axis=0) * coords).sum() / weight.sum())
    cy = float((weight.sum(axis=1) * coords).sum() / weight.sum())
    return float(np.exp(-(np.hypot(cx, cy) / (0.4 * radius)) ** 2))


def _structure(image: NDArray, radius: float) -> float:
    r = centred_radius(image.shape[-1])
    inside = r <= radius
    centred = image - image[inside].mean()
    round_part = rotational_average(centred)
    total = np.sum(centred[inside] ** 2)
    if total <= 0:
        return 0.0
    share = 1.0 - np.sum(round_part[inside] ** 2) / total
    return float(np.clip(share / 0.15, 0.0, 1.0))


def _straightness(image: NDArray, radius: float) -> float:
    smooth = gaussian_filter(np.asarray(image, dtype=np.float64), 1.0)
    gy, gx = np.gradient(smooth)
    outer = centred_radius(image.shape[-1]) > 0.7 * radius
    gx, gy = gx[outer], gy[outer]
    jxx, jyy, jxy = np.sum(gx * gx), np.sum(gy * gy), np.sum(gx * gy)
    trace = jxx + jyy
    if trace <= 0:
        return 0.0
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / trace
    return float(np.clip(1.0 - coherence ** 2, 0.0, 1.0))


def nyquist_shares(resolution: NDArray, pixel_size: float) -> NDArray[np.float64]:
    """``(K,)`` resolution as a share of Nyquist, ``2 pixel / resolution``; 0 where undefined."""
    res = np.asarray(resolution, dtype=np.float64)
    valid = np.isfinite(res) & (res > 0) & (res < UNDEFINED_RESOLUTION)
    return np.where(valid, 2.0 * pixel_size / np.where(valid, res, 1.0), 0.0)


def _resolution(share: float, best_share: float) -> float:
    if share < 0.03 or best_share <= 0:
        return 0.0
    return float(np.clip((share / best_share - 0.35) / (0.9 - 0.35), 0.0, 1.0))


def class_features(averages: NDArray, counts: NDArray, resolution: NDArray, pixel_size: float,
                   mean_confidence: NDArray, diameter_px: float | None = None) -> pd.DataFrame:
    """One row per class, one column per factor of ``FEATURES`` (each in [0, 1]).

    Parameters
    ----------
    averages : (K, box, box) class averages (CTF-corrected, background near 0).
    counts : (K,) members per class.
    resolution : (K,) estimated resolution in Å (999 or inf: undefined).
    pixel_size : Å/px of the averages.
    mean_confidence : (K,) members' mean assignment confidence in [0, 1].
    diameter_px : particle (mask) diameter in px; default ``config.DIAMETER_FRACTION`` of the box.
    """
    averages = np.asarray(averages, dtype=np.float64)
    box = averages.shape[-1]
    radius = 0.5 * (diameter_px if diameter_px else DIAMETER_FRACTION * box)   # classify's default
    shares = nyquist_shares(resolution, pixel_size)
    best = float(shares[np.asarray(counts) > 0].max()) if (np.asarray(counts) > 0).any() else 0.0
    rows = []
    for k, image in enumerate(averages):
        if counts[k] == 0 or not np.isfinite(image).all() or not image.any():
            rows.append({name: 0.0 for name in FEATURES})
            continue
        rows.append({
            "compactness": _compactness(image, radius),
            "centring": _centring(image, radius),
            "structure": _structure(image, radius),
            "straightness": _straightness(image, radius),
            "contrast": 1.0,                       # contrast and detail: set below, relative to the good classes
            "detail": 1.0,
            "resolution": _resolution(float(shares[k]), best),
            "confidence": float(0.5 + 0.5 * np.clip(mean_confidence[k], 0.0, 1.0)),
        })
    features = pd.DataFrame(rows, columns=list(FEATURES))
    counts = np.asarray(counts)
    relative = ["contrast", "detail"]
    reference = _good_classes(features.drop(columns=relative), counts)
    sd = np.array([_inside_sd(a, radius) if n > 0 else 0.0 for a, n in zip(averages, counts)])
    detail = np.array([_detail(a, radius) if n > 0 else 0.0 for a, n in zip(averages, counts)])
    features["contrast"] = _relative_factor(sd, counts, reference, upper=True)
    features["detail"] = _relative_factor(detail, counts, reference, upper=False)
    return features


def _inside_sd(image: NDArray, radius: float) -> float:
    return float(np.std(image[centred_radius(image.shape[-1]) <= radius]))


def _detail(image: NDArray, radius: float) -> float:
    """Share of the masked average's power at inner-detail frequencies (1.5 box/D .. box/4 cycles)."""
    box = image.shape[-1]
    r = centred_radius(box)
    inside = r <= radius
    masked = np.where(inside, image - image[inside].mean(), 0.0)
    power = np.abs(np.fft.fft2(masked)) ** 2
    q = frequency_radius(box, rfft=False)
    edge = 1.5 * box / (2 * radius)
    low, high = (q >= 1) & (q < edge), (q >= edge) & (q <= box / 4)
    total = power[low | high].sum()
    return float(power[high].sum() / total) if total > 0 else 0.0


def _good_classes(features: pd.DataFrame, counts: NDArray) -> NDArray[np.bool_]:
    """Classes the absolute factors already call good (score >= 0.5): the reference for relative ones."""
    preliminary = combine(features, ScoreWeights(contrast=0.0, detail=0.0))
    good = (preliminary >= 0.5) & (counts > 0)
    return good if good.any() else counts > 0


def _relative_factor(values: NDArray, counts: NDArray, reference: NDArray[np.bool_],
                     upper: bool) -> NDArray[np.float64]:
    """``values`` against their count-weighted median over ``reference`` classes, mapped onto [0, 1].

    Ratios of 0.85 and above score 1, falling linearly to 0 at 0.5; with ``upper`` also above 1.6,
    falling to 0 at 3.
    """
    if not reference.any():
        return np.zeros(len(values))
    order = np.argsort(values[reference])
    cumulative = np.cumsum(counts[reference][order])
    typical = values[reference][order][np.searchsorted(cumulative, 0.5 * cumulative[-1])]
    ratio = values / max(typical, 1e-30)
    factor = np.clip((ratio - 0.5) / (0.85 - 0.5), 0.0, 1.0)
    if upper:
        factor = np.where(ratio > 1.6, np.clip(1.0 - (ratio - 1.6) / 1.4, 0.0, 1.0), factor)
    return np.where(counts > 0, factor, 0.0)


def combine(features: pd.DataFrame, weights: ScoreWeights = ScoreWeights()) -> NDArray[np.float64]:
    """Weighted geometric mean of the factor columns, ``(K,)`` in [0, 1] (missing columns are left out)."""
    log_score = np.zeros(len(features))
    used = {k: v for k, v in weights.as_dict().items() if k in features}
    total = sum(used.values())
    for name, weight in ((k, v / total) for k, v in used.items()):
        log_score += weight * np.log(np.clip(features[name].to_numpy(dtype=np.float64), 1e-6, 1.0))
    score = np.exp(log_score)
    score[(features.to_numpy() == 0).all(axis=1)] = 0.0
    return score


def member_means(labels: NDArray, values: NDArray, n_classes: int) -> NDArray[np.float64]:
    """``(K,)`` mean of ``values`` over each class's members (0 for an empty class)."""
    labels = np.asarray(labels, dtype=np.int64)
    sums = np.bincount(labels, weights=np.asarray(values, dtype=np.float64), minlength=n_classes)
    counts = np.bincount(labels, minlength=n_classes)
    return sums / np.maximum(counts, 1)


def class_scores(result, diameter_px: float | None = None,
                 weights: ScoreWeights = ScoreWeights()) -> NDArray[np.float64]:
    """``rlnClassScore`` of every class of a ``ClassificationResult``, ``(K,)`` in [0, 1] (0 = empty).

    Uses only what the result holds: the class averages, their resolutions and pixel size, the
    labels and the members' confidences.
    """
    k = result.n_classes
    counts = result.class_counts()
    confidence = member_means(result.labels, result.confidence, k)
    features = class_features(result.class_averages, counts, result.class_resolution, result.pixel_size,
                              confidence, diameter_px)
    scores = combine(features, weights)
    logger.debug("class features:\n%s", features.assign(score=scores).round(3).to_string())
    return scores
