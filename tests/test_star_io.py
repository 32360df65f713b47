"""Tests for cryo_drvae.star_io: RELION 3.0 / 3.1 reading, 3.1 writing, error messages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from pandas.testing import assert_frame_equal, assert_series_equal

from cryo_drvae import star_io
from cryo_drvae.errors import InputFileError


def _optics() -> pd.DataFrame:
    return pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
        "rlnOpticsGroup": [1, 2],
        "rlnVoltage": [300.0, 200.0],
        "rlnSphericalAberration": [2.7, 1.4],
        "rlnAmplitudeContrast": [0.1, 0.07],
        "rlnImagePixelSize": [1.25, 2.5],
        "rlnImageSize": [16, 16],
        "rlnImageDimensionality": [2, 2],
    })


def _particles_31(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "rlnCoordinateX": rng.uniform(0, 4000, n).round(6),
        "rlnImageName": [f"{i + 1:06d}@Extract/job005/mic{i % 2}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"MotionCorr/job002/mic{i % 2}.mrc" for i in range(n)],
        "rlnDefocusU": rng.uniform(10000, 30000, n) + 0.123456789,   # more than 6 decimals
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": [2.5, -1.25, 0.0, 5.0, 1.0, -2.0][:n],
        "rlnOriginYAngst": [0.0, 1.25, 2.5, -5.0, 3.0, 4.0][:n],
        "rlnOpticsGroup": [1, 2, 1, 2, 1, 2][:n],
    })


def write_star_31(path: Path, particles: pd.DataFrame | None = None,
                  optics: pd.DataFrame | None = None) -> Path:
    """A RELION 3.1 particles STAR file (data_optics + data_particles)."""
    starfile.write({"optics": _optics() if optics is None else optics,
                    "particles": _particles_31() if particles is None else particles}, path)
    return path


def write_star_30(path: Path) -> Path:
    """A RELION 3.0 particles STAR file: one data_ block, optics on every row, px origins."""
    frame = pd.DataFrame({
        "rlnImageName": [f"{i:06d}@Particles/mic.mrcs" for i in range(1, 5)],
        "rlnOriginX": [1.0, -2.0, 3.5, 0.0],
        "rlnOriginY": [0.5, 0.0, -1.0, 2.0],
        "rlnDefocusU": [12000.5, 13000.25, 14000.125, 15000.0],
        "rlnVoltage": [300.0, 300.0, 300.0, 200.0],
        "rlnSphericalAberration": [2.7, 2.7, 2.7, 2.0],
        "rlnAmplitudeContrast": [0.1, 0.1, 0.1, 0.1],
        "rlnMagnification": [10000.0, 10000.0, 50000.0, 10000.0],
        "rlnDetectorPixelSize": [14.0, 14.0, 5.0, 14.0],          # µm -> 14, 14, 1, 14 Å
    })
    starfile.write(frame, path)
    return path


# --- RELION 3.1 --------------------------------------------------------------------------

def test_read_31_keeps_blocks_and_order(tmp_path):
    path = write_star_31(tmp_path / "p.star")
    table = star_io.read_particles(path)
    assert not table.is_legacy
    assert len(table) == 6
    assert table.particles["rlnImageName"].tolist() == _particles_31()["rlnImageName"].tolist()
    assert table.optics["rlnImagePixelSize"].tolist() == [1.25, 2.5]


def test_per_particle_joins_optics_by_group(tmp_path):
    table = star_io.read_particles(write_star_31(tmp_path / "p.star"))
    joined = table.per_particle()
    assert joined.index.equals(table.particles.index)
    assert joined["rlnImagePixelSize"].tolist() == [1.25, 2.5, 1.25, 2.5, 1.25, 2.5]
    assert joined["rlnVoltage"].tolist() == [300.0, 200.0, 300.0, 200.0, 300.0, 200.0]
    np.testing.assert_array_equal(star_io.pixel_sizes(table), [1.25, 2.5] * 3)


def test_origins_px_divides_angst_by_pixel_size(tmp_path):
    table = star_io.read_particles(write_star_31(tmp_path / "p.star"))
    expected = np.array([[2.0, 0.0], [-0.5, 0.5], [0.0, 2.0], [2.0, -2.0], [0.8, 2.4],
                         [-0.8, 1.6]])
    np.testing.assert_allclose(star_io.origins_px(table), expected, rtol=0, atol=1e-12)


def test_origins_px_zero_when_absent(tmp_path):
    particles = _particles_31().drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"])
    table = star_io.read_particles(write_star_31(tmp_path / "p.star", particles))
    assert np.array_equal(star_io.origins_px(table), np.zeros((6, 2)))


def test_write_31_round_trip_is_exact(tmp_path):
    table = star_io.read_particles(write_star_31(tmp_path / "in.star"))
    classes = np.array([3, 1, 2, 3, 1, 2])
    psi = np.array([10.5, -20.123456789012, 0.0, 179.9, -0.001, 33.3])
    pmax = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 1 / 3])
    out = tmp_path / "out.star"
    star_io.write_particles(out, table, {"rlnClassNumber": classes, "rlnAnglePsi": psi,
                                         "rlnMaxValueProbDistribution": pmax})

    back = starfile.read(out, always_dict=True)
    assert list(back) == ["optics", "particles"]
    assert_frame_equal(back["optics"], table.optics)
    particles = back["particles"]
    original = list(table.particles.columns)
    assert list(particles.columns) == original + ["rlnClassNumber",
                                                  "rlnMaxValueProbDistribution"]
    for name in original:
        if name != "rlnAnglePsi":
            assert_series_equal(particles[name], table.particles[name], check_exact=True)
    np.testing.assert_array_equal(particles["rlnAnglePsi"].to_numpy(), psi)
    np.testing.assert_array_equal(particles["rlnClassNumber"].to_numpy(), classes)
    assert particles["rlnClassNumber"].dtype.kind == "i"
    np.testing.assert_array_equal(particles["rlnMaxValueProbDistribution"].to_numpy(), pmax)
    assert out.read_text().count("# version 30001") == 2


def test_write_leaves_no_temporary_files(tmp_path):
    table = star_io.read_particles(write_star_31(tmp_path / "in.star"))
    star_io.write_particles(tmp_path / "out.star", table, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.star", "out.star"]


def test_write_rejects_column_of_wrong_length(tmp_path):
    table = star_io.read_particles(write_star_31(tmp_path / "in.star"))
    with pytest.raises(ValueError, match="rlnClassNumber"):
        star_io.write_particles(tmp_path / "out.star", table, {"rlnClassNumber": np.ones(5)})
    assert not (tmp_path / "out.star").exists()


def test_write_quotes_text_with_spaces(tmp_path):
    particles = _particles_31()
    particles["rlnMicrographName"] = "my mics/a b.mrc"
    table = star_io.read_particles(write_star_31(tmp_path / "in.star", particles))
    star_io.write_particles(tmp_path / "out.star", table, {})
    back = starfile.read(tmp_path / "out.star")["particles"]
    assert back["rlnMicrographName"].tolist() == ["my mics/a b.mrc"] * 6


# --- RELION 3.0 --------------------------------------------------------------------------

def test_read_30_pixel_size_from_detector_and_magnification(tmp_path):
    table = star_io.read_particles(write_star_30(tmp_path / "old.star"))
    assert table.is_legacy and table.optics is None
    np.testing.assert_allclose(star_io.pixel_sizes(table), [14.0, 14.0, 1.0, 14.0])
    np.testing.assert_allclose(table.per_particle()["rlnImagePixelSize"], [14.0, 14.0, 1.0, 14.0])
    np.testing.assert_array_equal(star_io.origins_px(table),
                                  [[1.0, 0.5], [-2.0, 0.0], [3.5, -1.0], [0.0, 2.0]])


def test_write_30_as_31_with_optics_and_angst_origins(tmp_path):
    table = star_io.read_particles(write_star_30(tmp_path / "old.star"))
    out = tmp_path / "new.star"
    star_io.write_particles(out, table, {"rlnClassNumber": np.array([1, 2, 1, 2])},
                            image_size=64)

    back = starfile.read(out, always_dict=True)
    optics, particles = back["optics"], back["particles"]
    # three distinct (voltage, Cs, Q0, pixel size) combinations, in order of appearance
    assert optics["rlnOpticsGroup"].tolist() == [1, 2, 3]
    assert optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2",
                                                     "opticsGroup3"]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], [14.0, 1.0, 14.0])
    assert optics["rlnVoltage"].tolist() == [300.0, 300.0, 200.0]
    assert optics["rlnSphericalAberration"].tolist() == [2.7, 2.7, 2.0]
    assert optics["rlnImageSize"].tolist() == [64, 64, 64]
    assert optics["rlnImageDimensionality"].tolist() == [2, 2, 2]
    assert particles["rlnOpticsGroup"].tolist() == [1, 1, 2, 3]
    # optics columns moved out; Å origins take the place of the px origins
    assert list(particles.columns) == ["rlnImageName", "rlnOriginXAngst", "rlnOriginYAngst",
                                       "rlnDefocusU", "rlnOpticsGroup", "rlnClassNumber"]
    np.testing.assert_allclose(particles["rlnOriginXAngst"], [14.0, -28.0, 3.5, 0.0])
    np.testing.assert_allclose(particles["rlnOriginYAngst"], [7.0, 0.0, -1.0, 28.0])
    assert particles["rlnImageName"].tolist() == table.particles["rlnImageName"].tolist()
    assert particles["rlnDefocusU"].tolist() == [12000.5, 13000.25, 14000.125, 15000.0]
    assert particles["rlnClassNumber"].tolist() == [1, 2, 1, 2]

    again = star_io.read_particles(out)          # the converted file reads back the same
    np.testing.assert_allclose(star_io.pixel_sizes(again), star_io.pixel_sizes(table))
    np.testing.assert_allclose(star_io.origins_px(again), star_io.origins_px(table))


def test_write_30_needs_image_size(tmp_path):
    table = star_io.read_particles(write_star_30(tmp_path / "old.star"))
    with pytest.raises(ValueError, match="image_size"):
        star_io.write_particles(tmp_path / "new.star", table, {})


# --- errors ------------------------------------------------------------------------------

def _no_image_name(path: Path) -> None:
    write_star_31(path, _particles_31().drop(columns=["rlnImageName"]))


def _empty(path: Path) -> None:
    write_star_31(path, _particles_31().iloc[:0])


def _unknown_group(path: Path) -> None:
    particles = _particles_31()
    particles.loc[2, "rlnOpticsGroup"] = 7
    write_star_31(path, particles)


def _no_pixel_size(path: Path) -> None:
    write_star_31(path, optics=_optics().drop(columns=["rlnImagePixelSize"]))


def _legacy_no_pixel_size(path: Path) -> None:
    starfile.write(pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnVoltage": [300.0]}), path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 this is not a star file\n")


def _optics_only(path: Path) -> None:
    starfile.write({"optics": _optics()}, path)


@pytest.mark.parametrize("make, message", [
    (_no_image_name, "no 'rlnImageName' column"),
    (_empty, "contains no particles"),
    (_unknown_group, r"optics group\(s\) \[7\]"),
    (_no_pixel_size, "no valid pixel size"),
    (_legacy_no_pixel_size, "no valid pixel size"),
    (_garbage, "STAR"),
    (_optics_only, "no particles block"),
])
def test_bad_star_files_raise_input_file_error(tmp_path, make, message):
    path = tmp_path / "bad_particles.star"
    make(path)
    with pytest.raises(InputFileError, match=re.escape(str(path)) + ".*" + message):
        star_io.read_particles(path)


def test_missing_star_file(tmp_path):
    path = tmp_path / "nope.star"
    with pytest.raises(InputFileError, match=re.escape(str(path)) + ".*not found"):
        star_io.read_particles(path)
