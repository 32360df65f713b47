"""Tests for cryo_drvae.outputs: RELION Class2D-style data/model STAR and class averages."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from pandas.testing import assert_frame_equal, assert_series_equal

from cryo_drvae import outputs
from cryo_drvae.errors import OutputError
from cryo_drvae.outputs import ClassificationResult, check_outputs_writable, write_run_outputs
from cryo_drvae.star_io import read_particles

BOX, K = 8, 3
APIX = [1.0, 2.0]           # optics groups 1 and 2


def write_input_star(path: Path, legacy: bool = False) -> Path:
    """Six particles; 3.1 with two optics groups, or a 3.0 single-block file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}@Extract/job005/mic.mrcs" for i in range(1, 7)]
    if legacy:
        frame = pd.DataFrame({"rlnImageName": names, "rlnVoltage": [300.0] * 6,
                              "rlnMagnification": [100000.0] * 6,
                              "rlnDetectorPixelSize": [15.0] * 6,
                              "rlnOriginX": [1.0, 2.0, 0.0, 0.0, 0.0, 0.0],
                              "rlnOriginY": [0.0] * 6})
        starfile.write(frame, path)
        return path
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
                           "rlnOpticsGroup": [1, 2], "rlnImagePixelSize": APIX,
                           "rlnImageSize": [BOX, BOX], "rlnImageDimensionality": [2, 2]})
    particles = pd.DataFrame({"rlnImageName": names,
                              "rlnDefocusU": [10000.5, 11000.25, 12000.0, 13000.0, 14000.0,
                                              15000.0],
                              "rlnOpticsGroup": [1, 2, 1, 2, 1, 2],
                              "rlnNormCorrection": [0.9, 1.1, 1.0, 1.0, 1.0, 1.0]})
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def make_result(n: int = 6) -> ClassificationResult:
    """K=3 classes; class index 1 (class number 2) is empty."""
    rng = np.random.default_rng(0)
    averages = rng.normal(size=(K, BOX, BOX)).astype(np.float32)
    averages[1] = 5.0                    # whatever the pipeline leaves in an empty class
    return ClassificationResult(
        labels=np.array([0, 2, 0, 2, 2, 0])[:n],
        psi_deg=np.array([10.0, -45.5, 90.0, 0.0, 179.5, 33.25])[:n],
        origin_px=np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0], [3.0, 1.0], [-2.0, 0.25],
                            [1.5, 1.5]])[:n],
        confidence=np.array([0.9, 0.8, 0.7, 0.6, 0.5, 1.0])[:n],
        class_averages=averages,
        class_resolution=np.array([12.5, np.inf, 20.0]),
        pixel_size=1.0,
        history=[{"round": 1, "changed_fraction": 0.5, "loss": 1.0}],
    )


@pytest.fixture
def written(tmp_path, monkeypatch):
    """Outputs of one run under a project-relative prefix, with cwd = project."""
    monkeypatch.chdir(tmp_path)
    table = read_particles(write_input_star(Path("Extract/job005/particles.star")))
    result = make_result()
    prefix = "Class2D/job010/run_it001"
    paths = write_run_outputs(prefix, table, result)
    return prefix, table, result, paths


def test_returns_the_three_paths(written):
    prefix, _, _, paths = written
    assert paths == {"data_star": Path(f"{prefix}_data.star"),
                     "model_star": Path(f"{prefix}_model.star"),
                     "class_averages": Path(f"{prefix}_class_averages.mrcs")}
    assert all(p.is_file() for p in paths.values())


def test_no_temporary_files_left(written):
    prefix, _, _, _ = written
    assert sorted(os.listdir(Path(prefix).parent)) == [
        "run_it001_class_averages.mrcs", "run_it001_data.star", "run_it001_model.star"]


