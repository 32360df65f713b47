"""Per-particle screening (``screening.py``) on a junk set whose classes come from the truth.

Real views are classes; aggregates and broken picks join the class of the view they carry
(``source_view``), at the pose of that particle, as a classifier puts them; the other junk is one
class. Averages come from the production averaging code, so they hold the junk too.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import starfile
from click.testing import CliRunner

from cryo_drvae.alignment import to_relion_pose
from cryo_drvae.averaging import class_averages
from cryo_drvae.cli import main
from cryo_drvae.ctf import params_from_particles
from cryo_drvae.outputs import ClassificationResult, write_run_outputs
from cryo_drvae.screening import (DEFAULT_MIN_FOM, figure_of_merit, measure_fit, robust_z,
                                  trimmed_centre_scale, worst_half_z)
from cryo_drvae.simulate import SimulationConfig, simulate_dataset
from cryo_drvae.stack import ParticleStack
from cryo_drvae.star_io import read_particles

N_VIEWS, PIXEL = 4, 4.5


@pytest.fixture(scope="module")
def junk_run(tmp_path_factory):
    project = tmp_path_factory.mktemp("screen")
    cfg = SimulationConfig(n_classes=N_VIEWS, n_particles=720, snr=0.05, box_size=40, pixel_size=PIXEL,
                           junk_fraction=0.4, seed=23)
    sim = simulate_dataset(cfg, project / "sim", project_dir=project)   # names relative to the project
    truth = pd.read_csv(sim.truth_path)
    kind = truth["kind"].to_numpy()
    carried = np.isin(kind, ["aggregate", "broken"])
    labels = np.where(kind == "particle", truth["class"] - 1, N_VIEWS)
    labels[carried] = truth["source_view"].to_numpy()[carried] - 1
    psi = -truth["psi_deg"].to_numpy()                 # the simulator's psi is the inverse of ours
    shift = truth[["shift_x_px", "shift_y_px"]].to_numpy()
    with contextlib.chdir(project):
        table = read_particles(sim.star_path)
    ctf = params_from_particles(table.per_particle())
    with contextlib.chdir(project), ParticleStack.from_table(table) as stack:
        averages, resolution = class_averages(stack, ctf, PIXEL, labels, psi, shift, N_VIEWS + 1, noise_var=1.0)
        fit = measure_fit(stack, ctf, PIXEL, labels, psi, shift, averages, 1.0, radius_px=0.3 * 40)
    return project, sim, table, truth, labels, psi, shift, averages, resolution, fit


def test_good_members_fit_and_aggregates_and_broken_particles_do_not(junk_run):
    *_, truth, labels, _, _, _, _, fit = junk_run
    kind = truth["kind"].to_numpy()
    fom = figure_of_merit(fit, labels, N_VIEWS + 1)
    assert np.all((fom >= 0) & (fom <= 1))
    assert (fom[kind == "particle"] >= DEFAULT_MIN_FOM).mean() >= 0.97
    for carried in ("aggregate", "broken"):
        assert (fom[kind == carried] < DEFAULT_MIN_FOM).mean() >= 0.5, carried


def test_each_statistic_catches_its_own_kind_of_junk(junk_run):
    """Broken picks lack part of the view (low amplitude, lower still on the half they lack);
    aggregates add a neighbour (excess power)."""
    *_, truth, labels, _, _, _, _, fit = junk_run
    kind = truth["kind"].to_numpy()
    z_amplitude = robust_z(fit.amplitude, labels, N_VIEWS + 1)
    z_excess = robust_z(fit.excess, labels, N_VIEWS + 1)
    good = kind == "particle"
    assert abs(np.median(z_amplitude[good])) < 0.3 and abs(np.median(z_excess[good])) < 0.3
    assert np.median(z_amplitude[kind == "broken"]) < -2.0
    z_half = worst_half_z(fit, labels, N_VIEWS + 1)
    assert abs(np.median(z_half[good])) < 0.3
    assert np.median(z_half[kind == "broken"]) < np.median(z_amplitude[kind == "broken"]) - 1.0
    assert np.median(z_excess[kind == "aggregate"]) > 2.5
    assert np.median(z_excess[kind == "broken"]) < np.median(z_excess[kind == "aggregate"])


def test_trimmed_estimate_ignores_a_one_sided_minority():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(5.0, 2.0, 800), rng.normal(-3.0, 1.0, 200)])
    centre, scale = trimmed_centre_scale(values)
    assert abs(centre - 5.0) < 0.2 and abs(scale - 2.0) < 0.2
    median, mad = np.median(values), 1.4826 * np.median(np.abs(values - np.median(values)))
    assert abs(median - 5.0) > 0.3 or abs(mad - 2.0) > 0.3    # the plain estimate is pulled


def _selected(project, *args) -> pd.DataFrame:
    with contextlib.chdir(project):
        res = CliRunner().invoke(main, ["select", "--i", "Class2D/run", "--o", "Select/out/", "--classes",
                                        ",".join(str(v + 1) for v in range(N_VIEWS)), *args])
    assert res.exit_code == 0, res.output
    return starfile.read(project / "Select/out/particles.star", always_dict=True)["particles"]


def test_select_drops_members_that_fit_their_class_poorly(junk_run):
    project, sim, table, truth, labels, psi, shift, averages, resolution, fit = junk_run
    fom = figure_of_merit(fit, labels, N_VIEWS + 1)
    relion_psi, origin = to_relion_pose(psi, shift)
    result = ClassificationResult(labels, relion_psi, origin, np.full(len(labels), 0.9), averages, resolution,
                                  PIXEL, figure_of_merit=fom)
    with contextlib.chdir(project):
        write_run_outputs("Class2D/run", table, result)
    names = truth["image_name"].to_numpy()
    in_views = labels < N_VIEWS
    kept = _selected(project)
    assert set(kept["rlnImageName"]) == set(names[in_views & (fom >= DEFAULT_MIN_FOM)])
    assert kept["rlnParticleFigureOfMerit"].min() >= DEFAULT_MIN_FOM
    whole = _selected(project, "--min_fom", "0")
    assert set(whole["rlnImageName"]) == set(names[in_views])
    good = truth.set_index("image_name").loc[kept["rlnImageName"], "kind"] == "particle"
    good_whole = truth.set_index("image_name").loc[whole["rlnImageName"], "kind"] == "particle"
    assert good.mean() > good_whole.mean() + 0.03           # precision rises


def test_select_measures_the_fit_when_the_classification_wrote_none(junk_run):
    """E.g. RELION's Class2D output: select measures each particle's fit itself, as classify does."""
    project, sim, table, truth, labels, psi, shift, averages, resolution, fit = junk_run
    _write_without_fom(junk_run)
    with contextlib.chdir(project):
        res = CliRunner().invoke(main, ["select", "--i", "Bare/run", "--o", "Select/bare/", "--classes",
                                        ",".join(str(v + 1) for v in range(N_VIEWS))])
    assert res.exit_code == 0, res.output
    kept = starfile.read(project / "Select/bare/particles.star", always_dict=True)["particles"]
    names = truth["image_name"].to_numpy()
    fom = figure_of_merit(fit, labels, N_VIEWS + 1)
    expected = set(names[(labels < N_VIEWS) & (fom >= DEFAULT_MIN_FOM)])
    assert len(set(kept["rlnImageName"]) ^ expected) <= 0.03 * len(expected)
    assert len(kept) < (labels < N_VIEWS).sum()


def _write_without_fom(junk_run) -> None:
    """The truth classification as ``Bare/run``, without rlnParticleFigureOfMerit."""
    project, sim, table, truth, labels, psi, shift, averages, resolution, fit = junk_run
    relion_psi, origin = to_relion_pose(psi, shift)
    result = ClassificationResult(labels, relion_psi, origin, np.full(len(labels), 0.9), averages, resolution, PIXEL)
    with contextlib.chdir(project):
        write_run_outputs("Bare/run", table, result)


def test_select_without_the_images_says_how_to_fix_it(junk_run, tmp_path):
    project = junk_run[0]
    _write_without_fom(junk_run)
    with contextlib.chdir(project):
        res = CliRunner().invoke(main, ["select", "--i", str(project / "Bare/run"), "--o", "Select/bare2/"])
    assert res.exit_code == 0, res.output                 # from the project folder: fine
    with contextlib.chdir(tmp_path):
        res = CliRunner().invoke(main, ["select", "--i", str(project / "Bare/run"), "--o", "Select/bare3/"])
    assert res.exit_code == 1 and "--min_fom 0" in res.output and "--data_dir" not in res.output
    assert not (tmp_path / "Select/bare3").exists()


def test_averages_are_remade_from_the_members_that_fit():
    from cryo_drvae.pipeline import MIN_FITTING_MEMBERS, fitting_members
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    fom = np.array([0.5, 0.0, 1.0, 0.2, 0.001, 0.9, 0.0, 0.0])
    rows = np.arange(8)
    chosen = fitting_members(labels, fom, rows, 3)
    assert MIN_FITTING_MEMBERS == 3
    # class 0 keeps its 3 fitting members; classes 1 and 2 have fewer than 3 that fit, so keep all
    assert list(chosen) == [0, 2, 3, 4, 5, 6, 7]
    assert list(fitting_members(labels, fom, rows[:4], 3)) == [0, 2, 3]
