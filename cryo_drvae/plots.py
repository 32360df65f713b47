"""Result pictures: class-average gallery, convergence curves, side-by-side comparisons.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change) and
written atomically as PNG. Images are drawn with row 0 at the top.

>>> plot_class_gallery(averages, counts, "run_classes.png", resolution=res_angst, pixel_size=3.0)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike, NDArray

from .io_utils import atomic_path

TILE_INCHES = 1.4
X_KEYS = ("round", "iteration", "epoch")      # history keys used as the x axis, never plotted


def gallery_order(counts: ArrayLike) -> NDArray[np.int64]:
    """Class indices (0-based) by decreasing size; ties keep class order."""
    return np.argsort(-np.asarray(counts), kind="stable")


def grid_shape(n_tiles: int) -> tuple[int, int]:
    """``(rows, columns)`` of a near-square grid holding ``n_tiles``."""
    cols = max(1, math.ceil(math.sqrt(n_tiles)))
    return max(1, math.ceil(n_tiles / cols)), cols


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _show(ax: Axes, image: NDArray, greyed: bool = False,
          limits: tuple[float, float] | None = None) -> None:
    """One image, on ``limits`` (vmin, vmax) or its own 1st-99th percentile; greyed = washed out."""
    image = np.asarray(image, dtype=np.float64)
    if limits is None:
        limits = tuple(np.percentile(image, [1, 99])) if image.size else (0.0, 1.0)
    low, high = limits
    ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1,
              alpha=0.25 if greyed else 1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def common_limits(class_averages: NDArray, counts: ArrayLike) -> tuple[float, float]:
    """One (vmin, vmax) for every panel: 1st-99th percentile of the non-empty classes' pixels, so
    that a faint class looks faint next to a strong one."""
    counts = np.asarray(counts)
    shown = class_averages[counts > 0] if (counts > 0).any() else class_averages
    low, high = np.percentile(np.asarray(shown, np.float64), [1, 99]) if shown.size else (0.0, 1.0)
    return float(low), float(high)


def scale_bar_angst(box_size: int, pixel_size: float) -> float:
    """A round length (1, 2 or 5 x 10^n Å) near a quarter of the box."""
    target = box_size * pixel_size / 4
    magnitude = 10 ** math.floor(math.log10(target))
    return float(max(m * magnitude for m in (1, 2, 5) if m * magnitude <= target))


def panel_title(k: int, count: int, n_total: int, resolution: float | None) -> str:
    """``class 3: 120 (12.0 %)`` and, when known, ``14 Å`` on a second line (k 0-based)."""
    share = 100.0 * count / n_total if n_total else 0.0
    title = f"class {k + 1}: {count} ({share:.1f} %)"
    if resolution is not None and count > 0 and resolution < 999:
        title += f"\n{resolution:.0f} Å"
    return title


def plot_class_gallery(class_averages: NDArray, counts: ArrayLike, path: str | os.PathLike,
                       resolution: ArrayLike | None = None, pixel_size: float | None = None) -> Path:
    """Class averages largest first on one intensity scale, each titled ``class k: n (p %)`` (k
    1-based) and its resolution; a scale bar in the first panel; empty classes greyed.

    Parameters
    ----------
    class_averages : ndarray, shape (K, box, box)
    counts : array-like, shape (K,)
        Particles per class.
    path
        PNG to write.
    resolution : array-like, shape (K,), optional
        Estimated resolution of each class average, Å (999 = unknown).
    pixel_size : float, optional
        Å/px of the averages, for the scale bar.

    Raises
    ------
    ValueError
        If ``counts`` (or ``resolution``) does not have one entry per class average.
    """
    counts = np.asarray(counts)
    if class_averages.ndim != 3 or counts.shape != (len(class_averages),):
        raise ValueError(f"need averages (K, box, box) and counts (K,), got {class_averages.shape} "
                         f"and {counts.shape}")
    if resolution is not None and np.shape(resolution) != counts.shape:
        raise ValueError(f"need one resolution per class, got {np.shape(resolution)} for {counts.shape} counts")
    limits = common_limits(class_averages, counts)
    rows, cols = grid_shape(len(counts))
    fig = Figure(figsize=(cols * TILE_INCHES, rows * (TILE_INCHES + 0.35)))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    n_total = int(counts.sum())
    for i, (ax, k) in enumerate(zip(axes, gallery_order(counts))):
        empty = counts[k] == 0
        _show(ax, class_averages[k], greyed=empty, limits=limits)
        res = None if resolution is None else float(np.asarray(resolution)[k])
        ax.set_title(panel_title(int(k), int(counts[k]), n_total, res), fontsize=7,
                     color="0.6" if empty else "black")
        if i == 0 and pixel_size:
            box = class_averages.shape[-1]
            length = scale_bar_angst(box, pixel_size)
            x0, y0 = 0.06 * box, 0.92 * box
            ax.plot([x0, x0 + length / pixel_size], [y0, y0], color="yellow", linewidth=2)
            ax.text(x0, y0 - 0.04 * box, f"{length:g} Å", color="yellow", fontsize=6)
    for ax in axes[len(counts):]:
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


#: Plain axis names (and a factor) for the history keys the pipeline records.
AXIS_LABELS: dict[str, tuple[str, float]] = {
    "changed_fraction": ("labels changed (%)", 100.0),
    "mean_cost": ("mean cost per particle\n(-log-likelihood)", 1.0),
    "class_size_min": ("smallest class\n(particles)", 1.0),
    "class_size_max": ("largest class\n(particles)", 1.0),
    "drvae_loss": ("DRVAE training loss", 1.0),
}


def axis_label(key: str) -> tuple[str, float]:
    """(axis name, factor) for a history key: the plain name, or the key with spaces."""
    return AXIS_LABELS.get(key, (key.replace("_", " "), 1.0))


def plot_ranked_gallery(class_averages: NDArray, counts: ArrayLike, scores: ArrayLike, kept: ArrayLike,
                        path: str | os.PathLike, dropped: ArrayLike | None = None) -> Path:
    """Class averages best score first, titled ``class k: n  s=0.93``; kept framed green, rejected red and faded.
    ``dropped`` ``(K,)``: particles of each kept class left out for a poor fit, shown as ``-m``.

    Raises
    ------
    ValueError
        If ``counts``, ``scores`` or ``kept`` do not have one entry per class average.
    """
    counts, scores, kept = np.asarray(counts), np.asarray(scores, dtype=np.float64), np.asarray(kept, dtype=bool)
    k = len(class_averages)
    dropped = np.zeros(k, dtype=np.int64) if dropped is None else np.asarray(dropped, dtype=np.int64)
    if class_averages.ndim != 3 or not counts.shape == scores.shape == kept.shape == dropped.shape == (k,):
        raise ValueError(f"need averages (K, box, box) and counts, scores, kept, dropped (K,), got "
                         f"{class_averages.shape}, {counts.shape}, {scores.shape}, {kept.shape}, {dropped.shape}")
    rows, cols = grid_shape(k)
    fig = Figure(figsize=(cols * TILE_INCHES, rows * (TILE_INCHES + 0.3) + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, c in zip(axes, np.argsort(-scores, kind="stable")):
        _show(ax, class_averages[c], greyed=not kept[c])
        colour = "tab:green" if kept[c] else "tab:red"
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3 if kept[c] else 1.5)
        less = f" -{dropped[c]}" if kept[c] and dropped[c] else ""
        ax.set_title(f"class {c + 1}: {counts[c]}{less}\ns={scores[c]:.2f}", fontsize=7,
                     color="black" if kept[c] else "tab:red")
    for ax in axes[k:]:
        ax.set_axis_off()
    n_dropped = int(dropped[kept].sum())
    fig.suptitle(f"kept {int(kept.sum())} of {k} classes\n({int(counts[kept].sum()) - n_dropped} of {int(counts.sum())} "
                 f"particles{f'; -{n_dropped} poor fits' if n_dropped else ''})\ngreen kept, red rejected", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _numeric_keys(history: Sequence[Mapping]) -> list[str]:
    keys: list[str] = []
    for record in history:
        for key, value in record.items():
            if (key not in keys and key not in X_KEYS and isinstance(value, (int, float, np.number))
                    and not isinstance(value, bool)):
                keys.append(key)
    return sorted(keys, key=lambda k: k != "changed_fraction")     # changed_fraction first


def plot_convergence(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """One panel per numeric key of ``history`` (``changed_fraction`` first), x = round.

    Parameters
    ----------
    history
        One dict per round, e.g. ``{"round": 3, "changed_fraction": 0.02, "loss": 1.7}``. The x
        axis is the ``round`` (or ``iteration``/``epoch``) value, else the 1-based position.
        A key missing from some rounds is drawn where present.

    Raises
    ------
    ValueError
        If ``history`` is empty or holds no numeric values.
    """
    keys = _numeric_keys(history)
    if not keys:
        raise ValueError("history has no rounds with numeric values to plot")
    x_key = next((k for k in X_KEYS if all(k in r for r in history)), None)
    x = [r[x_key] if x_key else i + 1 for i, r in enumerate(history)]
    fig = Figure(figsize=(5, 2.0 * len(keys)))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        label, factor = axis_label(key)
        points = [(xi, r[key] * factor) for xi, r in zip(x, history) if key in r]
        ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel({"epoch": "epoch"}.get(x_key or "", "round (0 = first classes)"))
    fig.tight_layout()
    return _save(fig, path)


def plot_side_by_side(rows: Mapping[str, NDArray], path: str | os.PathLike, title: str = "") -> Path:
    """Named image stacks, one per row (e.g. ``truth``, ``RELION``, ``cryo-drvae``).

    Parameters
    ----------
    rows
        Row label -> images ``(n, box, box)``; rows may differ in ``n`` and ``box``.

    Raises
    ------
    ValueError
        If ``rows`` is empty or a stack is not 3D.
    """
    if not rows:
        raise ValueError("rows is empty; pass at least one named image stack")
    bad = [name for name, stack in rows.items() if np.ndim(stack) != 3]
    if bad:
        raise ValueError(f"row(s) {', '.join(bad)} are not image stacks (n, box, box)")
    n_cols = max(1, max(len(stack) for stack in rows.values()))
    fig = Figure(figsize=(n_cols * TILE_INCHES + 0.8, len(rows) * TILE_INCHES + (0.4 if title else 0)))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (name, stack) in enumerate(rows.items()):
        for c in range(n_cols):
            if c < len(stack):
                _show(axes[r, c], stack[c])
            else:
                axes[r, c].set_axis_off()
        axes[r, 0].set_ylabel(name, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
