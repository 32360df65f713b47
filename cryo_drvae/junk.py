"""False picks for the simulator: empty ice, ice/contaminant discs, carbon edges, aggregates, broken particles.

Real particle sets hand 2D classification a quarter to a half of junk. ``simulate --junk FRACTION``
turns that fraction of the rows (the same share of every class, so class proportions are kept)
into junk. Each junk pick gets the row's own astigmatic CTF and the noise a real particle would
have under that CTF (the noise sd of a projection of the scene rendered with the same CTF), and
is normalised like every particle. Everything is drawn from the simulation seed.

>>> truth = mark_junk(truth, cfg)                         # class 0, ``kind`` = one of JUNK_KINDS
>>> images = render_junk(scene, cfg, truth, rows.index, images, rng)   # junk rows' images replaced

Kinds (``truth.csv`` column ``kind``; real particles are ``particle``)
--------------------------------------------------------------------
``empty``      pure noise: an empty-ice pick, at most a faint ice-thickness ramp.
``disc``       one or two ice balls / contaminant discs, diameter 0.2-1.2 box, ball-like or flat with a
               soft edge, 1.5-8x the peak projected density of the particle (80 % denser, 20 % thinner).
``carbon``     a carbon-film edge across the box: straight (half the picks) or curved (radius 0.6-3 box),
               soft step of 1-5x the particle's peak density with a faint (<= 5 %) film texture on the carbon side.
``aggregate``  2-3 of the scene's own projections (random views and angles), overlapping and offset by
               0.4-0.85 particle diameters.
``broken``     one projection with 25-60 % of its atoms removed, cut by a straight line or a round bite.

The mix of kinds is drawn per seed (Dirichlet(4) weights, every kind present when there are at least
five junk picks), and every size, contrast and position is drawn per pick, so nothing downstream
can be tuned to one recipe. In ``truth.csv`` a junk row has ``class``, ``shape`` and ``view`` 0;
its ``psi_deg``/``shift_*`` are the pose of its main feature (first particle of an aggregate, the
broken particle, the centre of the largest disc, the edge normal and its nearest point), and its
``source_view`` the class (1-based) of that main particle for aggregates and broken picks (0 otherwise;
real rows 0 too), so tests can place them in the class they resemble.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter

from .errors import ConfigError

logger = logging.getLogger(__name__)

JUNK_KINDS = ("empty", "disc", "carbon", "aggregate", "broken")
PARTICLE_KIND = "particle"
KIND_COLUMN = "kind"
SOURCE_VIEW_COLUMN = "source_view"
_STREAM_TAG = 0x4A554E4B      # "JUNK": junk draws never disturb the simulator's own streams


def _generator(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM_TAG, *keys]))


# --------------------------------------------------------------------------- which rows are junk

def mark_junk(truth: pd.DataFrame, cfg) -> pd.DataFrame:
    """Turn ``cfg.junk_fraction`` of every class's rows into junk (class 0) and add a ``kind`` column.

    Returns ``truth`` unchanged (no ``kind`` column) when the fraction is 0.

    Raises
    ------
    ConfigError
        If the fraction is outside [0, 0.9] or would leave a class with no real particle.
    """
    fraction = float(getattr(cfg, "junk_fraction", 0.0))
    if not 0.0 <= fraction <= 0.9:
        raise ConfigError(f"simulation.junk_fraction must be in [0, 0.9], got {fraction}")
    if fraction == 0.0:
        return truth
    rng = _generator(cfg.seed, 0)
    truth = truth.copy()
    chosen = []
    for label, rows in truth.groupby("class", sort=True):
        n_junk = int(round(fraction * len(rows)))
        if n_junk >= len(rows):
            raise ConfigError(f"simulation.junk_fraction {fraction} leaves class {label} ({len(rows)} "
                              f"particles) without a real particle; lower --junk or raise --n")
        chosen.append(rng.choice(rows.index.to_numpy(), size=n_junk, replace=False))
    junk_rows = np.sort(np.concatenate(chosen))
    mix = rng.dirichlet(np.full(len(JUNK_KINDS), 4.0))
    kinds = rng.choice(len(JUNK_KINDS), size=len(junk_rows), p=mix)
    first = min(len(junk_rows), len(JUNK_KINDS))
    kinds[rng.permutation(len(junk_rows))[:first]] = rng.permutation(len(JUNK_KINDS))[:first]
    truth[KIND_COLUMN] = PARTICLE_KIND
    truth.loc[junk_rows, KIND_COLUMN] = np.asarray(JUNK_KINDS)[kinds]
    truth.loc[junk_rows, ["class", "shape", "view"]] = 0
    truth[SOURCE_VIEW_COLUMN] = 0
    counts = truth.loc[junk_rows, KIND_COLUMN].value_counts()
    logger.info("junk: %d of %d picks (%s)", len(junk_rows), len(truth),
                ", ".join(f"{k} {counts.get(k, 0)}" for k in JUNK_KINDS))
    return truth


def is_junk(truth: pd.DataFrame) -> NDArray[np.bool_]:
    """``(n,)`` True for junk rows of a truth table (False everywhere when it has no ``kind`` column)."""
    if KIND_COLUMN not in truth:
        return np.zeros(len(truth), dtype=bool)
    return truth[KIND_COLUMN].to_numpy() != PARTICLE_KIND


# --------------------------------------------------------------------------- rendering

def render_junk(scene, cfg, truth: pd.DataFrame, index: pd.Index, images: NDArray[np.float32],
                rng: np.random.Generator) -> NDArray[np.float32]:
    """Images of the rows ``index`` of ``truth``, with the junk rows' images replaced.

    ``images`` (n, box, box) are the normalised images of those rows as the simulator rendered
    them; the junk rows' ``psi_deg``/``shift_*`` in ``truth`` are set to the junk's main feature.
    ``rng`` draws the noise; shapes, sizes and contrasts come from the seed and the row.
    """
    rows = truth.loc[index]
    junk = np.flatnonzero(is_junk(rows))
    if len(junk) == 0:
        return images
    from . import simulate as sim          # simulate imports this module; import back lazily

    box = cfg.box_size
    padded = 2 * int(np.ceil(sim.RENDER_PADDING * box / 2))
    level = _density_level(scene, box)
    picked = rows.iloc[junk]
    ctf = sim.ctf_from_truth(picked, cfg)
    densities = np.zeros((len(junk), padded, padded), dtype=np.float32)
    for i, (label, row) in enumerate(picked.iterrows()):
        draw = _generator(cfg.seed, 1, int(label))
        densities[i], pose, view = _DRAWERS[row[KIND_COLUMN]](draw, scene, cfg, padded, level)
        truth.loc[label, ["psi_deg", "shift_x_px", "shift_y_px", SOURCE_VIEW_COLUMN]] = (*pose, view)
    signal = _crop(sim.apply_ctf(densities, ctf, cfg.pixel_size), box)
    noise_sd = _particle_noise_sd(scene, cfg, ctf, _generator(cfg.seed, 2, int(picked.index[0])))
    noisy = signal + rng.standard_normal(signal.shape, dtype=np.float32) * noise_sd[:, None, None]
    images = images.copy()
    images[junk] = sim.normalise_background(noisy, cfg.diameter / 2 / cfg.pixel_size)
    return images


def _crop(images: NDArray, box: int) -> NDArray[np.float32]:
    start = images.shape[-1] // 2 - box // 2
    return np.ascontiguousarray(images[:, start:start + box, start:start + box], dtype=np.float32)


def _density_level(scene, box: int) -> float:
    """Typical peak projected density of the scene's particles (CTF-free), the contrast unit of junk."""
    from .simulate import render_projections
    n = scene.n_classes
    templates = render_projections(scene, np.arange(n), np.zeros(n), np.zeros((n, 2)), box)
    return float(np.median(templates.reshape(n, -1).max(axis=1)))


