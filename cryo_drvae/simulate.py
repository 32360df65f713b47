"""Simulated cryo-EM particle sets with known classes, written as a RELION Extract job would.

Every number comes from ``SimulationConfig.seed``; nothing is downloaded.

>>> sim = simulate_dataset(SimulationConfig(n_classes=10, n_particles=2000, snr=0.02), "sim")
>>> sim.star_path, sim.truth_path          # sim/particles.star, sim/truth.csv

Physics
-------
Each of ``n_shapes`` 3D structures is a pseudo-atomic model: about 400 isotropic Gaussian
"atoms" grouped in 3-5 ellipsoidal domains of different size and density, joined into a
compact, non-symmetric blob of ``particle_diameter``. A class is one (shape, projection
direction) pair; the directions of a shape are spread by farthest-point sampling on the sphere
with ``d`` and ``-d`` treated as one (``-d`` gives the mirror image, which 2D classification
could not tell apart from ``d`` if a method is flip-invariant), then randomly rotated per seed.
A particle is rendered analytically (atom coordinates rotated, summed Gaussians sampled on the
pixel grid, no interpolation) on a box 1.5 times as wide, multiplied in Fourier space by
its own astigmatic CTF (``ctf.ctf_images``, RELION-exact, ``-sin(chi)``, hence positive at low
frequency for underfocus, so the positive density is *bright*, as after RELION's extraction with
contrast inversion), cropped to ``box_size``, given white Gaussian noise of variance
``var(CTF-modulated signal over the box) / snr`` (per particle, so every image has exactly the
requested SNR), and normalised as RELION's extraction does: the background outside the circle of
``particle_diameter`` has mean 0 and standard deviation 1.

Geometry conventions: ``GEOMETRY_CONVENTIONS`` below (also written as ``truth_conventions.txt``;
a constant, not this docstring, so that ``python -OO`` keeps it).

Files
-----
``particles.star`` (RELION 3.1: ``data_optics`` + ``data_particles``; or RELION 3.0 with
``relion30=True``), ``Particles/stack_NNN.mrcs`` (float32, ``particles_per_stack`` per stack),
``truth.csv``, ``truth_conventions.txt``, ``templates.mrcs`` (one clean, CTF-free projection per
class, in class order) and ``simulation.yaml`` (the config). With ``junk_fraction`` > 0 that share of
every class's picks is junk (``cryo_drvae.junk``: class 0, and ``truth.csv`` gains a ``kind`` column). Image names such as
``000001@Particles/stack_001.mrcs`` are relative to the folder holding ``particles.star``, or,
with ``project_dir`` (what ``cryo-drvae simulate`` passes: the current folder), relative to that
project folder as RELION writes them (``000001@sim/Particles/stack_001.mrcs``), since RELION
resolves them against the project folder it runs in.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch
import yaml
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from . import star_io as sio
from .ctf import CtfParams, ctf_images
from .errors import ConfigError
from .io_utils import atomic_path
from .normalise import background_mask
from .progress import bar as tqdm
from .structures import AtomicModel, read_atomic_model
from .junk import KIND_COLUMN, SOURCE_VIEW_COLUMN, mark_junk, render_junk

logger = logging.getLogger(__name__)

ATOMS_PER_SHAPE = 400
MODEL_ATOM_SIGMA = 2.0          # Å, atom blur for atomic models (a B-factor-like envelope)
MODEL_BOX_FRACTION = 0.65       # automatic pixel size: the largest model spans this much of the box
ATOM_SIGMA_FRACTION = 0.035     # atom Gaussian sigma as a fraction of the particle diameter
MAX_ASTIGMATISM = 1000.0        # Å, |defocus_u - defocus_v| is uniform in [0, this]
RENDER_PADDING = 1.5            # render and apply the CTF on a box this many times larger
RENDER_BATCH = 128              # particles rendered at once (memory ~ batch x atoms x box)
RENDER_FLOATS = 40_000_000      # at most this many floats per atom-profile array
MICROGRAPH_SIZE = 4096          # px, range of the fake pick coordinates

TRUTH_COLUMNS = ["image_name", "class", "shape", "view", "psi_deg", "shift_x_px", "shift_y_px",
                 "defocus_u", "defocus_v", "defocus_angle"]

#: How ``truth.csv`` describes each particle (written beside it as ``truth_conventions.txt``).
GEOMETRY_CONVENTIONS = """\
Geometry conventions (used in ``truth.csv`` and ``truth_conventions.txt``)
-----------------------------------------------------------------------
Images are numpy arrays ``image[row, column]`` exactly as stored in the .mrcs (first row first).
``x`` is the column index and ``y`` the row index, measured in pixels from the box centre
``(box//2, box//2)``. A particle is its class template (``templates.mrcs``, psi = 0, no shift)
rotated by ``psi_deg`` and then shifted, i.e. the template point ``(x, y)`` lands at
``(x cos psi - y sin psi + shift_x_px, x sin psi + y cos psi + shift_y_px)``. This rotation is
counter-clockwise when the y axis points up (the MRC convention: first row at the bottom, as
in most MRC viewers), clockwise when row 0 is drawn at the top (``imshow`` default).
``shift_x_px, shift_y_px`` is where the particle centre (the density-weighted centre of the
atoms) sits relative to the box centre. RELION's origin that would re-centre the particle is
``rlnOriginX = -shift_x_px`` (re-extraction takes ``rlnCoordinateX - rlnOriginX``); the STAR file
written here holds origins of 0, like a fresh extraction. Defoci in Å, ``defocus_angle`` in degrees
from the x axis in the same frame, as RELION defines ``rlnDefocusAngle``.
"""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Lengths in Å unless the name says ``_px``; voltage kV, cs mm."""

    n_classes: int = 10
    n_particles: int = 2000
    snr: float = 0.02
    box_size: int = 64
    pixel_size: float = 3.0
    n_shapes: int = 1                   # distinct 3D densities; classes = n_shapes x views
    imbalance: float = 1.0              # largest / smallest class size; geometric in between
    max_shift_px: float = 4.0           # shifts uniform in a disc of this radius
    defocus_range: tuple[float, float] = (10000.0, 25000.0)
    particle_diameter: float = 0.0      # Å; 0 = 0.6 x box x pixel_size
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    particles_per_stack: int = 500
    relion30: bool = False              # RELION 3.0 STAR: one block, per-row optics, rlnOriginX/Y px
    seed: int = 0
    pdb_files: tuple[str, ...] = ()     # atomic models (PDB/mmCIF); one shape each instead of blobs
    view_jitter_deg: float | None = None  # sd of each particle's tilt off its view; None: 2 (models), 0 (blobs)
    junk_fraction: float = 0.0          # share of picks turned into junk (cryo_drvae.junk); class 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "defocus_range", tuple(float(v) for v in self.defocus_range))
        object.__setattr__(self, "pdb_files", tuple(str(p) for p in self.pdb_files))
        if self.pdb_files:
            object.__setattr__(self, "n_shapes", len(self.pdb_files))
            if self.pixel_size == 0:
                object.__setattr__(self, "pixel_size", auto_pixel_size(self.pdb_files, self.box_size))
        if self.view_jitter_deg is None:
            object.__setattr__(self, "view_jitter_deg", 2.0 if self.pdb_files else 0.0)
        _require(self.view_jitter_deg >= 0, f"simulation.view_jitter_deg must be >= 0, got {self.view_jitter_deg}")
        _require(self.n_classes >= 1, f"simulation.n_classes must be >= 1, got {self.n_classes}")
        _require(self.n_shapes >= 1, f"simulation.n_shapes must be >= 1, got {self.n_shapes}")
        _require(self.n_classes % self.n_shapes == 0,
                 f"simulation.n_classes ({self.n_classes}) must be a multiple of "
                 f"simulation.n_shapes ({self.n_shapes})")
        _require(self.imbalance >= 1.0, f"simulation.imbalance must be >= 1, got {self.imbalance}")
        smallest = self.n_particles / (self.n_classes * self.imbalance)
        _require(self.n_particles >= self.n_classes and smallest >= 1.0,
                 f"simulation.n_particles ({self.n_particles}) is too small for "
                 f"{self.n_classes} classes with imbalance {self.imbalance}; "
                 f"every class needs at least one particle")
        _require(self.snr > 0, f"simulation.snr must be > 0, got {self.snr}")
        _require(self.box_size >= 16 and self.box_size % 2 == 0,
                 f"simulation.box_size must be an even number >= 16 px, got {self.box_size}")
        _require(self.pixel_size > 0, f"simulation.pixel_size must be > 0 Å, got {self.pixel_size}")
        _require(0 <= self.max_shift_px <= self.box_size / 4,
                 f"simulation.max_shift_px must be in [0, box_size/4 = {self.box_size / 4}], "
                 f"got {self.max_shift_px}")
        low, high = self.defocus_range
        _require(len(self.defocus_range) == 2 and MAX_ASTIGMATISM / 2 < low <= high,
                 f"simulation.defocus_range must be (low, high) with {MAX_ASTIGMATISM / 2} < low "
                 f"<= high Å, got {self.defocus_range}")
        box_angstrom = self.box_size * self.pixel_size
        for path in self.pdb_files:
            size = cached_model(path).diameter
            _require(size < box_angstrom, f"{path}: the model is {size:.0f} Å across but the box is "
                     f"{box_angstrom:.0f} Å; use a larger --box or --angpix (0 = automatic)")
        _require(0 <= self.particle_diameter < box_angstrom,
                 f"simulation.particle_diameter must be in [0, box_size x pixel_size = "
                 f"{box_angstrom:g}) Å, got {self.particle_diameter}")
        _require(self.voltage > 0, f"simulation.voltage must be > 0 kV, got {self.voltage}")
        _require(self.cs >= 0, f"simulation.cs must be >= 0 mm, got {self.cs}")
        _require(0 <= self.amplitude_contrast < 1,
                 f"simulation.amplitude_contrast must be in [0, 1), got {self.amplitude_contrast}")
        _require(self.particles_per_stack >= 1,
                 f"simulation.particles_per_stack must be >= 1, got {self.particles_per_stack}")
        _require(self.seed >= 0, f"simulation.seed must be >= 0, got {self.seed}")
        _require(0 <= self.junk_fraction <= 0.9,
                 f"simulation.junk_fraction must be in [0, 0.9], got {self.junk_fraction}")

    @property
    def diameter(self) -> float:
        """Particle diameter in Å, with the default resolved (atomic models: the largest one's)."""
        if self.particle_diameter:
            return self.particle_diameter
        if self.pdb_files:
            return min(max(cached_model(p).diameter for p in self.pdb_files) + 4 * self.atom_sigma,
                       0.95 * self.box_size * self.pixel_size)
        return 0.6 * self.box_size * self.pixel_size

    @property
    def atom_sigma(self) -> float:
        """Å, standard deviation of each atom's Gaussian."""
        if self.pdb_files:
            return max(MODEL_ATOM_SIGMA, 0.7 * self.pixel_size)
        return ATOM_SIGMA_FRACTION * self.diameter

    @property
    def views_per_shape(self) -> int:
        return self.n_classes // self.n_shapes


@dataclass(frozen=True)
class SimulatedSet:
    """Paths and ground truth of a simulated particle set.

    Attributes
    ----------
    labels : ndarray, shape (n_particles,)
        True class (1-based) of each particle, in the row order of ``star_path``.
    """

    out_dir: Path
    star_path: Path
    truth_path: Path
    templates_path: Path
    stack_paths: tuple[Path, ...]
    labels: NDArray[np.int64]
    config: SimulationConfig


@dataclass(frozen=True)
class Scene:
    """Everything that fixes the clean images: each shape's atoms and each class's view.

    Attributes
    ----------
    shape_coords : ndarray, shape (n_shapes, n_atoms, 3)
        Atom positions in px from the shape's centre; shapes with fewer atoms are padded.
    shape_weights : ndarray, shape (n_shapes, n_atoms)
        Atom masses; 0 pads shapes with fewer atoms.
    class_shape : ndarray, shape (n_classes,)
        Shape (0-based) each class is a view of.
    class_rotation : ndarray, shape (n_classes, 3, 3)
        Rotation taking the class's view direction onto +z, the projection axis.
    sigma_px : float
        Standard deviation of every atom's Gaussian, px.
    """

    shape_coords: NDArray[np.float32]
    shape_weights: NDArray[np.float32]
    class_shape: NDArray[np.int64]
    class_rotation: NDArray[np.float64]
    sigma_px: float

    @property
    def n_classes(self) -> int:
        return len(self.class_shape)

    def class_atoms(self, k: int) -> tuple[NDArray, NDArray]:
        """Class ``k``'s atoms projected at its view (psi 0, no jitter): ``(A, 2)`` px and ``(A,)`` masses."""
        s = self.class_shape[k]
        keep = self.shape_weights[s] > 0
        xy = self.shape_coords[s][keep].astype(np.float64) @ self.class_rotation[k][:2].T
        return xy, self.shape_weights[s][keep]

    @classmethod
    def flat(cls, xy: NDArray, weights: NDArray, sigma_px: float) -> Scene:
        """A one-class scene of atoms already projected: ``(A, 2)`` px and ``(A,)`` masses."""
        coords = np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)[None].astype(np.float32)
        return cls(coords, np.asarray(weights, np.float32)[None], np.zeros(1, dtype=np.int64),
                   np.eye(3)[None], sigma_px)

    @property
    def reach_px(self) -> float:
        """Largest distance of an atom from its shape's centre, px."""
        return float(np.linalg.norm(self.shape_coords, axis=-1).max())


