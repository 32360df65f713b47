"""Working images: Fourier-cropped, noise-whitened and CTF-prepared particles.

One streaming pass over the stack produces, per particle and at a small working box:
the phase-flipped image (DRVAE input), the image multiplied by its effective CTF (for exact
CTF-aware alignment scores) and the radial profile of the squared effective CTF (for
likelihood norms and Wiener filtering). All FFTs use ``norm="ortho"`` so that white noise has
the same variance per pixel and per Fourier component.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from .alignment import circular_mask
from .ctf import CtfParams, ctf_images
from .errors import AbortRequested
from .stack import ParticleStack

logger = logging.getLogger(__name__)

TARGET_NYQUIST_A = 12.0   # working resolution limit for classification (Å)
NOISE_SAMPLE = 2000       # particles used to estimate the noise spectrum


@dataclass
class WorkingSet:
    """Prepared particles at the working box ``W`` (tensors on the CPU)."""

    flipped: torch.Tensor        # (n, W, W) whitened, CTF phase-flipped
    ctf_weighted: torch.Tensor   # (n, W, W) whitened, multiplied by the effective CTF
    ctf2_shells: torch.Tensor    # (n, S) mean squared effective CTF per Fourier shell
    box_size: int                # W
    pixel_size: float            # Å/px at W
    scale: float                 # original box / W
    noise_var: float             # per-pixel noise variance after whitening
    particle_radius: float       # px at W

    def __len__(self) -> int:
        return self.flipped.shape[0]


def choose_working_box(box_size: int, pixel_size: float, requested: int = 0) -> int:
    """Requested box, or the multiple of 8 giving a Nyquist near 12 Å, within [32, 64] and <= box."""
    if requested:
        return min(box_size, requested - requested % 8)
    natural = box_size * pixel_size / (TARGET_NYQUIST_A / 2.0)
    return int(min(box_size - box_size % 8, max(32, min(64, 8 * round(natural / 8)))))


def shell_index(box_size: int) -> NDArray[np.int64]:
    """Integer Fourier shell of each rfft coefficient, ``(W, W//2+1)``."""
    ky = np.fft.fftfreq(box_size) * box_size
    kx = np.fft.rfftfreq(box_size) * box_size
    return np.rint(np.hypot(ky[:, None], kx[None, :])).astype(np.int64)


def rfft_weights(box_size: int) -> NDArray[np.float32]:
    """Multiplicity of each rfft coefficient in the full spectrum (1 or 2), ``(W, W//2+1)``."""
    weights = np.full((box_size, box_size // 2 + 1), 2.0, dtype=np.float32)
    weights[:, 0] = 1.0
    if box_size % 2 == 0:
        weights[:, -1] = 1.0
    return weights


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


def shell_sum(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Sum of ``(n, H, W')`` values per integer Fourier shell (shells above the last clamped)."""
    flat = values.reshape(values.shape[0], -1)
    index = shells.reshape(-1).clamp(max=n_shells - 1)
    return torch.zeros(values.shape[0], n_shells, dtype=flat.dtype).index_add_(1, index, flat)


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Mean of ``(n, H, W')`` values per integer Fourier shell -> ``(n, n_shells)``."""
    counts = torch.bincount(shells.reshape(-1).clamp(max=n_shells - 1), minlength=n_shells).clamp(min=1)
    return shell_sum(values, shells, n_shells) / counts


def estimate_noise_spectrum(stack: ParticleStack, working_box: int, radius: float,
                            rng: np.random.Generator) -> torch.Tensor:
    """Radial noise power ``(S,)`` from the background (outside the particle) of a sample."""
    n = stack.n_particles
    sample = np.sort(rng.choice(n, size=min(n, NOISE_SAMPLE), replace=False))
    images = torch.from_numpy(stack.read(sample))
    small = torch.fft.irfft2(fourier_crop(images, working_box), s=(working_box,) * 2, norm="ortho")
    background = torch.from_numpy(~circular_mask(working_box, radius)).float()
    small = (small - small.mean(dim=(1, 2), keepdim=True)) * background
    power = torch.fft.rfft2(small, norm="ortho").abs() ** 2 / background.mean()
    n_shells = working_box // 2 + 1
    shells = torch.from_numpy(shell_index(working_box))
    spectrum = shell_mean(power, shells, n_shells).mean(0)
    return spectrum.clamp(min=float(spectrum.max()) * 1e-3)


def prepare_working_set(stack: ParticleStack, ctf_params: CtfParams | None, pixel_size: float,
                        particle_diameter: float, working_box: int, rng: np.random.Generator,
                        batch_size: int = 2048,
                        should_abort: Callable[[], bool] = lambda: False) -> WorkingSet:
    """Read every particle once and build the :class:`WorkingSet` (``ctf_params`` None = no CTF)."""
    box = stack.box_size
    scale = box / working_box
    work_pixel = pixel_size * scale
    radius = min(working_box / 2 - 1, particle_diameter / 2 / work_pixel + 1)
    n_shells = working_box // 2 + 1
    shells_np = shell_index(working_box)
    shells = torch.from_numpy(shells_np)
    noise = estimate_noise_spectrum(stack, working_box, radius, rng)
    whitening = (1.0 / torch.sqrt(noise / noise.mean()))[shells.clamp(max=n_shells - 1)]
    n = stack.n_particles
    flipped = torch.empty(n, working_box, working_box)
    weighted = torch.empty(n, working_box, working_box)
    ctf2_shells = torch.empty(n, n_shells)
    for index, images in tqdm(stack.iter_batches(batch_size), desc="reading particles",
                              total=math.ceil(n / batch_size), disable=None, leave=False):
        spectrum = fourier_crop(torch.from_numpy(images), working_box) * whitening
        if ctf_params is None:
            ctf = torch.ones(len(index), *whitening.shape)
        else:
            ctf = torch.from_numpy(ctf_images(ctf_params.subset(index), working_box, work_pixel))
        effective = ctf * whitening
        size = (working_box, working_box)
        flipped[index] = torch.fft.irfft2(spectrum * torch.sign(ctf), s=size, norm="ortho")
        weighted[index] = torch.fft.irfft2(spectrum * effective, s=size, norm="ortho")
        ctf2_shells[index] = shell_mean(effective ** 2, shells, n_shells)
        if should_abort():
            raise AbortRequested("abort requested while reading particles")
    background = torch.from_numpy(~circular_mask(working_box, radius))
    noise_var = float(flipped[:, background].var())
    logger.info("prepared %d particles at a %d px working box (%.2f Å/px), noise variance %.3f",
                n, working_box, work_pixel, noise_var)
    return WorkingSet(flipped, weighted, ctf2_shells, working_box, work_pixel, scale, noise_var, radius)