def test_data_star_columns(written):
    _, table, result, paths = written
    back = starfile.read(paths["data_star"], always_dict=True)
    assert_frame_equal(back["optics"], table.optics)
    particles = back["particles"]
    for name in table.particles.columns:         # input columns unchanged, row order kept
        assert_series_equal(particles[name], table.particles[name], check_exact=True)
    assert particles["rlnClassNumber"].tolist() == [1, 3, 1, 3, 3, 1]
    np.testing.assert_array_equal(particles["rlnAnglePsi"], result.psi_deg)
    apix = np.array(APIX * 3)
    np.testing.assert_allclose(particles["rlnOriginXAngst"], result.origin_px[:, 0] * apix,
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(particles["rlnOriginYAngst"], result.origin_px[:, 1] * apix,
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(particles["rlnMaxValueProbDistribution"], result.confidence)
    # neutral ML columns only where the input lacked them
    assert particles["rlnNormCorrection"].tolist() == [0.9, 1.1, 1.0, 1.0, 1.0, 1.0]
    assert particles["rlnAngleRot"].tolist() == [0.0] * 6
    assert particles["rlnAngleTilt"].tolist() == [0.0] * 6
    assert particles["rlnLogLikeliContribution"].tolist() == [0.0] * 6
    assert particles["rlnNrOfSignificantSamples"].tolist() == [1] * 6
    assert particles["rlnGroupNumber"].tolist() == [1] * 6


def test_class_averages_stack(written):
    _, _, result, paths = written
    with mrcfile.open(paths["class_averages"], permissive=False) as mrc:
        data = mrc.data.copy()
        assert mrc.header.ispg == 0
        assert float(mrc.voxel_size.x) == pytest.approx(result.pixel_size)
    assert data.dtype == np.float32 and data.shape == (K, BOX, BOX)
    np.testing.assert_array_equal(data[0], result.class_averages[0])
    np.testing.assert_array_equal(data[2], result.class_averages[2])
    assert not data[1].any()                     # the empty class is an all-zero slice


def test_model_star(written):
    prefix, _, result, paths = written
    model = starfile.read(paths["model_star"], always_dict=True)
    assert list(model) == ["model_general", "model_classes"]
    general = model["model_general"]
    assert general["rlnNrClasses"] == K
    assert general["rlnOriginalImageSize"] == BOX
    assert general["rlnReferenceDimensionality"] == 2 and general["rlnDataDimensionality"] == 2
    assert general["rlnPixelSize"] == result.pixel_size
    assert general["rlnNrGroups"] == 1
    assert general["rlnCurrentResolution"] == 12.5
    assert general["rlnAveragePmax"] == pytest.approx(np.mean(result.confidence))

    classes = model["model_classes"]
    assert len(classes) == K
    np.testing.assert_allclose(classes["rlnClassDistribution"], [0.5, 0.0, 0.5])
    assert classes["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-12)
    assert classes[outputs.CLASS_COUNT_COLUMN].tolist() == [3, 0, 3]
    assert classes["rlnEstimatedResolution"].tolist() == [12.5, 999.0, 20.0]
    for column in ("rlnAccuracyRotations", "rlnAccuracyTranslationsAngst",
                   "rlnOverallFourierCompleteness", "rlnClassPriorOffsetX",
                   "rlnClassPriorOffsetY"):
        assert column in classes.columns


def test_reference_images_point_at_existing_slices(written):
    prefix, _, _, paths = written
    classes = starfile.read(paths["model_star"])["model_classes"]
    with mrcfile.open(paths["class_averages"]) as mrc:
        stack = mrc.data.copy()
    for row, name in enumerate(classes["rlnReferenceImage"], start=1):
        number, path = name.split("@")
        assert path == f"{prefix}_class_averages.mrcs"       # project-relative, as given
        assert int(number) == row and int(number) <= stack.shape[0]
        assert Path(path).is_file()


def test_non_finite_average_pixels_are_zeroed(tmp_path, caplog):
    table = read_particles(write_input_star(tmp_path / "p.star"))
    result = make_result()
    result.class_averages[2, 0, 0] = np.nan
    paths = write_run_outputs(tmp_path / "out/run", table, result)
    with mrcfile.open(paths["class_averages"]) as mrc:
        written = mrc.data.copy()
    assert written[2, 0, 0] == 0.0
    np.testing.assert_array_equal(written[2, 1:], result.class_averages[2, 1:])
    assert "[3]" in caplog.text and "NaN/Inf" in caplog.text


def test_legacy_input_written_as_31(tmp_path):
    table = read_particles(write_input_star(tmp_path / "old.star", legacy=True))
    paths = write_run_outputs(tmp_path / "out/run", table, make_result())
    back = starfile.read(paths["data_star"], always_dict=True)
    assert back["optics"]["rlnImageSize"].tolist() == [BOX]
    assert back["optics"]["rlnImagePixelSize"].tolist() == [1.5]
    # the pipeline's origins (px) times 1.5 Å/px replace the converted 3.0 origins
    np.testing.assert_allclose(back["particles"]["rlnOriginXAngst"],
                               make_result().origin_px[:, 0] * 1.5)
    assert "rlnOriginX" not in back["particles"].columns


def test_result_shape_mismatch_is_rejected(tmp_path):
    table = read_particles(write_input_star(tmp_path / "p.star"))
    result = make_result()
    result.confidence = result.confidence[:5]
    with pytest.raises(ValueError, match="confidence"):
        write_run_outputs(tmp_path / "out/run", table, result)
    assert not (tmp_path / "out/run_data.star").exists()


def test_check_outputs_writable_creates_folder(tmp_path):
    check_outputs_writable(tmp_path / "a/b/run")
    assert (tmp_path / "a/b").is_dir()
    assert list((tmp_path / "a/b").iterdir()) == []           # the probe file is gone


def test_unwritable_folder_raises_output_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a regular file where the output folder should be")
    with pytest.raises(OutputError, match="not_a_folder.*writable folder"):
        check_outputs_writable(blocker / "run")
    table = read_particles(write_input_star(tmp_path / "p.star"))
    with pytest.raises(OutputError, match="not_a_folder"):
        write_run_outputs(blocker / "job/run", table, make_result())


def test_folder_that_refuses_writes_raises_output_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(OutputError, match="read_only.*Permission denied.*writable folder"):
        check_outputs_writable(tmp_path / "read_only" / "run")


def test_prefix_that_is_a_folder_raises_output_error(tmp_path):
    (tmp_path / "Class2D").mkdir()
    with pytest.raises(OutputError, match="Class2D.*is a folder"):
        check_outputs_writable(tmp_path / "Class2D")