def _particle_noise_sd(scene, cfg, ctf, rng: np.random.Generator) -> NDArray[np.float32]:
    """Noise sd a real particle would get under each junk pick's CTF: ``sqrt(var(signal) / snr)``."""
    from .simulate import render_signal
    n = len(ctf)
    classes = rng.integers(0, scene.n_classes, n)
    signal = render_signal(scene, cfg, classes, rng.uniform(0, 360, n), np.zeros((n, 2)), ctf)
    return np.sqrt(signal.var(axis=(1, 2)) / cfg.snr).astype(np.float32)


def _grid(size: int) -> tuple[NDArray, NDArray]:
    """``(x, y)`` in px from the centre ``size // 2``, x along columns, y along rows."""
    coords = np.arange(size, dtype=np.float64) - size // 2
    return coords[None, :], coords[:, None]


def _sigmoid(t: NDArray) -> NDArray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _empty(rng, scene, cfg, size, level):
    x, y = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(0.0, 0.3) * level * (x * np.cos(angle) + y * np.sin(angle)) / size
    return ramp.astype(np.float32), (rng.uniform(0, 360), 0.0, 0.0), 0


def _disc(rng, scene, cfg, size, level):
    x, y = _grid(size)
    box = cfg.box_size
    density = np.zeros((size, size))
    n_discs = 1 if rng.uniform() < 0.8 else 2
    radii = np.sort(rng.uniform(0.1, 0.6, n_discs) * box)[::-1]
    centres = []
    for radius in radii:
        r, t = 0.5 * box * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        cx, cy = r * np.cos(t), r * np.sin(t)
        centres.append((cx, cy))
        distance = np.hypot(x - cx, y - cy)
        if rng.uniform() < 0.5:       # a ball of ice: projected thickness of a sphere
            profile = np.sqrt(np.clip(1.0 - (distance / radius) ** 2, 0.0, None))
        else:                         # a flat contaminant disc with a soft rim
            profile = _sigmoid((radius - distance) / rng.uniform(0.5, 2.0))
        sign = 1.0 if rng.uniform() < 0.8 else -1.0
        density += sign * rng.uniform(1.5, 8.0) * level * profile
    return density.astype(np.float32), (rng.uniform(0, 360), *centres[0]), 0


