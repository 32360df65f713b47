"""CLI: each bad input gives one clear error line naming the file, exit 1, and no outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from click.testing import CliRunner

from cryo_drvae.cli import main
from cryo_drvae.simulate import SimulationConfig, simulate_dataset


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    simulate_dataset(SimulationConfig(n_classes=2, n_particles=40, snr=0.1, box_size=32, pixel_size=5.0,
                                      particles_per_stack=20, seed=5), out)
    return out


@pytest.fixture
def tiny(tiny_source, tmp_path):
    target = tmp_path / "set"
    shutil.copytree(tiny_source, target)
    return target


def classify(star: Path, out: Path, *extra: str):
    args = ["classify", "--i", str(star), "--o", str(out / "run"), "--K", "2", "--iter", "1",
            "--epochs", "1", *extra]
    return CliRunner().invoke(main, args)


def assert_clean_failure(result, *fragments: str, out: Path | None = None) -> None:
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ")
    for fragment in fragments:
        assert fragment in message, message
    if out is not None and out.exists():
        written = [p.name for p in out.iterdir() if p.suffix in (".star", ".mrcs", ".png")]
        assert written == []


def stacks_of(folder: Path) -> list[Path]:
    return sorted((folder / "Particles").glob("*.mrcs"))


def test_missing_star(tmp_path):
    assert_clean_failure(classify(tmp_path / "nope.star", tmp_path / "out"), "nope.star")


def test_missing_stack(tiny, tmp_path):
    missing = stacks_of(tiny)[1]
    missing.unlink()
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out), missing.name, "--data_dir", out=out)


def test_truncated_stack(tiny, tmp_path):
    stack = stacks_of(tiny)[0]
    stack.write_bytes(stack.read_bytes()[:-500])
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out), stack.name, "truncated", out=out)


def test_missing_ctf_column(tiny, tmp_path):
    blocks = starfile.read(tiny / "particles.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusU"])
    starfile.write(blocks, tiny / "particles.star", overwrite=True)
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out), "particles.star", "rlnDefocusU", out=out)


def test_missing_image_name_column(tiny, tmp_path):
    blocks = starfile.read(tiny / "particles.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnImageName"])
    starfile.write(blocks, tiny / "particles.star", overwrite=True)
    assert_clean_failure(classify(tiny / "particles.star", tmp_path / "out"), "rlnImageName")


def test_nan_pixels(tiny, tmp_path):
    stack = stacks_of(tiny)[0]
    with mrcfile.open(stack, mode="r+") as mrc:
        mrc.data[3, 5, 5] = np.nan
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out), stack.name, "NaN", out=out)


def test_k_larger_than_particle_count(tiny, tmp_path):
    result = CliRunner().invoke(main, ["classify", "--i", str(tiny / "particles.star"),
                                       "--o", str(tmp_path / "out" / "run"), "--K", "500"])
    assert_clean_failure(result, "--K 500", "40")


def test_non_square_stack(tiny, tmp_path):
    stack = stacks_of(tiny)[0]
    data = mrcfile.read(stack)
    with mrcfile.new(stack, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data[:, :, :30]))
    assert_clean_failure(classify(tiny / "particles.star", tmp_path / "out"), stack.name)


def test_mixed_box_sizes(tiny, tmp_path):
    stack = stacks_of(tiny)[1]
    data = mrcfile.read(stack)
    with mrcfile.new(stack, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data[:, :30, :30]))
    assert_clean_failure(classify(tiny / "particles.star", tmp_path / "out"), stack.name)


def test_unwritable_output(tiny, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    assert_clean_failure(classify(tiny / "particles.star", blocker / "sub"), "blocker")


def test_simulate_classify_evaluate_round_trip(tmp_path):
    runner = CliRunner()
    sim = runner.invoke(main, ["simulate", "--o", str(tmp_path / "sim"), "--K", "2", "--n", "60",
                               "--snr", "0.1", "--box", "32", "--angpix", "5", "--seed", "2"])
    assert sim.exit_code == 0, sim.output
    run = classify(tmp_path / "sim" / "particles.star", tmp_path / "out")
    assert run.exit_code == 0, run.output
    scores = runner.invoke(main, ["evaluate", "--truth", str(tmp_path / "sim" / "truth.csv"),
                                  "--data", str(tmp_path / "out" / "run_data.star")])
    assert scores.exit_code == 0 and "accuracy" in scores.output
    accuracy = float(scores.output.split("accuracy")[1].split()[0])
    assert accuracy >= 0.9
