"""Class score and ``cryo-drvae select`` on classes built from the simulator's truth (no classifier).

Each real view and each junk kind becomes one class; its average is made by the production
averaging code from the members at their true poses, so the test does not depend on how well
the classifier groups junk. A mixed-junk class and an empty class are added.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import starfile
from click.testing import CliRunner

from cryo_drvae.alignment import to_relion_pose
from cryo_drvae.averaging import class_averages
from cryo_drvae.cli import main
from cryo_drvae.ctf import params_from_particles
from cryo_drvae.junk import JUNK_KINDS
from cryo_drvae.outputs import ClassificationResult, write_run_outputs
from cryo_drvae.scoring import class_scores
from cryo_drvae.selection import DEFAULT_MIN_SCORE, SelectionConfig, load_selection
from cryo_drvae.simulate import SimulationConfig, simulate_dataset
from cryo_drvae.stack import ParticleStack
from cryo_drvae.star_io import read_particles

N_VIEWS = 4
HAS_RELION = shutil.which("relion_star_handler") is not None


def truth_classes(truth: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """0-based labels: views 0..V-1, one class per junk kind, then a mixed-junk class, then an empty one."""
    labels = truth["class"].to_numpy() - 1
    names = [f"view {v + 1}" for v in range(N_VIEWS)]
    junk_rows = np.flatnonzero(truth["kind"].to_numpy() != "particle")
    for i, kind in enumerate(JUNK_KINDS):
        labels[truth["kind"].to_numpy() == kind] = N_VIEWS + i
        names.append(kind)
    mixed = junk_rows[::4]                     # every 4th junk pick, whatever its kind
    labels[mixed] = N_VIEWS + len(JUNK_KINDS)
    names += ["mixed junk", "empty class"]
    return labels, names


def build_run(project, seed: int, random_junk_poses: bool) -> tuple[ClassificationResult, list[str], str]:
    """Simulate a junk set in ``project`` and write a classification made from its truth."""
    sim = simulate_dataset(SimulationConfig(n_classes=N_VIEWS, n_particles=520, snr=0.05, box_size=40,
                                            pixel_size=4.5, junk_fraction=0.4, particles_per_stack=600,
                                            seed=seed), project / "sim")
    truth = pd.read_csv(sim.truth_path)
    labels, names = truth_classes(truth)
    k = len(names)
    table = read_particles(sim.star_path)
    psi = -truth["psi_deg"].to_numpy()                 # the simulator's psi is the inverse of ours
    shift = truth[["shift_x_px", "shift_y_px"]].to_numpy()
    if random_junk_poses:                              # junk aligned anyhow, as a classifier might
        rng = np.random.default_rng(seed)
        junk = truth["kind"].to_numpy() != "particle"
        psi[junk] = rng.uniform(0, 360, junk.sum())
        shift[junk] = rng.uniform(-3, 3, (junk.sum(), 2))
    with ParticleStack.from_table(table) as stack:
        averages, resolution = class_averages(stack, params_from_particles(table.per_particle()), 4.5,
                                              labels, psi, shift, k, noise_var=1.0)
    relion_psi, origin = to_relion_pose(psi, shift)
    result = ClassificationResult(labels, relion_psi, origin, np.full(len(labels), 0.8), averages,
                                  resolution, 4.5)
    prefix = "Class2D/run"                             # project-relative, as RELION writes it
    with contextlib.chdir(project):
        write_run_outputs(prefix, table, result)
    return result, names, prefix


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for seed, random_poses in ((11, False), (12, True)):
        project = tmp_path_factory.mktemp(f"select{seed}")
        out[seed] = (project, *build_run(project, seed, random_poses))
    return out


@pytest.mark.parametrize("seed", [11, 12])
def test_every_junk_class_scores_below_every_real_view(runs, seed):
    _, result, names, _ = runs[seed]
    scores = class_scores(result)
    real, junk = scores[:N_VIEWS], scores[N_VIEWS:-1]
    table = dict(zip(names, np.round(scores, 3)))
    assert junk.max() < real.min(), table
    assert scores[-1] == 0.0                           # the empty class
    assert np.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize("seed", [11, 12])
def test_class_averages_stay_bounded(runs, seed):
    """Corners beyond Nyquist were divided by a rotated CTF^2 of ~0 and blew some averages to 1e9."""
    result = runs[seed][1]
    assert np.abs(result.class_averages).max() < 100


def test_model_star_carries_the_scores(runs):
    _, result, _, prefix = runs[11]
    project = runs[11][0]
    classes = starfile.read(project / f"{prefix}_model.star")["model_classes"]
    np.testing.assert_allclose(classes["rlnClassScore"].to_numpy(), class_scores(result), atol=1e-12)


def _kept_images(project, prefix, out_dir, *args):
    """``select`` on whole classes (``--min_fom 0``: the per-particle screening is test_screening's)."""
    with contextlib.chdir(project):               # RELION paths are project-relative
        res = CliRunner().invoke(main, ["select", "--i", prefix, "--o", out_dir, "--min_fom", "0", *args])
    assert res.exit_code == 0, res.output
    return starfile.read(project / out_dir / "particles.star", always_dict=True)


def test_select_keeps_exactly_the_particles_of_the_kept_classes(runs):
    project, result, names, prefix = runs[11]
    data = starfile.read(project / f"{prefix}_data.star", always_dict=True)
    scores = class_scores(result)
    blocks = _kept_images(project, prefix, "Select/job012/")
    kept_classes = np.flatnonzero((scores >= DEFAULT_MIN_SCORE) & (result.class_counts() > 0)) + 1
    assert set(range(1, N_VIEWS + 1)) <= set(kept_classes)             # every real view kept
    expected = data["particles"][data["particles"]["rlnClassNumber"].isin(kept_classes)].reset_index(drop=True)
    got = blocks["particles"]
    assert list(got.columns) == list(data["particles"].columns)          # every column kept
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    pd.testing.assert_frame_equal(blocks["optics"], data["optics"], check_dtype=False)
    rank = starfile.read(project / "Select/job012/rank_model.star")["model_classes"]
    assert len(rank) == len(names)
    np.testing.assert_allclose(rank["rlnClassScore"], scores, atol=1e-12)
    assert list(np.flatnonzero(rank["rlnSelected"].to_numpy() == 1) + 1) == list(kept_classes)
    averages = starfile.read(project / "Select/job012/class_averages.star")
    assert sorted(int(n.split("@")[0]) for n in averages["rlnReferenceImage"]) == list(kept_classes)
    assert np.all(np.diff(averages["rlnClassScore"].to_numpy()) <= 0)   # best first
    assert (project / "Select/job012/rank_classes.png").stat().st_size > 1000


def test_select_classes_list_and_resolution(runs):
    project, result, _, prefix = runs[11]
    blocks = _kept_images(project, prefix, "Select/job013/", "--classes", "2,3")
    assert set(blocks["particles"]["rlnClassNumber"]) == {2, 3}
    assert len(blocks["particles"]) == int(result.class_counts()[[1, 2]].sum())
    limit = float(np.sort(result.class_resolution[:N_VIEWS])[1])
    with contextlib.chdir(project):
        selection = load_selection(SelectionConfig(prefix, "unused", min_score=0.0, min_resolution=limit, min_fom=0.0))
    expected = (result.class_resolution <= limit) & (result.class_counts() > 0)
    assert list(selection.kept) == list(expected)


def test_a_model_without_scores_is_scored_from_its_averages(runs):
    """E.g. RELION's own Class2D output: select scores the classes itself, as classify would."""
    project, result, _, prefix = runs[11]
    model = starfile.read(project / f"{prefix}_model.star", always_dict=True)
    model["model_classes"] = model["model_classes"].drop(columns=["rlnClassScore"])
    (project / "Bare").mkdir(exist_ok=True)
    starfile.write(model, project / "Bare/run_model.star", overwrite=True)
    shutil.copy(project / f"{prefix}_data.star", project / "Bare/run_data.star")
    with contextlib.chdir(project):
        selection = load_selection(SelectionConfig("Bare/run", "unused", min_fom=0.0))
    np.testing.assert_allclose(selection.classes["rlnClassScore"], class_scores(result), atol=1e-6)


def test_select_bad_input_is_one_clear_line_and_writes_nothing(runs, tmp_path):
    project, _, _, prefix = runs[11]
    runner = CliRunner()
    res = runner.invoke(main, ["select", "--i", str(tmp_path / "nothing/run"), "--o", str(tmp_path / "Sel")])
    assert res.exit_code == 1
    assert "nothing/run_model.star: model STAR file not found" in res.output
    assert not (tmp_path / "Sel").exists()
    with contextlib.chdir(project):
        res = runner.invoke(main, ["select", "--i", prefix, "--o", str(tmp_path / "Sel"), "--classes", "99"])
    assert res.exit_code == 1 and "has only" in res.output
    assert not (tmp_path / "Sel").exists()


@pytest.mark.relion
@pytest.mark.skipif(not HAS_RELION, reason="RELION 3.1.3 not installed")
def test_relion_star_handler_reads_the_selected_particles(runs):
    project, result, _, prefix = runs[11]
    blocks = _kept_images(project, prefix, "Select/job014/", "--classes", "1,3,4")
    n_kept = len(blocks["particles"])
    proc = subprocess.run(["relion_star_handler", "--i", "Select/job014/particles.star", "--o", "Select/job014/copy.star",
                           "--select", "rlnClassNumber", "--minval", "3", "--maxval", "4"],
                          cwd=project, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    copy = starfile.read(project / "Select/job014/copy.star", always_dict=True)
    assert set(copy["particles"]["rlnClassNumber"]) == {3, 4}
    assert len(copy["particles"]) == int(result.class_counts()[[2, 3]].sum()) < n_kept
    assert list(copy["optics"].columns) == list(blocks["optics"].columns)


MICROGRAPHS_STAR = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
opticsGroup1 1 4.5 300 2.7 0.1

# version 30001

data_micrographs

loop_
_rlnMicrographName #1
_rlnOpticsGroup #2
Micrographs/mic1.mrc 1
"""


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_autopick") is None, reason="RELION 3.1.3 not installed")
def test_relion_autopick_takes_the_kept_class_averages_as_references(runs):
    """relion_autopick reads class_averages.star (rlnReferenceImage): one figure-of-merit map per kept class."""
    import mrcfile
    project, _, _, prefix = runs[11]
    _kept_images(project, prefix, "Select/job015/", "--classes", "1,3,4")
    (project / "Micrographs").mkdir(exist_ok=True)
    with mrcfile.new(project / "Micrographs/mic1.mrc", overwrite=True) as mrc:
        mrc.set_data(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
        mrc.voxel_size = 4.5
    (project / "mics.star").write_text(MICROGRAPHS_STAR)
    (project / "AutoPick/job016").mkdir(parents=True)
    proc = subprocess.run(["relion_autopick", "--i", "mics.star", "--odir", "AutoPick/job016/", "--pickname", "autopick",
                           "--ref", "Select/job015/class_averages.star", "--angpix_ref", "4.5", "--particle_diameter",
                           "120", "--threshold", "0", "--min_distance", "100", "--lowpass", "20", "--shrink", "0",
                           "--skip_optimise_scale", "--write_fom_maps"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    # (this RELION build aborts afterwards while drawing logfile.pdf; the maps are written before that)
    assert "Initialising FFTs for the references" in proc.stdout, proc.stdout + proc.stderr
    maps = sorted((project / "AutoPick/job016/Micrographs").glob("mic1_autopick_ref*_bestCCF.spi"))
    assert len(maps) == 3, proc.stdout + proc.stderr


def test_the_score_mask_defaults_to_the_classify_diameter():
    """One default particle diameter (config.DIAMETER_FRACTION of the box) for classify, the
    External job's rlnParticleDiameter and the class score's mask."""
    from cryo_drvae.config import DIAMETER_FRACTION
    from cryo_drvae.scoring import class_features
    box = 40
    y, x = np.mgrid[:box, :box] - box // 2
    averages = np.stack([np.exp(-(x ** 2 + y ** 2) / (2 * s ** 2)) for s in (4.0, 6.0, 8.0)])
    args = (averages, np.array([10, 10, 10]), np.array([20.0, 20.0, 20.0]), 3.0, np.full(3, 0.9))
    default = class_features(*args)
    pd.testing.assert_frame_equal(default, class_features(*args, diameter_px=DIAMETER_FRACTION * box))
    assert not default.equals(class_features(*args, diameter_px=0.75 * box))
