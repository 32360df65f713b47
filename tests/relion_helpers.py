"""Helpers for the RELION External-job tests: tiny particle sets, a stand-in pipeline, RELION's
External command line as RELION 3.1.3 builds it.

The stand-in ``FakePipeline`` writes small, RELION-readable outputs (data STAR with optics table,
class-average stack, model STAR) so the wrapper's handshake can be tested without the real
classifier; the RELION integration tests use the real ``cryo_drvae.pipeline.run``.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np
import pandas as pd
import starfile
from scipy import ndimage

from cryo_drvae.errors import AbortRequested

# ---- particles ----------------------------------------------------------------------------


def templates(box: int) -> np.ndarray:
    """(4, box, box) chiral, clearly distinct shapes: an L, a T-bar, an off-centre ring + dot, a wedge."""
    y, x = np.mgrid[:box, :box] - box / 2 + 0.5
    r = box / 2
    shapes = []
    ell = ((np.abs(x + 0.15 * r) < 0.12 * r) & (np.abs(y) < 0.5 * r)) | \
          ((np.abs(y - 0.42 * r) < 0.1 * r) & (x > -0.25 * r) & (x < 0.35 * r))
    shapes.append(ell)
    tee = ((np.abs(y + 0.35 * r) < 0.1 * r) & (np.abs(x) < 0.5 * r)) | \
          ((np.abs(x - 0.1 * r) < 0.1 * r) & (y > -0.35 * r) & (y < 0.5 * r))
    shapes.append(tee)
    rho = np.hypot(x - 0.1 * r, y)
    ring = ((rho > 0.28 * r) & (rho < 0.45 * r)) | (np.hypot(x + 0.2 * r, y + 0.35 * r) < 0.12 * r)
    shapes.append(ring)
    ang = np.arctan2(y, x)
    wedge = (np.hypot(x, y) < 0.55 * r) & (ang > 0.2) & (ang < 1.6)
    shapes.append(wedge)
    return np.stack([ndimage.gaussian_filter(s.astype(np.float32), 0.8) for s in shapes])


def rotate_image(img: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate by ``angle_deg`` counter-clockwise about the box centre, as seen with row 0 at the
    bottom (y up, the way RELION and mrcfile viewers show images). Linear interpolation."""
    box = img.shape[-1]
    c = box / 2.0                                # RELION's centre: pixel box//2
    a = np.deg2rad(angle_deg)
    # output at p samples the input at R(-a) (p - c) + c, i.e. the content turns by +a
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])   # R(-a) acting on (y, x) vectors
    offset = np.array([c, c]) - rot @ np.array([c, c])
    return ndimage.affine_transform(img, rot, offset=offset, order=1, mode="constant")


@dataclass
class ParticleSet:
    star: Path
    labels: np.ndarray         # (n,) 1-based true class
    angles_deg: np.ndarray     # (n,) counter-clockwise rotation applied to the template
    shifts_px: np.ndarray      # (n, 2) (dx, dy) shift applied after rotation, +x right, +y up
    box: int
    pixel_size: float
    templates: np.ndarray = field(repr=False, default=None)


