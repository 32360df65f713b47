"""CTF: RELION's formula, checked on known values and against relion_ctf_toolbox itself."""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryo_drvae.ctf import CtfParams, ctf_images, params_from_particles
from cryo_drvae.errors import InputFileError


def full_ctf(u: float, v: float, angle: float, **kw) -> np.ndarray:
    params = CtfParams.from_arrays([u], [v], [angle], **kw)
    return np.fft.fftshift(ctf_images(params, 64, 3.0, rfft=False)[0])


def test_zero_frequency_equals_amplitude_contrast():
    assert full_ctf(20000, 18000, 30)[32, 32] == pytest.approx(0.1, abs=1e-6)


def test_ninety_degree_phase_plate_gives_full_contrast_at_origin():
    ctf = full_ctf(5000, 5000, 0, phase_shift=90.0, amplitude_contrast=0.0)
    assert ctf[32, 32] == pytest.approx(1.0, abs=1e-6)


def test_astigmatism_angle_rotates_the_pattern():
    # with U along x (angle 0) the first zero comes later along x than along y
    ctf = full_ctf(25000, 15000, 0)
    along_x = np.argmax(np.sign(ctf[32, 33:]) != np.sign(ctf[32, 32]))
    along_y = np.argmax(np.sign(ctf[33:, 32]) != np.sign(ctf[32, 32]))
    assert along_x < along_y  # larger defocus oscillates faster
    rotated = full_ctf(25000, 15000, 90)
    assert np.allclose(rotated, ctf.T, atol=1e-5)


def test_bfactor_damps_high_frequencies():
    sharp, soft = full_ctf(20000, 20000, 0), full_ctf(20000, 20000, 0, bfactor=200.0)
    assert np.abs(soft[32, 60]) < 0.5 * np.abs(sharp[32, 60]) + 1e-6
    assert soft[32, 32] == pytest.approx(sharp[32, 32])


def test_vectorised_chunks_match_single_particles():
    params = CtfParams.from_arrays([12000, 20000, 24000], [11000, 19000, 23500], [10, 80, 170])
    batch = ctf_images(params, 32, 4.0, chunk=2)
    for i in range(3):
        assert np.array_equal(batch[i], ctf_images(params.subset([i]), 32, 4.0)[0])


def test_missing_ctf_column_names_the_file():
    table = pd.DataFrame({"rlnDefocusU": [1.0], "rlnDefocusV": [1.0]})
    with pytest.raises(InputFileError, match="particles.star.*rlnDefocusAngle"):
        params_from_particles(table, "particles.star")


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_ctf_toolbox") is None,
                    reason="RELION not installed: run `make install-relion`")
def test_matches_relion_ctf_toolbox(tmp_path):
    out = tmp_path / "ctf.mrc"
    subprocess.run(["relion_ctf_toolbox", "--simulate", str(out), "--angpix", "3", "--box", "64",
                    "--kV", "300", "--Q0", "0.1", "--Cs", "2.7", "--defU", "20000", "--defV", "18000",
                    "--defAng", "30"], check=True, capture_output=True)
    relion = mrcfile.read(out)
    ours = full_ctf(20000, 18000, 30)
    assert np.abs(relion - ours).max() < 1e-5
    flipped_angle = full_ctf(20000, 18000, -30)
    assert np.abs(relion - flipped_angle).max() > 0.1  # the test sees a convention error
