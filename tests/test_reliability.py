"""Nothing lost, nothing silently wrong: full disks, unnormalised stacks, --continue checks,
shared output prefixes, SIGTERM and the smaller refusals and warnings (issue 13).

Every case uses a 200-particle, 4-class, 32 px simulated set; bad runs must end with one
``Error:`` line, a non-zero exit, no partial outputs and the input untouched.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from click.testing import CliRunner

from cryo_drvae import checks, store as store_module
from cryo_drvae.cli import main
from cryo_drvae.config import ClusterConfig, DataConfig, RunConfig
from cryo_drvae.errors import ConfigError, InputFileError, OutputError
from cryo_drvae.evaluate import evaluate_run
from cryo_drvae.guard import FINISHED_SUFFIXES
from cryo_drvae.simulate import SimulationConfig, simulate_dataset
from cryo_drvae.stack import ParticleStack
from cryo_drvae.star_io import read_particles
from cryo_drvae.store import RowStore

ROOT = Path(__file__).resolve().parents[1]


# ---- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel_set")
    simulate_dataset(SimulationConfig(n_classes=4, n_particles=200, snr=0.5, box_size=32, pixel_size=3.0,
                                      particles_per_stack=100, seed=11), out)
    return out


@pytest.fixture(scope="module")
def other_source(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel_other")
    simulate_dataset(SimulationConfig(n_classes=4, n_particles=200, snr=0.5, box_size=32, pixel_size=3.0,
                                      particles_per_stack=100, seed=12), out)
    return out


@pytest.fixture
def data(source, tmp_path):
    target = tmp_path / "set"
    shutil.copytree(source, target)
    return target


def classify(star: Path, prefix: Path, *extra: str):
    args = ["classify", "--i", str(star), "--o", str(prefix), "--K", "4", "--iter", "2", "--j", "1", *extra]
    return CliRunner().invoke(main, args)


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


def outputs_left(prefix: Path) -> list[str]:
    """Final outputs and temporary files of a prefix that exist."""
    folder = prefix.parent
    if not folder.exists():
        return []
    finals = [p.name for p in folder.iterdir() if any(p.name == prefix.name + s for s in FINISHED_SUFFIXES)]
    temps = [p.name for p in folder.iterdir() if ".tmp" in p.name]
    return finals + temps


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stacks_of(folder: Path) -> list[Path]:
    return sorted((folder / "Particles").glob("*.mrcs"))


def rewrite_stacks(folder: Path, change) -> None:
    """Replace every stack's data by ``change(data, stack_number)`` (dtype as returned)."""
    for i, path in enumerate(stacks_of(folder)):
        with mrcfile.open(path) as mrc:
            data, voxel = mrc.data.copy(), mrc.voxel_size.x
        path.unlink()
        with mrcfile.new(path) as mrc:
            mrc.set_data(change(data, i))
            mrc.voxel_size = voxel


def accuracy(folder: Path, prefix: Path) -> float:
    return evaluate_run(folder / "truth.csv", f"{prefix}_data.star").accuracy


def labels(prefix: Path) -> list[int]:
    return read_particles(Path(f"{prefix}_data.star")).particles["rlnClassNumber"].tolist()


def uninterrupted_labels(data: Path, tmp_path: Path, *extra: str) -> list[int]:
    """Labels of the same run never interrupted: what a resumed run must give."""
    prefix = tmp_path / "whole" / "run"
    assert classify(data / "particles.star", prefix, *extra).exit_code == 0
    return labels(prefix)


# ---- 1. full disks ----------------------------------------------------------------------------

def test_short_pwrite_is_completed(tmp_path, monkeypatch):
    """os.pwrite may write fewer bytes than asked (a filling disk): the rest must follow."""
    real = os.pwrite
    monkeypatch.setattr(store_module.os, "pwrite", lambda fd, data, offset: real(fd, bytes(data)[:100], offset))
    rows = torch.randn(20, 8, 8, generator=torch.Generator().manual_seed(1))
    store = RowStore.on_disk(tmp_path / "a.f32", 20, (8, 8))
    store.write(0, rows)
    assert torch.equal(store.read(0, 20), rows)