def make_particle_set(out_dir: Path, *, n_classes: int = 3, n_per_class: int = 20, box: int = 32,
                      pixel_size: float = 3.0, noise_sd: float = 0.3, seed: int = 0,
                      relion30: bool = False, max_shift_px: int = 2,
                      star_name: str = "particles.star") -> ParticleSet:
    """Write a tiny particle set (one .mrcs stack + STAR) under ``out_dir`` (project-relative paths).

    Particle i is template ``labels[i]`` rotated by ``angles_deg[i]`` (counter-clockwise) then
    shifted by ``shifts_px[i]`` pixels, plus Gaussian noise; CTF columns are present but the
    images carry no CTF. ``relion30`` writes the single-block RELION 3.0 format.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    (out_dir / "Particles").mkdir(parents=True, exist_ok=True)
    tpl = templates(box)[:n_classes]
    n = n_classes * n_per_class
    labels = np.repeat(np.arange(1, n_classes + 1), n_per_class)
    rng.shuffle(labels)
    angles = rng.uniform(0, 360, n)
    shifts = rng.integers(-max_shift_px, max_shift_px + 1, size=(n, 2))
    imgs = np.empty((n, box, box), np.float32)
    for i in range(n):
        img = rotate_image(tpl[labels[i] - 1], angles[i])
        img = np.roll(img, (shifts[i, 1], shifts[i, 0]), axis=(0, 1))   # +y = +row (y up, row 0 at bottom)
        imgs[i] = img * 3.0 + rng.normal(0, noise_sd, (box, box))
    imgs = (imgs - imgs.mean()) / imgs.std()
    stack = out_dir / "Particles" / "stack.mrcs"
    with mrcfile.new(stack, overwrite=True) as m:
        m.set_data(imgs)
        m.voxel_size = pixel_size
        m.header.ispg = 0
    names = [f"{i + 1:06d}@{stack.as_posix()}" for i in range(n)]
    parts = pd.DataFrame({
        "rlnImageName": names,
        "rlnMicrographName": [f"Micrographs/mic{i // 10:03d}.mrc" for i in range(n)],
        "rlnCoordinateX": rng.uniform(100, 900, n).round(1),
        "rlnCoordinateY": rng.uniform(100, 900, n).round(1),
        "rlnDefocusU": np.full(n, 15000.0), "rlnDefocusV": np.full(n, 14500.0),
        "rlnDefocusAngle": np.full(n, 30.0),
    })
    star = out_dir / star_name
    if relion30:
        parts["rlnVoltage"] = 300.0
        parts["rlnSphericalAberration"] = 2.7
        parts["rlnAmplitudeContrast"] = 0.1
        parts["rlnMagnification"] = 10000.0
        parts["rlnDetectorPixelSize"] = pixel_size          # µm; pixel size = 1e4 * µm / mag
        starfile.write(parts, star, overwrite=True)
    else:
        parts["rlnOpticsGroup"] = 1
        optics = pd.DataFrame({
            "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [pixel_size], "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [pixel_size], "rlnImageSize": [box], "rlnImageDimensionality": [2],
        })
        starfile.write({"optics": optics, "particles": parts}, star, overwrite=True)
    return ParticleSet(star, labels, angles, shifts, box, pixel_size, tpl)


# ---- a stand-in for cryo_drvae.pipeline.run ----------------------------------------------------

@dataclass
class FakeResult:
    paths: dict[str, Path]
    n_rounds: int = 0                # rounds run (the real pipeline's RunResult.n_rounds)


class FakePipeline:
    """Callable like ``pipeline.run(cfg, should_abort=...)``; writes RELION-readable outputs.

    Classes are ``i % K + 1``; psi and origins 0. ``steps`` x ``delay`` seconds are spent polling
    ``should_abort``; ``write_data_first`` writes the data STAR before the last abort poll;
    ``raises`` is raised instead of finishing.
    """

    def __init__(self, steps: int = 1, delay: float = 0.0, write_data_first: bool = False,
                 raises: BaseException | None = None, rounds_run: int | None = None) -> None:
        self.steps, self.delay, self.write_data_first, self.raises = steps, delay, write_data_first, raises
        self.rounds_run = rounds_run
        self.calls: list = []

    def __call__(self, cfg, should_abort: Callable[[], bool] = lambda: False) -> FakeResult:
        self.calls.append(cfg)
        prefix = cfg.output_prefix
        paths = {k: Path(f"{prefix}{s}") for k, s in (
            ("data_star", "_data.star"), ("model_star", "_model.star"),
            ("class_averages", "_class_averages.mrcs"), ("classes_png", "_classes.png"),
            ("convergence_png", "_convergence.png"))}
        blocks = starfile.read(cfg.data.particles_star, always_dict=True)
        parts = blocks["particles"].copy()
        optics = blocks["optics"]
        k = cfg.cluster.n_classes
        for step in range(self.steps):
            if should_abort():
                raise AbortRequested("RELION_JOB_ABORT_NOW found")
            time.sleep(self.delay)
        if self.raises is not None:
            raise self.raises
        parts["rlnAnglePsi"] = 0.0
        parts["rlnOriginXAngst"] = 0.0
        parts["rlnOriginYAngst"] = 0.0
        parts["rlnClassNumber"] = np.arange(len(parts)) % k + 1
        parts["rlnMaxValueProbDistribution"] = 0.9
        starfile.write({"optics": optics, "particles": parts}, paths["data_star"], overwrite=True)
        if self.write_data_first and should_abort():
            raise AbortRequested("RELION_JOB_ABORT_NOW found")
        box = int(optics["rlnImageSize"].iloc[0])
        with mrcfile.new(paths["class_averages"], overwrite=True) as m:
            m.set_data(np.zeros((k, box, box), np.float32))
            m.voxel_size = float(optics["rlnImagePixelSize"].iloc[0])
        general = {"rlnReferenceDimensionality": 2, "rlnDataDimensionality": 2,
                   "rlnOriginalImageSize": box, "rlnPixelSize": float(optics["rlnImagePixelSize"].iloc[0]),
                   "rlnNrClasses": k}
        classes = pd.DataFrame({
            "rlnReferenceImage": [f"{i:06d}@{paths['class_averages'].as_posix()}" for i in range(1, k + 1)],
            "rlnClassDistribution": np.bincount(parts["rlnClassNumber"], minlength=k + 1)[1:] / len(parts),
        })
        starfile.write({"model_general": general, "model_classes": classes}, paths["model_star"], overwrite=True)
        for key in ("classes_png", "convergence_png"):
            paths[key].write_bytes(b"\x89PNG\r\n\x1a\n")
        return FakeResult(paths, cfg.cluster.n_rounds if self.rounds_run is None else self.rounds_run)


# ---- RELION 3.1.3's External job command line ----------------------------------------------------

def relion313_external_command(fn_exe: str, outputname: str, *, in_parts: str = "",
                               params: list[tuple[str, str]] = (), nr_threads: int = 1,
                               other_args: str = "") -> str:
    """The command string RELION 3.1.3 builds for an External job (RelionJob::getCommandsExternalJob
    and prepareFinalCommand in src/pipeline_jobs.cpp, tag 3.1.3), before the run.out redirection."""
    command = f"{fn_exe} --o {outputname}"
    if in_parts:
        command += f" --in_parts {in_parts}"
    for label, value in params:
        if label:
            command += f" --{label} {value}"
    command += f" --j {nr_threads}"
    command += " " + other_args
    if "relion_" in command:
        command += f" --pipeline_control {outputname}"
    return command


def relion313_external_argv(*args, **kwargs) -> list[str]:
    """argv[1:] the executable receives for that command (the shell splits it on white space)."""
    return shlex.split(relion313_external_command(*args, **kwargs))[1:]


def stack_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two images inside ``mask``."""
    if mask is None:
        mask = np.ones(a.shape, bool)
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def circular_mask(box: int, radius_fraction: float = 0.45) -> np.ndarray:
    y, x = np.mgrid[:box, :box] - box // 2
    return np.hypot(x, y) < radius_fraction * box


def run_env() -> dict[str, str]:
    """Environment for subprocesses: the test venv's bin first, single-threaded math libraries."""
    env = dict(os.environ)
    venv_bin = str(Path(__file__).resolve().parents[1] / ".venv" / "bin")
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    return env


def without_rotational_average(img: np.ndarray) -> np.ndarray:
    """``img`` minus its rotational average about pixel (box//2, box//2): only the part that
    changes with in-plane rotation is left, so a rotationally blurred average scores near 0."""
    box = img.shape[-1]
    y, x = np.mgrid[:box, :box] - box // 2
    r = np.rint(np.hypot(x, y)).astype(int)
    profile = np.bincount(r.ravel(), img.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    return img - profile[r]