@functools.lru_cache(maxsize=16)
def cached_model(path: str) -> AtomicModel:
    """Atomic models are read once per process (configs and scenes both need them)."""
    return read_atomic_model(path)


def auto_pixel_size(pdb_files: tuple[str, ...], box_size: int) -> float:
    """Å/px at which the largest model spans ``MODEL_BOX_FRACTION`` of the box (as picked and extracted)."""
    size = max(cached_model(p).diameter for p in pdb_files) + 4 * MODEL_ATOM_SIGMA
    return round(size / (MODEL_BOX_FRACTION * box_size), 2)


# --------------------------------------------------------------------------- 3D models and views

def _rng_streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators, so that changing one stage leaves the others' draws alone."""
    names = ("shapes", "views", "particles", "noise")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def build_shape(rng: np.random.Generator, radius: float, n_atoms: int = ATOMS_PER_SHAPE,
                atom_sigma: float = 0.0) -> tuple[NDArray, NDArray]:
    """One pseudo-atomic model: atoms in 3-5 joined ellipsoidal domains.

    Returns
    -------
    coords : ndarray, shape (n_atoms, 3)
        Å, centred on the mass-weighted centre, all atoms within ``radius - 2 atom_sigma``.
    weights : ndarray, shape (n_atoms,)
        Atom masses (domain density times a small per-atom jitter).
    """
    n_domains = int(rng.integers(3, 6))
    sizes = np.sort(rng.uniform(0.3, 0.6, n_domains))[::-1] * radius
    centres = np.zeros((n_domains, 3))
    for d in range(1, n_domains):
        parent = int(rng.integers(0, d))
        direction = rng.normal(size=3)
        centres[d] = centres[parent] + direction / np.linalg.norm(direction) * 0.8 * (sizes[parent] + sizes[d])
    semi_axes = sizes[:, None] * rng.uniform(0.55, 1.3, (n_domains, 3))
    volumes = semi_axes.prod(axis=1)
    counts = np.maximum(8, np.round(n_atoms * volumes / volumes.sum()).astype(int))
    counts[0] += n_atoms - counts.sum()
    density = rng.uniform(0.5, 1.5, n_domains)
    coords, weights = [], []
    for d in range(n_domains):
        ball = rng.normal(size=(counts[d], 3))
        ball *= (rng.uniform(size=(counts[d], 1)) ** (1 / 3)) / np.linalg.norm(ball, axis=1, keepdims=True)
        spin = Rotation.random(random_state=rng).as_matrix()
        coords.append(centres[d] + (ball * semi_axes[d]) @ spin.T)
        weights.append(density[d] * rng.uniform(0.8, 1.2, counts[d]))
    coords, weights = np.concatenate(coords), np.concatenate(weights)
    coords -= np.average(coords, axis=0, weights=weights)
    coords *= (radius - 2 * atom_sigma) / np.linalg.norm(coords, axis=1).max()
    return coords, weights


