"""Data-parallel runs: 2 CPU processes (gloo, launched by torchrun) give the single-process result."""

from __future__ import annotations

import os
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile

from cryo_drvae.distributed import Comm

# Per-class sums are added in a different order across ranks, so a particle on a near-tie
# may change class; everything else must agree.
LABEL_AGREEMENT = 0.99
AVERAGE_RELATIVE_ERROR = 1e-3


def classify(star, prefix, *launcher: str) -> None:
    command = [*launcher, "-m", "cryo_drvae", "classify", "--i", str(star), "--o", str(prefix),
               "--K", "4", "--j", "1", "--iter", "3", "--psi_step", "12", "--seed", "5"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def outputs(prefix):
    data = starfile.read(f"{prefix}_data.star")["particles"]
    with mrcfile.open(f"{prefix}_class_averages.mrcs") as mrc:
        averages = mrc.data.copy()
    return data, averages


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(small_set, tmp_path):
    classify(small_set.star_path, tmp_path / "single" / "run", sys.executable)
    classify(small_set.star_path, tmp_path / "ddp" / "run", sys.executable, "-m", "torch.distributed.run",
             "--standalone", "--nproc_per_node=2")
    single, single_avg = outputs(tmp_path / "single" / "run")
    ddp, ddp_avg = outputs(tmp_path / "ddp" / "run")
    assert len(ddp) == len(single) == 240
    assert list(ddp["rlnImageName"]) == list(single["rlnImageName"])
    agreement = np.mean(ddp["rlnClassNumber"].to_numpy() == single["rlnClassNumber"].to_numpy())
    assert agreement >= LABEL_AGREEMENT
    scale = np.abs(single_avg).max()
    assert np.abs(ddp_avg - single_avg).max() <= AVERAGE_RELATIVE_ERROR * scale
    # rank 0 alone wrote, and nobody left scratch files behind
    assert not (tmp_path / "ddp" / "run_scratch").exists()
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_cover_every_particle_once(world):
    n = 100
    covered = np.concatenate([np.arange(n)[Comm(rank=r, world_size=world).shard(n)] for r in range(world)])
    assert np.array_equal(covered, np.arange(n))


def test_single_process_collectives_are_identity():
    import torch

    comm = Comm()
    values = torch.arange(6.0)
    assert comm.sum(values) is values and comm.broadcast(values) is values
    rows = np.arange(12).reshape(6, 2)
    assert comm.gather(rows, 6) is rows


@pytest.mark.slow
def test_drvae_trains_data_parallel_over_two_processes(small_set, tmp_path):
    prefix = tmp_path / "drvae" / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cryo_drvae", "classify", "--i", str(small_set.star_path), "--o", str(prefix),
               "--K", "4", "--j", "1", "--iter", "1", "--psi_step", "12", "--drvae", "--epochs", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data, averages = outputs(prefix)
    assert len(data) == 240 and averages.shape[0] == 4
    assert "DRVAE trained 1 epochs" in (tmp_path / "drvae" / "run_run.log").read_text()
