"""Tests of the particle simulator: files, class sizes, seeds, SNR, normalisation, geometry."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.ndimage import map_coordinates, rotate

from cryo_drvae.errors import ConfigError, InputFileError
from cryo_drvae.normalise import background_mask
from cryo_drvae.structures import read_atomic_model
from cryo_drvae.simulate import (SimulationConfig, build_scene, class_sizes,
                                 ctf_from_truth, render_projections, render_signal, simulate_dataset)

SMALL = dict(n_classes=4, n_particles=240, box_size=32, pixel_size=6.0, snr=0.05, particles_per_stack=100)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_dataset(SimulationConfig(**SMALL, seed=3), tmp_path_factory.mktemp("sim"))


def _stack_images(star_dir: Path, names: pd.Series) -> np.ndarray:
    stacks: dict[str, np.ndarray] = {}
    images = []
    for name in names:
        index, path = name.split("@")
        if path not in stacks:
            stacks[path] = mrcfile.read(star_dir / path)
        images.append(stacks[path][int(index) - 1])
    return np.stack(images)


def test_star_file_is_relion31_with_all_columns(sim):
    blocks = starfile.read(sim.star_path, always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics.loc[0, "rlnImageSize"] == 32 and optics.loc[0, "rlnImagePixelSize"] == 6.0
    for column in ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
                   "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImageDimensionality"]:
        assert column in optics
    expected = ["rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU",
                "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift",
                "rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst"]
    assert list(particles.columns) == expected
    assert len(particles) == 240
    assert particles["rlnImageName"].iloc[0] == "000001@Particles/stack_001.mrcs"
    assert (particles[["rlnOriginXAngst", "rlnOriginYAngst"]] == 0).all().all()
    assert sim.star_path.read_text().count("# version 30001") == 2


def test_stacks_shape_voxel_size_and_split(sim):
    shapes = []
    for path in sim.stack_paths:
        with mrcfile.open(path, permissive=False) as mrc:
            shapes.append(mrc.data.shape)
            assert mrc.data.dtype == np.float32
            assert float(mrc.voxel_size.x) == pytest.approx(6.0)
    assert shapes == [(100, 32, 32), (100, 32, 32), (40, 32, 32)]
    assert mrcfile.read(sim.templates_path).shape == (4, 32, 32)


def test_truth_matches_star_and_labels(sim):
    truth = pd.read_csv(sim.truth_path)
    particles = starfile.read(sim.star_path)["particles"]
    assert list(truth["image_name"]) == list(particles["rlnImageName"])
    np.testing.assert_allclose(truth["defocus_u"], particles["rlnDefocusU"], atol=1e-5)
    np.testing.assert_allclose(truth["defocus_angle"], particles["rlnDefocusAngle"], atol=1e-5)
    np.testing.assert_array_equal(truth["class"], sim.labels)
    assert (truth["defocus_u"] >= truth["defocus_v"]).all()
    assert (np.hypot(truth["shift_x_px"], truth["shift_y_px"]) <= 4.0 + 1e-6).all()
    assert np.bincount(truth["class"])[1:].tolist() == [60, 60, 60, 60]
    # shuffled: the classes are interleaved, not in blocks
    assert (np.diff(truth["class"]) != 0).mean() > 0.5


def test_class_sizes_follow_imbalance():
    sizes = class_sizes(1000, 5, 4.0)
    assert sizes.sum() == 1000
    assert sizes[0] / sizes[-1] == pytest.approx(4.0, rel=0.05)
    assert np.all(np.diff(sizes) < 0)
    assert class_sizes(1000, 4, 1.0).tolist() == [250] * 4


def test_same_seed_same_images_different_seed_different(tmp_path):
    cfg = dict(SMALL, n_particles=40, particles_per_stack=40)
    a = simulate_dataset(SimulationConfig(**cfg, seed=1), tmp_path / "a")
    b = simulate_dataset(SimulationConfig(**cfg, seed=1), tmp_path / "b")
    c = simulate_dataset(SimulationConfig(**cfg, seed=2), tmp_path / "c")
    images_a, images_b, images_c = (mrcfile.read(s.stack_paths[0]) for s in (a, b, c))
    np.testing.assert_array_equal(images_a, images_b)
    assert pd.read_csv(a.truth_path).equals(pd.read_csv(b.truth_path))
    assert np.abs(images_a - images_c).mean() > 0.5
    assert not np.allclose(mrcfile.read(a.templates_path), mrcfile.read(c.templates_path))


def test_measured_snr_and_truth_reproduce_the_images(sim):
    """Re-render the clean signal from truth.csv alone and regress each stored image on it."""
    cfg = sim.config
    truth = pd.read_csv(sim.truth_path).iloc[:60]
    clean = render_signal(build_scene(cfg), cfg, truth["class"].to_numpy() - 1, truth["psi_deg"].to_numpy(),
                          truth[["shift_x_px", "shift_y_px"]].to_numpy(), ctf_from_truth(truth, cfg))
    noisy = _stack_images(sim.out_dir, truth["image_name"])
    snrs = []
    for s, y in zip(clean.reshape(60, -1), noisy.reshape(60, -1)):
        design = np.stack([s, np.ones_like(s)], axis=1)
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        slope, residual = coef[0], y - design @ coef
        assert slope > 0                      # same contrast, not inverted
        snrs.append(slope ** 2 * s.var() / residual.var())
    assert np.mean(snrs) == pytest.approx(0.05, rel=0.08)


def test_background_normalised_and_particles_bright(sim):
    images = mrcfile.read(sim.stack_paths[0])
    mask = background_mask(32, sim.config.diameter / 2 / sim.config.pixel_size)
    np.testing.assert_allclose(images[:, mask].mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(images[:, mask].std(axis=1), 1.0, atol=1e-4)
    # particles bright on a dark background: the central region is above the background on average
    assert images[:, ~mask].mean() > 0.05


def test_render_follows_documented_geometry():
    """Template point (x, y) -> (x cos psi - y sin psi + sx, x sin psi + y cos psi + sy); x = column."""
    scene = build_scene(SimulationConfig(**SMALL, seed=5))
    template = render_projections(scene, np.array([1]), np.zeros(1), np.zeros((1, 2)), 48)[0]
    psi, sx, sy = 70.0, 3.0, -2.0
    moved = render_projections(scene, np.array([1]), np.array([psi]), np.array([[sx, sy]]), 48)[0]
    c = np.deg2rad(psi)
    rows, cols = np.mgrid[0:48, 0:48].astype(float) - 24
    x, y = cols - sx, rows - sy                     # undo the shift, then rotate by -psi
    x0, y0 = np.cos(c) * x + np.sin(c) * y, -np.sin(c) * x + np.cos(c) * y
    expected = map_coordinates(template, [y0 + 24, x0 + 24], order=3)
    assert np.corrcoef(moved.ravel(), expected.ravel())[0, 1] > 0.995
    wrong_way = map_coordinates(template, [np.sin(c) * x + np.cos(c) * y + 24,      # rotated by -psi
                                           np.cos(c) * x - np.sin(c) * y + 24], order=3)
    assert np.corrcoef(moved.ravel(), wrong_way.ravel())[0, 1] < 0.97


def test_templates_of_different_classes_differ_under_rotation(sim):
    templates = mrcfile.read(sim.templates_path).astype(np.float64)
    for i in range(len(templates)):
        for j in range(i + 1, len(templates)):
            best = max(np.corrcoef(templates[i].ravel(),
                                   rotate(templates[j], angle, reshape=False, order=1).ravel())[0, 1]
                       for angle in range(0, 360, 4))
            assert best < 0.99, (i, j, best)


def test_shapes_make_distinct_structures():
    scene = build_scene(SimulationConfig(n_classes=4, n_shapes=2, n_particles=8, box_size=32, pixel_size=6.0))
    # classes 0, 1 are shape 1 and 2, 3 shape 2: different atoms, same size
    assert list(scene.class_shape) == [0, 0, 1, 1]
    assert not np.allclose(scene.shape_weights[0], scene.shape_weights[1])
    # both fit the particle radius (0.6 x 32 px / 2 = 9.6 px) and fill a good part of it
    radius = [np.linalg.norm(scene.shape_coords[s], axis=-1).max() for s in range(2)]
    assert all(4.0 < r < 9.6 for r in radius)


def test_relion30_mode_writes_one_block_with_per_row_optics(tmp_path):
    sim = simulate_dataset(SimulationConfig(**dict(SMALL, n_particles=20), relion30=True), tmp_path)
    blocks = starfile.read(sim.star_path, always_dict=True)
    assert len(blocks) == 1
    (table,) = blocks.values()
    assert len(table) == 20
    for column in ["rlnOriginX", "rlnOriginY", "rlnVoltage", "rlnSphericalAberration",
                   "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize"]:
        assert column in table
    assert "rlnOriginXAngst" not in table and "rlnOpticsGroup" not in table
    assert (table["rlnDetectorPixelSize"] * 1e4 / table["rlnMagnification"]).eq(6.0).all()
    assert "# version" not in sim.star_path.read_text()


@pytest.mark.parametrize("field, value", [("n_classes", 0), ("snr", 0.0), ("box_size", 33),
                                          ("n_shapes", 3), ("particle_diameter", 1000.0),
                                          ("defocus_range", (20000.0, 10000.0))])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"simulation.{field}"):
        SimulationConfig(**{field: value})


STRUCTURES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "structures"
needs_structures = pytest.mark.skipif(not (STRUCTURES / "1hvr.pdb").exists(), reason="no ../shared structures")


@needs_structures
def test_atomic_model_reads_pdb_and_mmcif_assemblies():
    small = read_atomic_model(STRUCTURES / "1hvr.pdb")
    large = read_atomic_model(STRUCTURES / "3KPR.cif.gz")
    # the protease dimer (2 x 99 residues) and one TCR-HLA complex of the two in the asymmetric unit
    assert 1400 < len(small.weights) < 1600 and 6000 < len(large.weights) < 7500
    assert set(np.unique(small.weights)) <= {6.0, 7.0, 8.0, 16.0}
    np.testing.assert_allclose(np.average(large.coords, axis=0, weights=large.weights), 0.0, atol=1e-6)
    assert 55 < small.diameter < 70 and 130 < large.diameter < 160


@needs_structures
def test_pdb_mode_projects_the_model_with_jitter(tmp_path):
    cfg = SimulationConfig(n_classes=4, n_particles=40, box_size=32, pixel_size=0.0, snr=100.0,
                           pdb_files=(str(STRUCTURES / "1hvr.pdb"),), seed=3)
    assert cfg.n_shapes == 1 and cfg.view_jitter_deg == 2.0
    assert 0.55 < read_atomic_model(STRUCTURES / "1hvr.pdb").diameter / (32 * cfg.pixel_size) < 0.7
    sim = simulate_dataset(cfg, tmp_path)
    images = mrcfile.read(sim.stack_paths[0])
    templates = mrcfile.read(sim.templates_path)
    assert images.shape == (40, 32, 32) and np.isfinite(images).all()
    # views of one real protein differ, but far less than random images do
    corr = np.corrcoef(templates.reshape(4, -1))
    assert 0.2 < corr[np.triu_indices(4, 1)].mean() < 0.99


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(InputFileError, match="atomic model not found"):
        SimulationConfig(pdb_files=(str(tmp_path / "nope.pdb"),))


@pytest.mark.slow
def test_simulate_runs_under_python_OO(tmp_path):
    """``-OO`` strips docstrings: the conventions text written beside truth.csv must not come from one."""
    import os
    import subprocess
    import sys

    from cryo_drvae.simulate import GEOMETRY_CONVENTIONS

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-OO", "-m", "cryo_drvae", "simulate"]
    shown = subprocess.run(command + ["--help"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--snr" in shown.stdout, shown.stderr
    done = subprocess.run(command + ["--o", str(tmp_path / "sim"), "--K", "2", "--n", "6", "--box", "32"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "sim" / "truth_conventions.txt").read_text()
    assert written == GEOMETRY_CONVENTIONS and written.startswith("Geometry conventions")
    assert "rlnOriginX = -shift_x_px" in written
