"""Shared fixtures: small simulated particle sets with known classes (seeded, in tmp dirs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryo_drvae.config import RunConfig
from cryo_drvae.simulate import SimulationConfig, simulate_dataset


@pytest.fixture(scope="session")
def small_set(tmp_path_factory: pytest.TempPathFactory):
    """4 views x 60 particles, box 48 at 4 Å/px, SNR 0.1, random psi/shift/CTF."""
    out = tmp_path_factory.mktemp("small_set")
    return simulate_dataset(SimulationConfig(n_classes=4, n_particles=240, snr=0.1, box_size=48,
                                             pixel_size=4.0, particles_per_stack=100, seed=3), out)


def fast_config(star: Path | str, prefix: Path | str, **options) -> RunConfig:
    """A config small enough for unit tests (few epochs and rounds)."""
    defaults = dict(particles_star=str(star), output_prefix=str(prefix), n_classes=4, threads=2,
                    n_rounds=4, epochs_initial=2, epochs_per_round=1, channels=8, psi_step=12.0)
    defaults.update(options)
    return RunConfig.from_options(**defaults)


@pytest.fixture
def in_tmp(tmp_path: Path):
    """Run the test from inside tmp_path (RELION resolves image paths against the cwd)."""
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)