def test_scratch_disk_full_is_one_clear_error(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(store_module.os, "pwrite", full)
    store = RowStore.on_disk(tmp_path / "a.f32", 20, (8, 8))
    with pytest.raises(OutputError, match=r"a\.f32: scratch write failed.*No space left.*--scratch_dir"):
        store.write(0, torch.ones(20, 8, 8))


def test_scratch_space_is_checked_before_the_work(tmp_path, monkeypatch):
    class Tiny:
        f_bavail, f_frsize = 10, 4096     # 40 kB free
    monkeypatch.setattr(store_module.os, "statvfs", lambda path: Tiny())
    with pytest.raises(OutputError, match=r"MB free but the scratch file a\.f32 needs.*--preread_images"):
        RowStore.on_disk(tmp_path / "a.f32", 1000, (32, 32))


@pytest.mark.slow
def test_full_output_disk_leaves_no_partial_set(data, tmp_path, monkeypatch):
    """The data STAR (written last) hits a full disk: one line, exit 1, none of the outputs."""
    from cryo_drvae import star_io

    real = star_io._write_loop

    def full_disk(handle, block):
        if len(block) < 100:                   # the model STAR's classes: written
            return real(handle, block)
        handle.write("loop_\n")                # the particles: a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(star_io, "_write_loop", full_disk)
    before = digest(data)
    prefix = tmp_path / "out" / "run"
    result = classify(data / "particles.star", prefix)
    assert result.exit_code == 1, result.output
    assert last_line(result).startswith("Error: ") and "No space left on device" in last_line(result)
    assert "run_data.star" in last_line(result) and "Traceback" not in result.output
    assert outputs_left(prefix) == []
    assert Path(f"{prefix}_checkpoint.pt").exists()          # the work is not lost: --continue
    assert digest(data) == before


# ---- 2. unnormalised stacks -------------------------------------------------------------------

def test_offset_and_gain_are_normalised_away(data):
    table = read_particles(data / "particles.star")
    reference = ParticleStack.from_table(table).normalise(8.0).read(np.arange(200))
    rewrite_stacks(data, lambda d, i: (d * (3.0 + np.arange(len(d)))[:, None, None] * 0.1
                                      + 5.0 + 2 * np.arange(len(d))[:, None, None]).astype(np.float32))
    shifted = ParticleStack.from_table(read_particles(data / "particles.star")).normalise(8.0).read(np.arange(200))
    np.testing.assert_allclose(shifted, reference, atol=2e-4)


@pytest.fixture(scope="module")
def normalised_accuracy(source, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("norm_run") / "run"
    # without split-and-merge moves: each is an accept/reject decision, so a rounding-level change of
    # the input can flip one and land in another optimum; this test is about normalisation
    result = classify(source / "particles.star", prefix, "--no_split_merge")
    assert result.exit_code == 0, result.output
    return accuracy(source, prefix)


@pytest.mark.parametrize("kind", ["offset", pytest.param("uint16", marks=pytest.mark.slow),
                                  pytest.param("per_image", marks=pytest.mark.slow)])
def test_unnormalised_stacks_classify_like_normalised(kind, data, tmp_path, normalised_accuracy):
    change = {"offset": lambda d, i: d + 5.0,
              "uint16": lambda d, i: np.round(d * 40 + 1000).astype(np.uint16),
              "per_image": lambda d, i: (d + 3.0 * np.arange(len(d))[:, None, None] + 7 * i).astype(np.float32)}
    rewrite_stacks(data, change[kind])
    prefix = tmp_path / "out" / "run"
    result = classify(data / "particles.star", prefix, "--no_split_merge")
    assert result.exit_code == 0, result.output
    assert normalised_accuracy > 0.8
    assert accuracy(data, prefix) >= normalised_accuracy - 0.02


def test_float64_data_under_a_float32_header_is_refused(data, tmp_path):
    path = stacks_of(data)[0]
    raw = path.read_bytes()
    with mrcfile.open(path) as mrc:
        values = mrc.data.astype(np.float64)
    path.write_bytes(raw[:1024] + values.tobytes())     # header still says mode 2 (float32)
    result = classify(data / "particles.star", tmp_path / "out" / "run")
    assert result.exit_code == 1
    assert path.name in last_line(result) and "float64" in last_line(result)
    assert outputs_left(tmp_path / "out" / "run") == []


# ---- 3. --continue checks the whole configuration and the input --------------------------------

@pytest.fixture
def interrupted(data, tmp_path, monkeypatch):
    """A run stopped after round 1: its checkpoint, no outputs."""
    from cryo_drvae import checkpoint

    real = checkpoint.save_round_state

    def stop_after_round_one(cfg, state, *args, **kwargs):
        real(cfg, state, *args, **kwargs)
        if state.round == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_round_state", stop_after_round_one)
    prefix = tmp_path / "out" / "run"
    result = classify(data / "particles.star", prefix, "--iter", "3")
    assert result.exit_code == 130 and "--continue" in last_line(result), result.output
    monkeypatch.setattr(checkpoint, "save_round_state", real)
    return data, prefix


@pytest.mark.slow
def test_checkpoint_is_a_plain_state_dict(interrupted):
    _, prefix = interrupted
    saved = torch.load(f"{prefix}_checkpoint.pt", weights_only=True)
    assert saved["state"]["round"] == 1 and saved["settings"]["seed"] == 0
    assert saved["input"]["n_particles"] == 200 and len(saved["input"]["sha256"]) == 64


@pytest.mark.parametrize("extra, named", [(["--seed", "1"], "--seed")] + [   # one in test-fast, all in make test
    pytest.param(extra, named, marks=pytest.mark.slow) for extra, named in
    [(["--no_ctf"], "--no_ctf"), (["--balance", "0.5"], "--balance"), (["--psi_step", "15"], "--psi_step"),
     (["--K", "3"], "--K"), (["--particle_diameter", "40"], "--particle_diameter")]])
def test_continue_refuses_a_changed_setting(interrupted, extra, named):
    data, prefix = interrupted
    args = ["classify", "--i", str(data / "particles.star"), "--o", str(prefix), "--K", "4", "--iter", "3",
            "--j", "1", "--continue", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert last_line(result).startswith("Error: ") and named in last_line(result)
    assert outputs_left(prefix) == [] and Path(f"{prefix}_checkpoint.pt").exists()


@pytest.mark.slow
def test_continue_refuses_another_input(interrupted, other_source):
    _, prefix = interrupted
    result = classify(other_source / "particles.star", prefix, "--iter", "3", "--continue")
    assert result.exit_code == 1
    assert "--i" in last_line(result) and "different file" in last_line(result)
    assert outputs_left(prefix) == []


@pytest.mark.slow
def test_continue_refuses_a_changed_star(interrupted):
    data, prefix = interrupted
    star = data / "particles.star"
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnDefocusU"] += 100.0
    starfile.write(blocks, star, overwrite=True)
    result = classify(star, prefix, "--iter", "3", "--continue")
    assert result.exit_code == 1 and "has changed since" in last_line(result)


@pytest.mark.slow
def test_continue_with_more_rounds_resumes(interrupted, tmp_path):
    data, prefix = interrupted
    result = classify(data / "particles.star", prefix, "--iter", "4", "--continue")
    assert result.exit_code == 0, result.output
    assert "resuming after round 1" in Path(f"{prefix}_run.log").read_text()
    assert not Path(f"{prefix}_checkpoint.pt").exists()
    assert labels(prefix) == uninterrupted_labels(data, tmp_path, "--iter", "4")


# ---- 4. the output prefix ---------------------------------------------------------------------

@pytest.mark.slow
def test_existing_outputs_are_refused_unless_overwrite(source, tmp_path):
    prefix = tmp_path / "out" / "run"
    assert classify(source / "particles.star", prefix).exit_code == 0
    before = digest(prefix.parent)
    refused = classify(source / "particles.star", prefix, "--seed", "3")
    assert refused.exit_code == 1 and "--overwrite" in last_line(refused)
    assert digest(prefix.parent) == before                  # run.log included: untouched
    replaced = classify(source / "particles.star", prefix, "--seed", "3", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    log = Path(f"{prefix}_run.log").read_text()
    assert log.count("cryo-drvae 0.1.0:") == 1                 # the log holds this run only
    assert "seed: 3" in Path(f"{prefix}_config.yaml").read_text()


@pytest.mark.slow
def test_a_checkpoint_is_not_dropped_without_continue(interrupted):
    data, prefix = interrupted
    result = classify(data / "particles.star", prefix, "--iter", "3")
    assert result.exit_code == 1 and "--continue" in last_line(result)
    assert Path(f"{prefix}_checkpoint.pt").exists()


def test_second_run_on_a_locked_prefix_is_refused(source, tmp_path):
    prefix = tmp_path / "out" / "run"
    prefix.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cryo_drvae.guard import prefix_lock\n"
         f"with prefix_lock({str(prefix)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = classify(source / "particles.star", prefix)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1
    assert f"pid {holder.pid}" in last_line(result) and "another cryo-drvae run" in last_line(result)
    assert not Path(f"{prefix}_run.log").exists() and not Path(f"{prefix}_scratch").exists()


@pytest.mark.slow
def test_a_dead_runs_lock_file_does_not_block(source, tmp_path):
    prefix = tmp_path / "out" / "run"
    prefix.parent.mkdir()
    Path(f"{prefix}_run.lock").write_text("pid 1 on elsewhere\n")    # left by a kill -9
    result = classify(source / "particles.star", prefix)
    assert result.exit_code == 0, result.output
    assert not Path(f"{prefix}_run.lock").exists()


def test_errors_reach_run_log(data, tmp_path):
    prefix = tmp_path / "out" / "run"
    result = classify(data / "particles.star", prefix, "--particle_diameter", "500")
    assert result.exit_code == 1
    log = Path(f"{prefix}_run.log").read_text().strip().splitlines()
    assert "ERROR" in log[-1] and "--particle_diameter 500" in log[-1]
    assert outputs_left(prefix) == []


# ---- 5. SIGTERM -------------------------------------------------------------------------------

SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from cryo_drvae import checkpoint
    from cryo_drvae.cli import main
    real = checkpoint.save_round_state
    def save_then_term(cfg, state, *args, **kwargs):
        real(cfg, state, *args, **kwargs)
        if state.round == 1:
            os.kill(os.getpid(), signal.SIGTERM)      # what SLURM sends at the time limit
    checkpoint.save_round_state = save_then_term
    sys.argv = ["cryo-drvae"] + sys.argv[1:]
    main()
""")


@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_and_removes_scratch(data, tmp_path):
    prefix = tmp_path / "out" / "run"
    args = ["classify", "--i", str(data / "particles.star"), "--o", str(prefix), "--K", "4", "--iter", "3",
            "--j", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("Error: interrupted by SIGTERM")
    assert "--continue" in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr
    assert Path(f"{prefix}_checkpoint.pt").exists() and not Path(f"{prefix}_scratch").exists()
    assert outputs_left(prefix) == [] and not Path(f"{prefix}_run.lock").exists()
    assert "interrupted by SIGTERM" in Path(f"{prefix}_run.log").read_text()
    resumed = classify(data / "particles.star", prefix, "--iter", "3", "--continue")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after round 1" in Path(f"{prefix}_run.log").read_text()
    assert labels(prefix) == uninterrupted_labels(data, tmp_path, "--iter", "3")


# ---- 6. smaller checks ------------------------------------------------------------------------

def test_duplicate_rows_are_warned(data, caplog):
    star = data / "particles.star"
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[list(range(200)) + list(range(50))]
    starfile.write(blocks, star, overwrite=True)
    with caplog.at_level(logging.WARNING, logger="cryo_drvae"):
        assert checks.warn_duplicate_rows(read_particles(star)) == 50
    assert "50 of 250 rows repeat an image" in caplog.text


@pytest.mark.parametrize("diameter, fragment", [("1", "under 4 pixels"), ("1000", "larger than the box")])
def test_absurd_particle_diameters_are_refused(data, tmp_path, diameter, fragment):
    prefix = tmp_path / "out" / "run"
    result = classify(data / "particles.star", prefix, "--particle_diameter", diameter)
    assert result.exit_code == 1 and fragment in last_line(result) and "--particle_diameter" in last_line(result)
    assert outputs_left(prefix) == []


def test_small_particle_diameter_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="cryo_drvae"):
        checks.check_particle_diameter(20.0, box_size=64, pixel_size=3.0)
    assert "under 25% of the 192 Å box" in caplog.text


@pytest.mark.parametrize("build, flag", [(lambda: ClusterConfig(balance=2.0), "--balance"),
                                         (lambda: ClusterConfig(n_classes=0), "--K"),
                                         (lambda: ClusterConfig(n_rounds=0), "--iter"),
                                         (lambda: DataConfig(particle_diameter=-1.0), "--particle_diameter"),
                                         (lambda: RunConfig(threads=0), "--j")])
def test_messages_name_flags_not_fields(build, flag):
    with pytest.raises(ConfigError) as caught:
        build()
    assert str(caught.value).startswith(flag + " ")
    assert "cluster." not in str(caught.value) and "data." not in str(caught.value)


def test_bad_pixel_size_value_is_named_as_such(data):
    star = data / "particles.star"
    blocks = starfile.read(star, always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = 0.0
    starfile.write(blocks, star, overwrite=True)
    with pytest.raises(InputFileError, match="'rlnImagePixelSize' in data_optics is not a positive number") as caught:
        read_particles(star)
    assert "add" not in str(caught.value)


def test_relion_wrapper_passes_overwrite(tmp_path):
    """RELION owns the job folder: rerunning a job replaces its outputs, so the wrapper says so."""
    from relion_wrapper import external_job as ej

    args, _ = ej.build_parser().parse_known_args(["--o", str(tmp_path), "--in_parts", "p.star", "--j", "1"])
    cfg = ej.config_from_args(args)
    assert cfg.overwrite is True and cfg.continue_run is False
    assert RunConfig.from_options(particles_star="p.star").overwrite is False     # the CLI's default


def test_old_or_foreign_checkpoints_are_refused(tmp_path):
    from cryo_drvae import checkpoint

    old = tmp_path / "old.pt"
    torch.save({"state": {"round": 2}, "config": "cluster: {}"}, old)       # no format: older version
    with pytest.raises(InputFileError, match="old.pt: checkpoint from another cryo-drvae version"):
        checkpoint.load_checkpoint(old, {}, {})
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": 2, "state": Path("x")}, pickled)                   # needs unpickling code
    with pytest.raises(InputFileError, match="pickled.pt: cannot be read as a cryo-drvae checkpoint"):
        checkpoint.load_checkpoint(pickled, {}, {})


def test_constant_image_cannot_be_normalised(data):
    rewrite_stacks(data, lambda d, i: np.where(np.arange(len(d))[:, None, None] == 6, 0.0, d).astype(np.float32)
                   if i == 1 else d)
    stack = ParticleStack.from_table(read_particles(data / "particles.star")).normalise(8.0)
    with pytest.raises(InputFileError, match=r"stack_002\.mrcs: image 7 \(000007@\.\.\.\) has a constant background"):
        stack.read(np.arange(200))