def _carbon(rng, scene, cfg, size, level):
    x, y = _grid(size)
    box = cfg.box_size
    angle = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.cos(angle), np.sin(angle)])
    offset = rng.uniform(-0.35, 0.35) * box
    if rng.uniform() < 0.5:
        inside = x * normal[0] + y * normal[1] - offset
    else:                             # curved: the edge of a hole of radius R through the point offset*normal
        radius = rng.uniform(0.6, 3.0) * box
        cx, cy = (offset + radius) * normal
        inside = radius - np.hypot(x - cx, y - cy)
    step = _sigmoid(inside / rng.uniform(0.5, 2.5))
    texture = gaussian_filter(rng.standard_normal((size, size)), rng.uniform(1.0, 3.0))
    texture *= rng.uniform(0.0, 0.05) / max(float(texture.std()), 1e-12)
    sign = 1.0 if rng.uniform() < 0.8 else -1.0
    density = sign * rng.uniform(1.0, 5.0) * level * step * (1.0 + texture)
    return density.astype(np.float32), (float(np.rad2deg(angle)), *(offset * normal)), 0


def _place(scene, xy: NDArray, weights: NDArray, size: int) -> NDArray[np.float32]:
    """CTF-free projection of explicit atoms (positions in px from the centre) on a ``size`` box."""
    from .simulate import Scene, render_projections
    one = Scene.flat(xy, weights, scene.sigma_px)
    return render_projections(one, np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros((1, 2)), size)[0]


def _posed_atoms(rng, scene, psi_deg: float, shift: NDArray) -> tuple[NDArray, NDArray, int]:
    """A random class's atoms at a pose, and that class (1-based)."""
    k = int(rng.integers(scene.n_classes))
    xy, weights = scene.class_atoms(k)
    psi = np.deg2rad(psi_deg)
    rot = np.array([[np.cos(psi), -np.sin(psi)], [np.sin(psi), np.cos(psi)]])
    return xy @ rot.T + shift, weights, k + 1


def _aggregate(rng, scene, cfg, size, level):
    diameter_px = cfg.diameter / cfg.pixel_size
    n_members = int(rng.integers(2, 4))
    r, t = cfg.max_shift_px * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    centre = np.array([r * np.cos(t), r * np.sin(t)])
    first_psi = rng.uniform(0, 360)
    all_xy, all_w = [], []
    for member in range(n_members):
        psi = first_psi if member == 0 else rng.uniform(0, 360)
        if member:
            t = rng.uniform(0, 2 * np.pi)
            centre = centre + rng.uniform(0.4, 0.85) * diameter_px * np.array([np.cos(t), np.sin(t)])
        xy, w, view = _posed_atoms(rng, scene, psi, centre)
        all_xy.append(xy)
        all_w.append(w)
        if member == 0:
            pose, main_view = (first_psi, *centre), view
    return _place(scene, np.concatenate(all_xy), np.concatenate(all_w), size), pose, main_view


def _broken(rng, scene, cfg, size, level):
    psi = rng.uniform(0, 360)
    r, t = cfg.max_shift_px * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    shift = np.array([r * np.cos(t), r * np.sin(t)])
    xy, weights, view = _posed_atoms(rng, scene, psi, shift)
    removed = rng.uniform(0.25, 0.6)
    t = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(t), np.sin(t)])
    if rng.uniform() < 0.5:           # straight cut: drop the atoms furthest along a random direction
        along = (xy - shift) @ direction
    else:                             # a round bite: drop the atoms nearest a point on the rim
        rim = shift + direction * np.linalg.norm(xy - shift, axis=1).max()
        along = -np.linalg.norm(xy - rim, axis=1)
    keep = along < np.quantile(along, 1.0 - removed)
    return _place(scene, xy[keep], weights[keep], size), (psi, *shift), view


_DRAWERS = {"empty": _empty, "disc": _disc, "carbon": _carbon, "aggregate": _aggregate, "broken": _broken}
