"""Fourier helpers: grids, shells, crops, low-pass, Wiener filter, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryo_drvae.fourier import (alignment_mask, band_crop, centred_radius, circular_mask, crop_spectrum,
                                fourier_crop, frequency_grid, frequency_radius, lowpass, resolution_from_ssnr,
                                rfft_weights, shell_index, shell_mean, shell_sum, wiener_filter)


def band_limited(box: int, size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    """``(n, box, box)`` float64 images with no frequency at or beyond ``size / 2`` along either axis."""
    noise = torch.randn(n, box, box, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ky, kx = (np.rint(k * box) for k in frequency_grid(box))      # integer cycles per box
    inside = torch.from_numpy((np.abs(ky) < size / 2) & (np.abs(kx) < size / 2))
    return torch.fft.irfft2(torch.fft.rfft2(noise) * inside, s=(box, box))


@pytest.mark.parametrize("box", [8, 9, 32, 33, 64])
def test_shells_of_the_weighted_power_sum_to_the_image_energy(box):
    """Parseval: every full-spectrum coefficient counted once by ``rfft_weights``."""
    images = torch.randn(4, box, box, generator=torch.Generator().manual_seed(box), dtype=torch.float64)
    power = torch.fft.rfft2(images, norm="ortho").abs() ** 2 * torch.from_numpy(rfft_weights(box)).double()
    shells = torch.from_numpy(shell_index(box))
    per_shell = shell_sum(power, shells, box // 2 + 1)
    assert per_shell.shape == (4, box // 2 + 1)
    torch.testing.assert_close(per_shell.sum(1), (images ** 2).sum(dim=(1, 2)), rtol=1e-12, atol=0)
    assert rfft_weights(box).sum() == box * box


def test_shell_index_and_frequency_grids():
    box = 32
    shells = shell_index(box)
    assert shells.shape == (box, box // 2 + 1)
    assert shells[0, 0] == 0 and shells[0, box // 2] == box // 2 and shells[box // 2, 0] == box // 2
    assert shells[1, 1] == 1 and shells[2, 2] == 3 and shells[-3, 4] == 5    # nearest shell; row -3 is -3
    np.testing.assert_array_equal(frequency_radius(box, rfft=False)[:, :box // 2 + 1], frequency_radius(box))
    ky, kx = frequency_grid(box, pixel_size=2.0, rfft=False)
    assert ky.shape == kx.shape == (box, box)
    assert kx[0, 1] == pytest.approx(1 / 64) and ky[1, 0] == pytest.approx(1 / 64) and ky[0, 1] == 0
    assert ky.min() == pytest.approx(-0.25)                    # Nyquist of 2 Å pixels


def test_shell_mean_of_a_constant_is_the_constant_and_counts_clamp_to_the_last_shell():
    box = 16
    shells = torch.from_numpy(shell_index(box))
    values = torch.full((2, box, box // 2 + 1), 3.0)
    torch.testing.assert_close(shell_mean(values, shells, box // 2 + 1), torch.full((2, box // 2 + 1), 3.0))
    counts = shell_sum(torch.ones(1, box, box // 2 + 1), shells, 4)[0]
    assert counts.sum() == box * (box // 2 + 1)                # shells 3 and up all counted in the last
    assert counts[0] == 1 and counts[3] == (shells >= 3).sum()


def test_fourier_crop_of_a_band_limited_image_keeps_it():
    """Cropping a band-limited image is exact resampling: the small image is the large one's every
    other pixel (``fourier_crop`` keeps values), and ``band_crop`` keeps its energy."""
    images = band_limited(64, 32)
    small = torch.fft.irfft2(fourier_crop(images, 32), s=(32, 32), norm="ortho")
    torch.testing.assert_close(small, images[:, ::2, ::2], rtol=0, atol=1e-10)
    unitary = band_crop(images, 32)
    torch.testing.assert_close((unitary ** 2).sum(dim=(1, 2)), (images ** 2).sum(dim=(1, 2)), rtol=1e-10, atol=0)
    torch.testing.assert_close(unitary, 2 * small)
    assert band_crop(images, 64) is images
    torch.testing.assert_close(fourier_crop(images, 64), torch.fft.rfft2(images, norm="ortho"))


def test_crop_spectrum_keeps_the_same_frequencies():
    box, size = 48, 16
    ky, kx = (torch.from_numpy(np.rint(k * box)) for k in frequency_grid(box, rfft=False))
    small_ky, small_kx = (torch.from_numpy(np.rint(k * size)) for k in frequency_grid(size, rfft=False))
    torch.testing.assert_close(crop_spectrum(ky[None], size)[0], small_ky, rtol=0, atol=0)
    torch.testing.assert_close(crop_spectrum(kx[None], size)[0], small_kx, rtol=0, atol=0)


@pytest.mark.parametrize("box,max_shell", [(32, 5), (33, 10), (64, 31)])
def test_lowpass_removes_the_shells_above_the_cut_and_keeps_the_rest(box, max_shell):
    images = torch.randn(3, box, box, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before, after = torch.fft.rfft2(images), torch.fft.rfft2(lowpass(images, max_shell))
    above = torch.from_numpy(shell_index(box) > max_shell)
    assert after[:, above].abs().max() < 1e-9 * before.abs().max()
    torch.testing.assert_close(after[:, ~above], before[:, ~above])
    assert before[:, above].abs().max() > 1.0                  # there was something to remove


@pytest.mark.parametrize("box,radius", [(64, 10.0), (64, 20.5), (65, 31.0)])
def test_circular_mask_is_a_centred_disc(box, radius):
    mask = circular_mask(box, radius)
    assert mask.shape == (box, box) and mask.dtype == np.bool_
    assert abs(mask.sum() / (np.pi * radius ** 2) - 1) < 0.02
    c, r = box // 2, int(radius)
    assert mask[c, c] and mask[c, c + r] and mask[c - r, c] and not mask[c, c + r + 1]
    np.testing.assert_array_equal(mask, mask.T)


def test_alignment_mask_and_centred_radius():
    np.testing.assert_array_equal(alignment_mask(32), circular_mask(32, 15))
    radius = centred_radius(32)
    assert radius[16, 16] == 0 and radius[16, 19] == 3 and radius[12, 13] == 5
    assert radius[0, 0] == pytest.approx(16 * 2 ** 0.5)


def test_wiener_filter_recovers_a_strong_signal_and_its_ssnr():
    box, noise_var = 16, 1e-6
    shells = torch.from_numpy(shell_index(box)).clamp(max=box // 2)
    truth = torch.fft.rfft2(torch.randn(2, box, box, generator=torch.Generator().manual_seed(2)), norm="ortho")
    ctf2 = torch.full((2, box, box // 2 + 1), 50.0)        # 50 members with |CTF| = 1
    spectra, ssnr = wiener_filter(ctf2 * truth, ctf2, noise_var, shells)
    assert ssnr.shape == (2, box // 2 + 1)
    torch.testing.assert_close(spectra, truth, rtol=1e-4, atol=1e-4)
    assert (ssnr > 1e4).all()
    _, weak = wiener_filter(ctf2 * truth * 1e-4, ctf2, noise_var, shells)
    assert (weak < ssnr).all()


def test_resolution_from_ssnr_is_the_first_shell_below_one():
    box, pixel = 32, 2.0
    ssnr = torch.full((3, box // 2 + 1), 10.0)
    ssnr[0, 5:] = 0.5                      # shells 1..4 above 1
    ssnr[2, 1:] = 0.5                      # none above 1
    resolution = resolution_from_ssnr(ssnr, box, pixel)
    np.testing.assert_allclose(resolution, [box * pixel / 4, 2 * pixel, 999.0])
