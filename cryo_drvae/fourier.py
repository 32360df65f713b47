"""Fourier-space maths shared by the data path: frequency grids, shells, crops, filters, masks.

Grids follow ``numpy.fft`` (x along columns, y along rows, zero frequency at ``[0, 0]``); real-space
masks are centred on ``box // 2``. Spectra are ``norm="ortho"`` rffts, ``(W, W//2+1)`` per image, so
white noise has the same variance per pixel and per Fourier component. This module imports nothing
from the package: every other module may use it.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray


# ---- grids and masks -----------------------------------------------------------------------

def frequency_grid(box_size: int, pixel_size: float = 1.0, rfft: bool = True) -> tuple[NDArray, NDArray]:
    """Spatial frequencies (1/Å, or cycles/px) ``(ky, kx)``, each ``(box, box//2+1)`` or ``(box, box)``."""
    ky = np.fft.fftfreq(box_size, d=pixel_size)
    kx = np.fft.rfftfreq(box_size, d=pixel_size) if rfft else ky
    return np.meshgrid(ky, kx, indexing="ij")


def frequency_radius(box_size: int, rfft: bool = True) -> NDArray[np.float64]:
    """``|k|`` in cycles per box of each FFT coefficient, ``(box, box//2+1)`` or ``(box, box)``."""
    ky, kx = frequency_grid(box_size, rfft=rfft)
    return np.hypot(ky * box_size, kx * box_size)


def shell_index(box_size: int) -> NDArray[np.int64]:
    """Integer Fourier shell of each rfft coefficient, ``(W, W//2+1)``."""
    return np.rint(frequency_radius(box_size)).astype(np.int64)


def rfft_weights(box_size: int) -> NDArray[np.float32]:
    """Multiplicity of each rfft coefficient in the full spectrum (1 or 2), ``(W, W//2+1)``."""
    weights = np.full((box_size, box_size // 2 + 1), 2.0, dtype=np.float32)
    weights[:, 0] = 1.0
    if box_size % 2 == 0:
        weights[:, -1] = 1.0
    return weights


def centred_radius(box_size: int) -> NDArray[np.float64]:
    """``(box, box)`` distance in px from the centre ``box // 2``."""
    coords = np.arange(box_size) - box_size // 2
    return np.hypot(coords[None, :], coords[:, None])


def circular_mask(box_size: int, radius: float) -> NDArray[np.bool_]:
    """Boolean ``(box, box)`` disc of ``radius`` pixels around the centre ``box // 2``."""
    coords = np.arange(box_size) - box_size // 2
    return (coords[None, :] ** 2 + coords[:, None] ** 2) <= radius ** 2


def alignment_mask(box_size: int) -> NDArray[np.bool_]:
    """The disc images are aligned and scored inside: radius ``box/2 - 1``."""
    return circular_mask(box_size, box_size / 2 - 1)


# ---- crops -----------------------------------------------------------------------------------

def fourier_crop(images: torch.Tensor, working_box: int) -> torch.Tensor:
    """``(n, B, B)`` real images -> ``(n, W, W//2+1)`` ortho rfft of the W-box version."""
    box = images.shape[-1]
    spectrum = torch.fft.rfft2(images, norm="ortho")
    if working_box == box:
        return spectrum
    half = working_box // 2
    rows = torch.cat([spectrum[:, :half], spectrum[:, box - half:]], dim=1)
    # ortho scaling keeps white-noise variance; the factor keeps image values comparable
    return rows[:, :, :half + 1] * (working_box / box)


def band_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, B, B)`` real images on a ``size`` box with the same low frequencies, unitary (unlike
    :func:`fourier_crop`'s values-keeping factor): energies and eigenvalues are kept."""
    box = images.shape[-1]
    if size == box:
        return images
    return torch.fft.irfft2(fourier_crop(images, size) * (box / size), s=(size, size), norm="ortho")


def crop_spectrum(full: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, B, B)`` values on the unshifted full FFT grid -> the same frequencies on a ``size`` grid."""
    box = full.shape[-1]
    if size == box:
        return full
    keep = torch.from_numpy(np.r_[0:size // 2, box - size // 2:box])
    return full[:, keep][:, :, keep]


# ---- shells and filters ----------------------------------------------------------------------

def shell_sum(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Sum of ``(n, H, W')`` values per integer Fourier shell (shells above the last clamped)."""
    flat = values.reshape(values.shape[0], -1)
    index = shells.reshape(-1).clamp(max=n_shells - 1)
    return torch.zeros(values.shape[0], n_shells, dtype=flat.dtype).index_add_(1, index, flat)


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Mean of ``(n, H, W')`` values per integer Fourier shell -> ``(n, n_shells)``."""
    counts = torch.bincount(shells.reshape(-1).clamp(max=n_shells - 1), minlength=n_shells).clamp(min=1)
    return shell_sum(values, shells, n_shells) / counts


def lowpass(images: torch.Tensor, max_shell: int) -> torch.Tensor:
    """``(n, W, W)`` images with Fourier shells above ``max_shell`` removed."""
    box = images.shape[-1]
    keep = torch.from_numpy(shell_index(box) <= max_shell).float()
    return torch.fft.irfft2(torch.fft.rfft2(images, norm="ortho") * keep, s=(box, box), norm="ortho")


def wiener_filter(numerator: torch.Tensor, ctf2: torch.Tensor, noise_var: float,
                  shells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wiener estimate of class spectra and their spectral SNR.

    Parameters
    ----------
    numerator : (K, H, W') complex, ortho rfft of the aligned sums of CTF-weighted particles.
    ctf2 : (K, H, W') summed squared CTFs of the members.
    noise_var : per-pixel (and per ortho Fourier component) noise variance.
    shells : (H, W') integer shell of each coefficient.

    Returns
    -------
    spectra : (K, H, W') complex filtered spectra.
    ssnr : (K, n_shells) spectral signal-to-noise ratio of each class average per shell.
    """
    n_shells = int(shells.max()) + 1
    # E|numerator|^2 = tau2 ctf2^2 + noise_var ctf2 per coefficient: a least-squares tau2 per shell,
    # in which coefficients near CTF zeros weigh little (dividing by ctf2 first let one such
    # coefficient of a one-particle class blow its average up by 1e10)
    power = shell_sum(numerator.abs() ** 2 - noise_var * ctf2, shells, n_shells)
    tau2 = (power / shell_sum(ctf2 ** 2, shells, n_shells).clamp(min=1e-12)).clamp(min=1e-10)  # signal power
    spectra = numerator / (ctf2 + noise_var / tau2[:, shells])
    ssnr = tau2 * shell_mean(ctf2, shells, n_shells) / noise_var
    return spectra, ssnr


def resolution_from_ssnr(ssnr: torch.Tensor, box_size: int, pixel_size: float) -> NDArray:
    """Resolution (Å) per class: the first shell whose SSNR falls below 1 (999 if none above)."""
    out = np.full(ssnr.shape[0], 999.0)
    for k, row in enumerate(ssnr.numpy()):
        good = np.nonzero(row[1:box_size // 2 + 1] < 1.0)[0]
        last = (good[0] if len(good) else box_size // 2)      # shells 1..last are above 1
        if last >= 1:
            out[k] = box_size * pixel_size / last
    return out