def fibonacci_sphere(n_points: int) -> NDArray:
    """``n_points`` nearly uniform unit vectors, shape (n_points, 3)."""
    i = np.arange(n_points) + 0.5
    z = 1.0 - 2.0 * i / n_points
    phi = np.pi * (1.0 + 5 ** 0.5) * i
    r = np.sqrt(1.0 - z ** 2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def choose_view_directions(n_views: int, rng: np.random.Generator) -> NDArray:
    """Well-spread projection directions, shape (n_views, 3), no two near-antipodal.

    Greedy farthest-point sampling over a randomly rotated Fibonacci sphere, with the
    distance ``arccos |d1 . d2|`` so that a direction and its mirror count as one.
    """
    candidates = fibonacci_sphere(max(200, 20 * n_views)) @ Rotation.random(random_state=rng).as_matrix().T
    chosen = [int(rng.integers(len(candidates)))]
    closeness = np.abs(candidates @ candidates[chosen[0]])
    for _ in range(n_views - 1):
        chosen.append(int(np.argmin(closeness)))
        closeness = np.maximum(closeness, np.abs(candidates @ candidates[chosen[-1]]))
    return candidates[chosen]


def view_rotation(direction: NDArray) -> NDArray:
    """Rotation matrix (3, 3) taking the unit ``direction`` onto +z, the projection axis."""
    tilt = np.arccos(np.clip(direction[2], -1.0, 1.0))
    rot = np.arctan2(direction[1], direction[0])
    return Rotation.from_euler("zy", [-rot, -tilt]).as_matrix()


def build_scene(cfg: SimulationConfig) -> Scene:
    """Atoms and views of every class, all from ``cfg.seed`` (same seed, same scene)."""
    streams = _rng_streams(cfg.seed)
    radius = cfg.diameter / 2
    shapes, rotations = [], []
    for s in range(cfg.n_shapes):
        if cfg.pdb_files:
            model = cached_model(cfg.pdb_files[s])
            coords, weights = model.coords, model.weights
        else:
            coords, weights = build_shape(streams["shapes"], radius, atom_sigma=cfg.atom_sigma)
        shapes.append((coords / cfg.pixel_size, weights))
        rotations += [view_rotation(d) for d in choose_view_directions(cfg.views_per_shape, streams["views"])]
    n_atoms = max(len(w) for _, w in shapes)
    xyz = np.zeros((cfg.n_shapes, n_atoms, 3), dtype=np.float32)
    w = np.zeros((cfg.n_shapes, n_atoms), dtype=np.float32)
    for s, (c, m) in enumerate(shapes):
        xyz[s, :len(m)], w[s, :len(m)] = c, m
    class_shape = np.arange(cfg.n_classes) // cfg.views_per_shape
    return Scene(xyz, w, class_shape, np.stack(rotations), float(cfg.atom_sigma / cfg.pixel_size))


def jitter_rotations(n: int, sd_deg: float, rng: np.random.Generator) -> NDArray | None:
    """``n`` small random rotations (angle ~ N(0, sd) about a uniform axis), or None for sd 0."""
    if sd_deg <= 0:
        return None
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return Rotation.from_rotvec(axis * np.deg2rad(rng.normal(0.0, sd_deg, (n, 1)))).as_matrix()


def render_projections(scene: Scene, classes: NDArray, psi_deg: NDArray, shifts_px: NDArray,
                       size: int, jitter: NDArray | None = None) -> NDArray[np.float32]:
    """Noise-free, CTF-free projections, shape (n, size, size), centre at ``size // 2``.

    ``classes`` are 0-based; ``jitter`` (n, 3, 3) tilts each particle off its class's view first.
    Each image is a sum of Gaussians sampled at pixel centres: per atom an outer product of a
    row and a column profile, i.e. a batched ``G_y^T diag(w) G_x``.
    """
    rotation = scene.class_rotation[classes][:, :2]                              # (n, 2, 3)
    if jitter is not None:
        rotation = rotation @ jitter
    atoms = scene.shape_coords[scene.class_shape[classes]].astype(np.float64)    # (n, atoms, 3)
    x0, y0 = np.einsum("naj,nij->nai", atoms, rotation).transpose(2, 0, 1)       # (n, atoms) each
    psi = np.deg2rad(np.asarray(psi_deg, dtype=np.float64))
    cos, sin = np.cos(psi)[:, None], np.sin(psi)[:, None]
    x = (cos * x0 - sin * y0 + shifts_px[:, :1]).astype(np.float32)
    y = (sin * x0 + cos * y0 + shifts_px[:, 1:]).astype(np.float32)
    grid = np.arange(size, dtype=np.float32) - size // 2
    gx = _gaussian_profiles(grid[None, None, :] - x[:, :, None], scene.sigma_px)    # (n, atoms, size)
    gy = _gaussian_profiles(grid[None, :, None] - y[:, None, :], scene.sigma_px)    # (n, size, atoms)
    gy *= scene.shape_weights[scene.class_shape[classes]][:, None, :]
    return torch.bmm(torch.from_numpy(gy), torch.from_numpy(gx)).numpy()   # numpy's stacked matmul is far slower


def _gaussian_profiles(distance: NDArray, sigma: float) -> NDArray[np.float32]:
    """``exp(-d^2 / 2 sigma^2)``, exactly 0 beyond 6 sigma.

    The cut keeps subnormal floats out of the matmul, which would otherwise be many times slower.
    """
    arg = np.float32(-0.5 / sigma ** 2) * np.square(distance)
    np.maximum(arg, np.float32(-18.0), out=arg)
    profiles = np.exp(arg)
    profiles[arg == np.float32(-18.0)] = 0.0
    return profiles


def apply_ctf(images: NDArray, ctf: CtfParams, pixel_size: float) -> NDArray[np.float32]:
    """Multiply each image's Fourier transform by its own CTF, shape kept."""
    size = images.shape[-1]
    spectrum = torch.fft.rfft2(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
    spectrum *= torch.from_numpy(ctf_images(ctf, size, pixel_size, rfft=True))
    return torch.fft.irfft2(spectrum, s=images.shape[-2:]).numpy()


def render_signal(scene: Scene, cfg: SimulationConfig, classes: NDArray, psi_deg: NDArray,
                  shifts_px: NDArray, ctf: CtfParams, jitter: NDArray | None = None) -> NDArray[np.float32]:
    """CTF-modulated, noise-free particles, shape (n, box, box), before normalisation.

    Rendered on a box ``RENDER_PADDING`` times wider, so that most of the CTF's delocalised signal
    (up to ~27 px at 25000 Å defocus, 3 Å/px, Nyquist) is not wrapped back into the box, then cropped.
    """
    padded = 2 * int(np.ceil(RENDER_PADDING * cfg.box_size / 2))
    support = render_support(scene, cfg.max_shift_px, padded)
    images = np.zeros((len(classes), padded, padded), dtype=np.float32)
    start = padded // 2 - support // 2
    images[:, start:start + support, start:start + support] = render_projections(
        scene, classes, psi_deg, shifts_px, support, jitter)
    images = apply_ctf(images, ctf, cfg.pixel_size)
    start = padded // 2 - cfg.box_size // 2
    return images[:, start:start + cfg.box_size, start:start + cfg.box_size]


def render_support(scene: Scene, max_shift_px: float, limit: int) -> int:
    """Even side (px) of the centred square holding every atom's Gaussian to 5 sigma.

    Rendering only there, not on the whole padded box, saves most of the work.
    """
    reach = scene.reach_px + max_shift_px + 5 * scene.sigma_px
    return min(limit, 2 * int(np.ceil(reach)) + 2)


def normalise_background(images: NDArray, radius_px: float) -> NDArray[np.float32]:
    """RELION-style normalisation: background (outside ``radius_px``) to mean 0, sd 1."""
    background = images[:, background_mask(images.shape[-1], radius_px)]
    mean = background.mean(axis=1)[:, None, None]
    sd = background.std(axis=1)[:, None, None]
    return ((images - mean) / sd).astype(np.float32)


def add_noise(signal: NDArray, snr: float, rng: np.random.Generator) -> NDArray[np.float32]:
    """White Gaussian noise with variance ``var(signal over the box) / snr``, per image."""
    sd = np.sqrt(signal.var(axis=(1, 2)) / snr).astype(np.float32)[:, None, None]
    return signal + rng.standard_normal(signal.shape, dtype=np.float32) * sd


# --------------------------------------------------------------------------- particle parameters

def class_sizes(n_particles: int, n_classes: int, imbalance: float) -> NDArray[np.int64]:
    """Class sizes summing to ``n_particles``, geometric from largest (first) to smallest.

    ``largest / smallest`` is ``imbalance`` up to rounding; ``imbalance = 1`` gives equal sizes.
    """
    shares = imbalance ** (-np.arange(n_classes) / max(n_classes - 1, 1))
    exact = n_particles * shares / shares.sum()
    sizes = np.floor(exact).astype(np.int64)
    remainder = n_particles - sizes.sum()
    sizes[np.argsort(sizes - exact, kind="stable")[:remainder]] += 1
    return sizes


def draw_particles(cfg: SimulationConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Per-particle truth (shuffled order): class, psi, shift, defocus; no image names yet."""
    sizes = class_sizes(cfg.n_particles, cfg.n_classes, cfg.imbalance)
    sizes = sizes[rng.permutation(cfg.n_classes)]            # which class is large is random
    classes = rng.permutation(np.repeat(np.arange(cfg.n_classes), sizes))
    n = cfg.n_particles
    radius = cfg.max_shift_px * np.sqrt(rng.uniform(size=n))
    theta = rng.uniform(0.0, 2 * np.pi, n)
    mean_defocus = rng.uniform(*cfg.defocus_range, n)
    astigmatism = rng.uniform(0.0, MAX_ASTIGMATISM, n)
    return pd.DataFrame({
        "class": classes + 1,
        "shape": classes // cfg.views_per_shape + 1,
        "view": classes % cfg.views_per_shape + 1,
        "psi_deg": rng.uniform(0.0, 360.0, n),
        "shift_x_px": radius * np.cos(theta),
        "shift_y_px": radius * np.sin(theta),
        "defocus_u": mean_defocus + astigmatism / 2,
        "defocus_v": mean_defocus - astigmatism / 2,
        "defocus_angle": rng.uniform(0.0, 180.0, n),
    })


def ctf_from_truth(truth: pd.DataFrame, cfg: SimulationConfig) -> CtfParams:
    """CTF parameters of the rows of a truth table."""
    return CtfParams.from_arrays(truth["defocus_u"].to_numpy(), truth["defocus_v"].to_numpy(),
                                 truth["defocus_angle"].to_numpy(), voltage=cfg.voltage, cs=cfg.cs,
                                 amplitude_contrast=cfg.amplitude_contrast)


def render_particles(scene: Scene, cfg: SimulationConfig, truth: pd.DataFrame,
                     rng: np.random.Generator) -> NDArray[np.float32]:
    """Final particle images for the rows of ``truth``, shape (n, box, box), normalised."""
    radius_px = cfg.diameter / 2 / cfg.pixel_size
    out = np.empty((len(truth), cfg.box_size, cfg.box_size), dtype=np.float32)
    support = render_support(scene, cfg.max_shift_px, 2 * cfg.box_size)
    batch = int(np.clip(RENDER_FLOATS // (scene.shape_coords.shape[1] * support), 4, RENDER_BATCH))
    for start in range(0, len(truth), batch):
        rows = truth.iloc[start:start + batch]
        jitter = jitter_rotations(len(rows), cfg.view_jitter_deg, rng)
        signal = render_signal(scene, cfg, rows["class"].to_numpy() - 1, rows["psi_deg"].to_numpy(),
                               rows[["shift_x_px", "shift_y_px"]].to_numpy(), ctf_from_truth(rows, cfg), jitter)
        out[start:start + len(rows)] = normalise_background(add_noise(signal, cfg.snr, rng), radius_px)
    return out


# --------------------------------------------------------------------------- writing

def write_mrcs(path: Path, images: NDArray, pixel_size: float) -> None:
    """Write a float32 .mrcs stack atomically, with ``voxel_size`` and ``ispg = 0``."""
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(images, dtype=np.float32))
            mrc.voxel_size = pixel_size
            mrc.header.ispg = 0


def _stack_names(cfg: SimulationConfig) -> list[str]:
    n_stacks = -(-cfg.n_particles // cfg.particles_per_stack)
    width = max(3, len(str(n_stacks)))
    return [f"Particles/stack_{i + 1:0{width}d}.mrcs" for i in range(n_stacks)]


def _image_names(cfg: SimulationConfig) -> tuple[list[str], list[str]]:
    """``NNNNNN@stack`` per particle and the micrograph each stack stands for."""
    names, micrographs = [], []
    for i, stack in enumerate(_stack_names(cfg)):
        n_in = min(cfg.particles_per_stack, cfg.n_particles - i * cfg.particles_per_stack)
        names += [f"{j + 1:06d}@{stack}" for j in range(n_in)]
        micrographs += [f"Micrographs/mic_{Path(stack).stem.split('_')[-1]}.mrc"] * n_in
    return names, micrographs


def particle_table(cfg: SimulationConfig, truth: pd.DataFrame, micrographs: list[str],
                   rng: np.random.Generator) -> pd.DataFrame:
    """``data_particles`` as a fresh RELION 3.1 extraction writes it (no angles, zero origins)."""
    n = len(truth)
    coords = rng.uniform(cfg.box_size, MICROGRAPH_SIZE - cfg.box_size, (n, 2)).round()
    return pd.DataFrame({
        sio.IMAGE_NAME: truth["image_name"].to_numpy(),
        sio.MICROGRAPH_NAME: micrographs,
        sio.COORDINATE_X: coords[:, 0],
        sio.COORDINATE_Y: coords[:, 1],
        sio.DEFOCUS_U: truth["defocus_u"].to_numpy(),
        sio.DEFOCUS_V: truth["defocus_v"].to_numpy(),
        sio.DEFOCUS_ANGLE: truth["defocus_angle"].to_numpy(),
        sio.CTF_BFACTOR: 0.0,
        sio.CTF_SCALEFACTOR: 1.0,
        sio.PHASE_SHIFT: 0.0,
        sio.OPTICS_GROUP: 1,
        sio.ORIGIN_X_ANGST: 0.0,
        sio.ORIGIN_Y_ANGST: 0.0,
    })


def optics_table(cfg: SimulationConfig) -> pd.DataFrame:
    """``data_optics``: one optics group."""
    return pd.DataFrame({
        sio.OPTICS_GROUP_NAME: ["opticsGroup1"],
        sio.OPTICS_GROUP: [1],
        sio.MICROGRAPH_ORIGINAL_PIXEL_SIZE: [cfg.pixel_size],
        sio.VOLTAGE: [cfg.voltage],
        sio.SPHERICAL_ABERRATION: [cfg.cs],
        sio.AMPLITUDE_CONTRAST: [cfg.amplitude_contrast],
        sio.IMAGE_PIXEL_SIZE: [cfg.pixel_size],
        sio.IMAGE_SIZE: [cfg.box_size],
        sio.IMAGE_DIMENSIONALITY: [2],
    })


def relion30_table(cfg: SimulationConfig, particles: pd.DataFrame) -> pd.DataFrame:
    """The same particles in RELION 3.0 form: per-row optics, origins in pixels.

    Pixel size = rlnDetectorPixelSize (µm) x 1e4 / rlnMagnification.
    """
    table = particles.drop(columns=[sio.OPTICS_GROUP, sio.ORIGIN_X_ANGST, sio.ORIGIN_Y_ANGST])
    table[sio.VOLTAGE] = cfg.voltage
    table[sio.SPHERICAL_ABERRATION] = cfg.cs
    table[sio.AMPLITUDE_CONTRAST] = cfg.amplitude_contrast
    table[sio.MAGNIFICATION] = 10000.0
    table[sio.DETECTOR_PIXEL_SIZE] = cfg.pixel_size
    table[sio.ORIGIN_X] = 0.0
    table[sio.ORIGIN_Y] = 0.0
    return table


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_truth(out_dir: Path, truth: pd.DataFrame) -> Path:
    """``truth.csv`` (columns ``TRUTH_COLUMNS``) and ``truth_conventions.txt``."""
    path = out_dir / "truth.csv"
    columns = TRUTH_COLUMNS + [c for c in (KIND_COLUMN, SOURCE_VIEW_COLUMN) if c in truth]   # junk sets only
    with atomic_path(path) as tmp:
        truth[columns].to_csv(tmp, index=False, float_format="%.6f")
    _write_text(out_dir / "truth_conventions.txt", GEOMETRY_CONVENTIONS)
    return path


# --------------------------------------------------------------------------- entry point

def project_relative_names(names: list[str], out_dir: Path, project_dir: str | os.PathLike) -> list[str]:
    """``N@Particles/x.mrcs`` (relative to ``out_dir``) -> ``N@<out_dir from project_dir>/Particles/x.mrcs``,
    as RELION names images: relative to its project folder; absolute when ``out_dir`` lies outside it."""
    out_abs, project = Path(os.path.abspath(out_dir)), Path(os.path.abspath(project_dir))
    try:
        folder = out_abs.relative_to(project)
    except ValueError:
        folder = out_abs
    prefix = "" if str(folder) == "." else f"{folder.as_posix()}/"
    return [f"{slice_}@{prefix}{stack}" for slice_, _, stack in (name.partition("@") for name in names)]


def simulate_dataset(cfg: SimulationConfig, out_dir: str | os.PathLike,
                     project_dir: str | os.PathLike | None = None) -> SimulatedSet:
    """Simulate a particle set with known classes and write it as RELION files.

    Parameters
    ----------
    cfg
        What to simulate; every random draw comes from ``cfg.seed``.
    out_dir
        Output folder (created). Existing files of the same names are replaced.
    project_dir
        Write image names relative to this folder (RELION's project folder), not to ``out_dir``.

    Returns
    -------
    SimulatedSet
        Paths of the STAR file, stacks, truth table and templates, and the labels.
    """
    out_dir = Path(out_dir)
    (out_dir / "Particles").mkdir(parents=True, exist_ok=True)
    logger.info("simulating %d particles, %d classes (%d shape(s)), box %d px at %.3g Å/px, SNR %g, seed %d",
                cfg.n_particles, cfg.n_classes, cfg.n_shapes, cfg.box_size, cfg.pixel_size, cfg.snr, cfg.seed)
    streams = _rng_streams(cfg.seed)
    scene = build_scene(cfg)
    truth = mark_junk(draw_particles(cfg, streams["particles"]), cfg)
    names, micrographs = _image_names(cfg)
    if project_dir is not None:
        names = project_relative_names(names, out_dir, project_dir)
    truth.insert(0, "image_name", names)

    stack_paths = []
    for i, stack in enumerate(tqdm(_stack_names(cfg), desc="stacks", disable=None)):
        rows = truth.iloc[i * cfg.particles_per_stack:(i + 1) * cfg.particles_per_stack]
        images = render_particles(scene, cfg, rows, streams["noise"])
        images = render_junk(scene, cfg, truth, rows.index, images, streams["noise"])   # junk rows only
        write_mrcs(out_dir / stack, images, cfg.pixel_size)
        stack_paths.append(out_dir / stack)

    templates = render_projections(scene, np.arange(cfg.n_classes), np.zeros(cfg.n_classes),
                                   np.zeros((cfg.n_classes, 2)), cfg.box_size)
    write_mrcs(out_dir / "templates.mrcs", templates, cfg.pixel_size)
    particles = particle_table(cfg, truth, micrographs, streams["particles"])
    star_path = out_dir / "particles.star"
    if cfg.relion30:
        sio.write_star_blocks(star_path, {"": relion30_table(cfg, particles)}, version_line=False)
    else:
        sio.write_star_blocks(star_path, {"optics": optics_table(cfg), "particles": particles})
    truth_path = write_truth(out_dir, truth)
    _write_text(out_dir / "simulation.yaml", yaml.safe_dump(
        {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}, sort_keys=False))
    logger.info("wrote %s (%d particles in %d stacks), %s, %s", star_path, cfg.n_particles,
                len(stack_paths), truth_path, out_dir / "templates.mrcs")
    return SimulatedSet(out_dir, star_path, truth_path, out_dir / "templates.mrcs", tuple(stack_paths),
                        truth["class"].to_numpy(np.int64), cfg)
