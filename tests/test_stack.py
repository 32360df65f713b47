"""Tests for cryo_drvae.stack: lazy reads, path resolution, and each bad-input error."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryo_drvae import stack as stack_module
from cryo_drvae.errors import InputFileError
from cryo_drvae.stack import ParticleStack
from cryo_drvae.star_io import ParticleTable, read_particles

BOX = 8


def write_mrcs(path: Path, images: np.ndarray, apix: float = 1.5) -> Path:
    """A float32 image stack as RELION writes it (ispg 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)   # header stats of NaN test data
        mrc.set_data(np.ascontiguousarray(images, dtype=np.float32))
        mrc.header.ispg = 0
        mrc.voxel_size = apix
    return path


def write_star(path: Path, image_names: list[str]) -> Path:
    """A RELION 3.1 particles STAR file listing ``image_names``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [1.5], "rlnImageSize": [BOX],
                           "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({"rlnImageName": image_names,
                              "rlnOpticsGroup": [1] * len(image_names)})
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def images(n: int, seed: int, box: int = BOX) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


@pytest.fixture
def project(tmp_path):
    """Project folder with two stacks (5 and 3 images) and a STAR file at its root.

    Particle order in the STAR interleaves the stacks: a1 a2 b1 a3 b3 a5 b2 a4.
    """
    root = tmp_path / "project"
    a, b = images(5, 1), images(3, 2)
    write_mrcs(root / "Extract/job005/mic_a.mrcs", a)
    write_mrcs(root / "Extract/job005/mic_b.mrcs", b)
    order = [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 3), ("a", 5), ("b", 2), ("a", 4)]
    names = [f"{s:06d}@Extract/job005/mic_{m}.mrcs" for m, s in order]
    star = write_star(root / "particles.star", names)
    expected = np.stack([(a if m == "a" else b)[s - 1] for m, s in order])
    return root, star, expected


def _table(star: Path) -> ParticleTable:
    return read_particles(star)


# --- reading -----------------------------------------------------------------------------

def test_read_arbitrary_order_returns_exact_images(project, monkeypatch):
    root, star, expected = project
    monkeypatch.chdir(root)
    with ParticleStack.from_table(_table(star)) as stack:
        assert stack.n_particles == 8 and stack.box_size == BOX
        order = np.array([7, 0, 3, 3, 5, 2, 6, 1, 4])
        got = stack.read(order)
        assert got.dtype == np.float32 and got.shape == (9, BOX, BOX)
        np.testing.assert_array_equal(got, expected[order])
        assert stack.read(np.array([], dtype=int)).shape == (0, BOX, BOX)


def test_read_returns_copies_not_views(project, monkeypatch):
    root, star, expected = project
    monkeypatch.chdir(root)
    with ParticleStack.from_table(_table(star)) as stack:
        first = stack.read([0, 1])
        first[:] = 0
        np.testing.assert_array_equal(stack.read([0, 1]), expected[[0, 1]])


def test_iter_batches_covers_all_particles_in_file_order(project, monkeypatch):
    root, star, expected = project
    monkeypatch.chdir(root)
    with ParticleStack.from_table(_table(star)) as stack:
        batches = list(stack.iter_batches(3))
    assert [len(idx) for idx, _ in batches] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate([idx for idx, _ in batches]), np.arange(8))
    np.testing.assert_array_equal(np.concatenate([img for _, img in batches]), expected)


def test_few_open_files_and_reopen_after_close(project, monkeypatch):
    root, star, expected = project
    monkeypatch.chdir(root)
    monkeypatch.setattr(stack_module, "MAX_OPEN_STACKS", 1)
    stack = ParticleStack.from_table(_table(star))
    np.testing.assert_array_equal(stack.read(np.arange(8)), expected)
    assert len(stack._open) == 1
    stack.close()
    assert len(stack._open) == 0
    np.testing.assert_array_equal(stack.read([5, 2]), expected[[5, 2]])
    stack.close()


def test_location_and_plain_name_without_slice(tmp_path, monkeypatch):
    single = images(1, 3)[0]
    write_mrcs(tmp_path / "single.mrc", single)
    star = write_star(tmp_path / "p.star", ["single.mrc"])
    monkeypatch.chdir(tmp_path)
    with ParticleStack.from_table(_table(star)) as stack:
        np.testing.assert_array_equal(stack.read([0])[0], single)
        assert stack.location(0).slice_index == 0
        assert stack.location(0).relion_name() == f"000001@{tmp_path / 'single.mrc'}"


# --- path resolution ---------------------------------------------------------------------

def test_paths_resolve_against_data_dir(project, tmp_path, monkeypatch):
    root, star, expected = project
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved_star = elsewhere / "moved.star"          # no stacks beside it
    moved_star.write_bytes(star.read_bytes())
    monkeypatch.chdir(elsewhere)
    with ParticleStack.from_table(_table(moved_star), data_dir=root) as stack:
        np.testing.assert_array_equal(stack.read(np.arange(8)), expected)


def test_paths_resolve_against_cwd(project, monkeypatch):
    root, star, expected = project
    sub = root / "Select/job007/particles.star"    # its own folder has no Extract/
    sub.parent.mkdir(parents=True)
    sub.write_bytes(star.read_bytes())
    monkeypatch.chdir(root)
    with ParticleStack.from_table(_table(sub)) as stack:
        assert stack.location(2).stack_path == root / "Extract/job005/mic_b.mrcs"
        np.testing.assert_array_equal(stack.read(np.arange(8)), expected)


def test_paths_fall_back_to_star_folder(project, tmp_path, monkeypatch):
    root, star, expected = project
    monkeypatch.chdir(tmp_path)                    # cwd has no Extract/
    with ParticleStack.from_table(_table(star)) as stack:
        np.testing.assert_array_equal(stack.read(np.arange(8)), expected)


# --- errors ------------------------------------------------------------------------------

def test_missing_stacks_reported_once(tmp_path, monkeypatch):
    write_mrcs(tmp_path / "in" / "present.mrcs", images(1, 4))
    names = ["1@present.mrcs"] + [f"1@gone_{i}.mrcs" for i in range(4)]
    star = write_star(tmp_path / "in" / "p.star", names)
    monkeypatch.chdir(tmp_path / "in")
    with pytest.raises(InputFileError) as info:
        ParticleStack.from_table(_table(star))
    message = str(info.value)
    assert "4 of 5 image stacks not found" in message
    assert "gone_0.mrcs" in message and "gone_2.mrcs" in message
    assert "gone_3.mrcs" not in message            # only the first three are listed
    assert str(tmp_path / "in") in message and "--data_dir" in message


def test_truncated_stack(tmp_path, monkeypatch):
    path = write_mrcs(tmp_path / "cut.mrcs", images(4, 5))
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 50)
    star = write_star(tmp_path / "p.star", ["1@cut.mrcs"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputFileError, match=r"cut\.mrcs: truncated.*re-run extraction"):
        ParticleStack.from_table(_table(star))


def test_not_an_mrc_file(tmp_path, monkeypatch):
    (tmp_path / "junk.mrcs").write_bytes(b"not an mrc file")
    star = write_star(tmp_path / "p.star", ["1@junk.mrcs"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputFileError, match=r"junk\.mrcs: not a readable MRC stack"):
        ParticleStack.from_table(_table(star))


def test_slice_beyond_stack_length(tmp_path, monkeypatch):
    write_mrcs(tmp_path / "short.mrcs", images(3, 6))
    star = write_star(tmp_path / "p.star", ["1@short.mrcs", "4@short.mrcs"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputFileError, match=r"short\.mrcs: .*image 4 .*holds 3 images"):
        ParticleStack.from_table(_table(star))


@pytest.mark.parametrize("bad_name", ["0@a.mrcs", "x@a.mrcs", "1@"])
def test_malformed_image_name(tmp_path, monkeypatch, bad_name):
    write_mrcs(tmp_path / "a.mrcs", images(2, 6))
    star = write_star(tmp_path / "p.star", ["1@a.mrcs", bad_name])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputFileError, match=r"p\.star: row 2 .*rlnImageName"):
        ParticleStack.from_table(_table(star))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_pixel_raises_on_read(tmp_path, monkeypatch, bad_value):
    data = images(3, 7)
    data[1, 2, 3] = bad_value
    write_mrcs(tmp_path / "nan.mrcs", data)
    star = write_star(tmp_path / "p.star", ["1@nan.mrcs", "2@nan.mrcs", "3@nan.mrcs"])
    monkeypatch.chdir(tmp_path)
    with ParticleStack.from_table(_table(star)) as stack:
        np.testing.assert_array_equal(stack.read([0, 2]), data[[0, 2]])
        with pytest.raises(InputFileError, match=r"nan\.mrcs: image 2 .*NaN/Inf"):
            stack.read([2, 1])


def test_non_square_images(tmp_path, monkeypatch):
    write_mrcs(tmp_path / "rect.mrcs", np.zeros((2, 8, 6), dtype=np.float32))
    star = write_star(tmp_path / "p.star", ["1@rect.mrcs"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputFileError, match=r"rect\.mrcs: images are 6x8 px.*square"):
        ParticleStack.from_table(_table(star))


def test_mixed_box_sizes(tmp_path, monkeypatch):
    write_mrcs(tmp_path / "box8.mrcs", images(2, 8, box=8))
    write_mrcs(tmp_path / "box10.mrcs", images(2, 9, box=10))
    star = write_star(tmp_path / "p.star", ["1@box8.mrcs", "1@box10.mrcs"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputFileError,
                       match=r"box10\.mrcs: box size 10 px .* 8 px in .*box8\.mrcs.*one box size"):
        ParticleStack.from_table(_table(star))


def test_star_without_image_name(tmp_path):
    star = tmp_path / "noimg.star"
    write_star(star, ["1@a.mrcs"])
    table = _table_without_image_name(star)
    with pytest.raises(InputFileError, match=r"noimg\.star.*rlnImageName"):
        ParticleStack.from_table(table)
    frame = starfile.read(star)
    frame["particles"] = frame["particles"].drop(columns=["rlnImageName"])
    starfile.write(frame, star)
    with pytest.raises(InputFileError, match=r"noimg\.star.*rlnImageName"):
        read_particles(star)


def _table_without_image_name(star: Path) -> ParticleTable:
    table = read_particles(star)
    return ParticleTable(table.path, table.particles.drop(columns=["rlnImageName"]),
                         table.optics)


def test_empty_star(tmp_path):
    star = write_star(tmp_path / "empty.star", [])
    with pytest.raises(InputFileError, match=r"empty\.star.*no particles"):
        read_particles(star)


def test_iter_batches_rejects_zero(project, monkeypatch):
    root, star, _ = project
    monkeypatch.chdir(root)
    with ParticleStack.from_table(_table(star)) as stack:
        with pytest.raises(ValueError, match="batch_size"):
            next(stack.iter_batches(0))


def test_stack_is_picklable_without_open_files(project, monkeypatch):
    import pickle

    root, star, expected = project
    monkeypatch.chdir(root)
    with ParticleStack.from_table(_table(star)) as stack:
        stack.read([0])
        clone = pickle.loads(pickle.dumps(stack))
    np.testing.assert_array_equal(clone.read([4, 0]), expected[[4, 0]])
    clone.close()
    assert os.fspath(clone.location(0).stack_path).endswith("mic_a.mrcs")
