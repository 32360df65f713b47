"""Junk picks in the simulator (``simulate --junk``) and a classification of a junk set."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from click.testing import CliRunner

from cryo_drvae.cli import main
from cryo_drvae.ctf import ctf_images
from cryo_drvae.errors import ConfigError
from cryo_drvae.fourier import shell_index
from cryo_drvae.junk import JUNK_KINDS, PARTICLE_KIND
from cryo_drvae.normalise import background_mask
from cryo_drvae.simulate import SimulationConfig, ctf_from_truth, simulate_dataset

BASE = dict(n_classes=4, n_particles=400, box_size=40, pixel_size=4.5, snr=0.1, particles_per_stack=400)


def _images(sim) -> np.ndarray:
    return np.concatenate([mrcfile.read(p) for p in sim.stack_paths])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same seed simulated with and without junk."""
    clean = simulate_dataset(SimulationConfig(**BASE, seed=4), tmp_path_factory.mktemp("clean"))
    junk = simulate_dataset(SimulationConfig(**BASE, seed=4, junk_fraction=0.4), tmp_path_factory.mktemp("junk"))
    return clean, junk


def test_truth_marks_the_junk_with_class_0_and_its_kind(pair):
    clean, junk = pair
    truth, before = pd.read_csv(junk.truth_path), pd.read_csv(clean.truth_path)
    is_junk = truth["kind"] != PARTICLE_KIND
    assert set(truth.loc[is_junk, "kind"]) == set(JUNK_KINDS)                 # every kind present
    assert (truth.loc[is_junk, ["class", "shape", "view"]] == 0).all().all()
    assert (truth.loc[~is_junk, "class"] >= 1).all()
    np.testing.assert_array_equal(junk.labels, truth["class"].to_numpy())
    # the same share of every class became junk, the real rows keep their class
    for label, size in before["class"].value_counts().items():
        assert (truth["class"] == label).sum() == size - round(0.4 * size)
    np.testing.assert_array_equal(truth.loc[~is_junk, "class"], before.loc[~is_junk, "class"])
    assert len(starfile.read(junk.star_path)["particles"]) == BASE["n_particles"]


def test_real_particles_are_untouched_and_junk_is_normalised(pair):
    clean, junk = pair
    truth = pd.read_csv(junk.truth_path)
    is_junk = (truth["kind"] != PARTICLE_KIND).to_numpy()
    with_junk, without = _images(junk), _images(clean)
    np.testing.assert_array_equal(with_junk[~is_junk], without[~is_junk])
    assert not np.allclose(with_junk[is_junk], without[is_junk])
    background = with_junk[is_junk][:, background_mask(40, 0.3 * 40)]
    np.testing.assert_allclose(background.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(background.std(axis=1), 1.0, rtol=1e-3)


@pytest.mark.slow
def test_same_seed_same_junk_other_seed_other_mix(tmp_path):
    a = simulate_dataset(SimulationConfig(**BASE, seed=4, junk_fraction=0.4), tmp_path / "a")
    b = simulate_dataset(SimulationConfig(**BASE, seed=5, junk_fraction=0.4), tmp_path / "b")
    again = simulate_dataset(SimulationConfig(**BASE, seed=4, junk_fraction=0.4), tmp_path / "c")
    np.testing.assert_array_equal(_images(a), _images(again))
    mix_a = pd.read_csv(a.truth_path)["kind"].value_counts()
    mix_b = pd.read_csv(b.truth_path)["kind"].value_counts()
    assert not mix_a.equals(mix_b)


@pytest.mark.slow
def test_compact_junk_carries_the_ctf(tmp_path):
    sim = simulate_dataset(SimulationConfig(**{**BASE, "snr": 1e6}, seed=6, junk_fraction=0.5), tmp_path)
    truth = pd.read_csv(sim.truth_path)
    images = _images(sim).astype(np.float64)
    box, apix = 40, 4.5
    ctf2 = ctf_images(ctf_from_truth(truth, sim.config), box, apix, rfft=True) ** 2
    power = np.abs(np.fft.rfft2(images)) ** 2
    shells = shell_index(box)
    # within a Fourier shell, power where the CTF is ~0 is far below power where it is near +-1
    # (carbon crosses the box edge, whose cut leaks power everywhere: judged on compact junk)
    strong = truth["kind"].isin(["aggregate", "broken"]).to_numpy()
    ratios = []
    for i in np.flatnonzero(strong):
        per_shell = []
        for shell in range(4, box // 2):
            ring = shells == shell
            low, high = ring & (ctf2[i] < 0.05), ring & (ctf2[i] > 0.6)
            if low.sum() >= 3 and high.sum() >= 3:
                per_shell.append(power[i][low].mean() / power[i][high].mean())
        ratios.append(np.median(per_shell))
    assert np.nanmedian(ratios) < 0.3, ratios


def test_empty_picks_are_noise_at_the_particles_level(pair):
    _, junk = pair
    truth = pd.read_csv(junk.truth_path)
    images = _images(junk).astype(np.float64)
    inside = ~background_mask(40, 0.3 * 40)
    def ratio(rows):
        return images[rows][:, inside].var(axis=1) / images[rows][:, ~inside].var(axis=1)
    empty, real = ratio((truth["kind"] == "empty").to_numpy()), ratio((truth["kind"] == PARTICLE_KIND).to_numpy())
    assert np.all(np.abs(empty - 1) < 0.3), empty          # no signal: inside looks like outside
    assert np.median(real) > np.median(empty) + 0.05       # a particle adds power inside


@pytest.mark.parametrize("fraction", [-0.1, 0.95])
def test_bad_junk_fraction_names_the_field(fraction):
    with pytest.raises(ConfigError, match="junk_fraction"):
        SimulationConfig(**BASE, junk_fraction=fraction)


def test_cli_junk_flag(tmp_path):
    res = CliRunner().invoke(main, ["simulate", "--o", str(tmp_path / "s"), "--K", "2", "--n", "60", "--box", "32",
                                    "--angpix", "6", "--junk", "0.5"])
    assert res.exit_code == 0, res.output
    truth = pd.read_csv(tmp_path / "s" / "truth.csv")
    assert (truth["class"] == 0).sum() == 30 and set(truth["kind"]) - {PARTICLE_KIND} <= set(JUNK_KINDS)


@pytest.mark.slow
def test_junk_set_with_twice_the_views_classifies_without_crashing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sim = simulate_dataset(SimulationConfig(n_classes=5, n_particles=800, box_size=48, pixel_size=4.0, snr=0.03,
                                            junk_fraction=0.35, seed=5), "sim")
    res = CliRunner().invoke(main, ["classify", "--i", str(sim.star_path), "--o", "Class2D/run", "--K", "10",
                                    "--j", "1", "--iter", "3"])
    assert res.exit_code == 0, res.output
    classes = starfile.read("Class2D/run_model.star")["model_classes"]
    assert len(classes) == 10
    scores = classes["rlnClassScore"].to_numpy()
    assert np.all((scores >= 0) & (scores <= 1))
