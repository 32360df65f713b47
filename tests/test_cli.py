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


# ---- RELION flags: one policy with the External-job wrapper (cryo_drvae/relion_flags.py) ----

def test_relion_class2d_flags_are_used_or_ignored_with_a_warning(tiny, tmp_path):
    out = tmp_path / "out"
    result = classify(tiny / "particles.star", out, "--ctf", "--tau2_fudge", "2", "--pool", "3", "--zero_mask",
                      "--dont_check_norm", "--offset_range", "2", "--tolerance", "0.5", "--nr_classes", "2")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "no equivalent in cryo-drvae" in line]
    assert len(warned) == 1 and "--tau2_fudge 2" in warned[0] and "--pool 3" in warned[0]
    assert "--ctf" in warned[0] and "--zero_mask" in warned[0] and "dont_check_norm" not in warned[0]
    saved = (out / "run_config.yaml").read_text()
    assert "max_shift_px: 2.0" in saved and "tolerance: 0.5" in saved


def test_an_option_neither_ours_nor_relions_is_an_error(tiny, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out, "--KK", "3"), "--KK 3", "--help")
    assert not out.exists()


def test_help_lists_every_flag_with_its_default():
    import click
    command = main.commands["classify"]
    ctx = click.Context(command, info_name="classify")
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        names, text = param.get_help_record(ctx)
        assert text, f"{names} has no help"
        if not (param.is_flag or param.required):
            assert "[default:" in text, f"{names}: {text}"
    records = {opt: param.get_help_record(ctx)[1] for param in command.params if isinstance(param, click.Option)
               for opt in param.opts}
    for flag, default in (("--iter", "8"), ("--K", "50"), ("--balance", "0.2"), ("--psi_step", "10.0"),
                          ("--tolerance", "0.01"), ("--offset_range", "0.0"), ("--nr_classes", "50")):
        assert f"[default: {default}]" in records[flag], records[flag]
    assert "Å" in records["--particle_diameter"] and "Å/px" in records["--angpix"] and "px" in records["--offset_range"]
    assert "degrees" in records["--psi_step"]


# ---- inputs that must not be read wrong without a word ----------------------------------------

def _edit_optics(star: Path, **columns) -> None:
    blocks = starfile.read(star)
    for name, value in columns.items():
        if value is None:
            blocks["optics"] = blocks["optics"].drop(columns=[name])
        else:
            blocks["optics"][name] = value
    starfile.write(blocks, star, overwrite=True)


def test_stack_box_disagreeing_with_image_size_is_refused(tiny, tmp_path):
    _edit_optics(tiny / "particles.star", rlnImageSize=48)
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out), "particles.star", "rlnImageSize is 48",
                         "32 px", out=out)


def test_ctf_premultiplied_data_are_refused_unless_no_ctf(tiny, tmp_path):
    _edit_optics(tiny / "particles.star", rlnCtfDataAreCtfPremultiplied=1)
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out), "rlnCtfDataAreCtfPremultiplied", "--no_ctf",
                         out=out)
    assert classify(tiny / "particles.star", out, "--no_ctf").exit_code == 0


def test_angpix_gives_a_pixel_size_to_a_star_without_one(tiny, tmp_path):
    _edit_optics(tiny / "particles.star", rlnImagePixelSize=None)
    out = tmp_path / "out"
    assert_clean_failure(classify(tiny / "particles.star", out), "pixel size", "--angpix")
    result = classify(tiny / "particles.star", out, "--angpix", "5")
    assert result.exit_code == 0, result.output
    assert starfile.read(out / "run_data.star")["optics"]["rlnImagePixelSize"].tolist() == [5.0]
    assert mrcfile.open(out / "run_class_averages.mrcs").voxel_size.x == pytest.approx(5.0)


# ---- image paths as RELION writes and resolves them -----------------------------------------------

def test_stacks_found_only_beside_the_star_are_warned_about(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # not the folder the (STAR-relative) image names start from
    result = classify(tiny / "particles.star", tmp_path / "out")
    assert result.exit_code == 0
    assert "found only relative to the STAR file's folder" in result.output
    monkeypatch.chdir(tiny)              # the folder they are relative to: RELION would find them
    result = classify(tiny / "particles.star", tmp_path / "out2")
    assert result.exit_code == 0 and "found only relative" not in result.output


def test_simulate_writes_image_paths_relative_to_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sim = CliRunner().invoke(main, ["simulate", "--o", "sets/sim", "--K", "2", "--n", "6", "--box", "32"])
    assert sim.exit_code == 0, sim.output
    names = starfile.read("sets/sim/particles.star")["particles"]["rlnImageName"]
    assert names.iloc[0] == "000001@sets/sim/Particles/stack_001.mrcs"
    assert all(Path(name.split("@")[1]).is_file() for name in names)     # from the project folder


def test_a_relion5_particles_star_classifies(tiny, tmp_path):
    """RELION 5 Extract output: '# version 50001', rlnCtfDataAreCtfPremultiplied 0, extra columns."""
    star = tiny / "particles.star"
    blocks = starfile.read(star)
    blocks["optics"]["rlnCtfDataAreCtfPremultiplied"] = 0
    blocks["optics"]["rlnMicrographPixelSize"] = blocks["optics"]["rlnImagePixelSize"]
    blocks["particles"]["rlnCtfMaxResolution"] = 4.5
    blocks["particles"]["rlnCtfFigureOfMerit"] = 0.2
    blocks["particles"]["rlnAutopickFigureOfMerit"] = 1.0
    starfile.write(blocks, star, overwrite=True)
    text = star.read_text()
    star.write_text("\n".join("# version 50001" if line.startswith("# version") else line
                              for line in text.splitlines()) + "\n")
    result = classify(star, tmp_path / "out", "--j", "1")
    assert result.exit_code == 0, result.output
    out = starfile.read(tmp_path / "out" / "run_data.star")
    assert out["optics"]["rlnCtfDataAreCtfPremultiplied"].tolist() == [0]
    assert "rlnCtfMaxResolution" in out["particles"] and out["particles"]["rlnClassNumber"].between(1, 2).all()


def test_the_output_folder_is_checked_once(tiny, tmp_path, monkeypatch):
    """One writability probe per run (when the prefix is claimed), not one per writer and per claim."""
    from cryo_drvae import outputs
    probes = []
    real = outputs.tempfile.NamedTemporaryFile

    def probe(*args, **kwargs):
        probes.append(kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", probe)
    result = classify(tiny / "particles.star", tmp_path / "out", "--cs_out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "run_particles.cs").is_file() and (tmp_path / "out" / "run_data.star").is_file()
    assert probes == [tmp_path / "out"]
