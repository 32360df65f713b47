"""CTF-corrected class averages: Wiener filtering of aligned, CTF-weighted particle sums.

``wiener_filter`` is shared by the working-box references of the classification rounds and by
the full-size class averages written at the end, which ``class_averages`` accumulates in one
streaming pass over the original stack.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from numpy.typing import NDArray

from .alignment import transform_images
from .ctf import CtfParams, ctf_images
from .errors import AbortRequested
from .preprocess import read_batch_size, shell_index, shell_mean, shell_sum
from .progress import bar as tqdm
from .stack import ParticleStack

logger = logging.getLogger(__name__)


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


def class_averages(stack: ParticleStack, ctf_params: CtfParams | None, pixel_size: float,
                   labels: NDArray, psi_deg: NDArray, shift_px: NDArray, n_classes: int,
                   noise_var: float, batch_size: int | None = None, particles: NDArray | None = None,
                   reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
                   should_abort: Callable[[], bool] = lambda: False) -> tuple[NDArray, NDArray]:
    """Full-size CTF-corrected averages ``(K, B, B)`` and resolutions ``(K,)`` in one streaming pass.

    ``labels``/``psi_deg``/``shift_px`` are per particle of the table (our pose convention, shifts
    in original pixels). Only ``particles`` (default: all) are read here; ``reduce`` sums the
    partial sums over ranks.
    """
    box = stack.box_size
    batch_size = batch_size or read_batch_size(box, most=512)   # ~8 full-size arrays per batch
    numerator = torch.zeros(n_classes, box, box)
    ctf2_sum = torch.zeros(n_classes, box, box)
    chosen = np.arange(stack.n_particles) if particles is None else particles
    for index, images in tqdm(stack.iter_batches(batch_size, chosen), desc="class averages",
                              total=-(-len(chosen) // batch_size), disable=None, leave=False):
        spectrum = torch.fft.rfft2(torch.from_numpy(images), norm="ortho")
        if ctf_params is None:
            ctf = torch.ones(len(index), box, box)
        else:
            ctf = torch.from_numpy(ctf_images(ctf_params.subset(index), box, pixel_size, rfft=False))
        weighted = torch.fft.irfft2(spectrum * ctf[..., : box // 2 + 1], s=(box, box), norm="ortho")
        psi = torch.from_numpy(psi_deg[index])
        shift = torch.from_numpy(shift_px[index])
        aligned = transform_images(weighted, psi, shift, to_reference=True)
        # the CTF^2 rotates with the particle; its centre (zero frequency) does not shift
        centred = torch.fft.fftshift(ctf ** 2, dim=(-2, -1))
        rotated = transform_images(centred, psi, torch.zeros_like(shift), to_reference=True)
        group = torch.from_numpy(labels[index])
        numerator.index_add_(0, group, aligned)
        ctf2_sum.index_add_(0, group, rotated)
        if should_abort():
            raise AbortRequested("abort requested while averaging classes")
    numerator, ctf2_sum = reduce(numerator), reduce(ctf2_sum)
    ctf2_half = torch.fft.ifftshift(ctf2_sum, dim=(-2, -1))[..., : box // 2 + 1]
    shells = torch.from_numpy(shell_index(box)).clamp(max=box // 2)
    spectra, ssnr = wiener_filter(torch.fft.rfft2(numerator, norm="ortho"), ctf2_half, noise_var, shells)
    # corners beyond Nyquist: the rotated CTF^2 is ~0 there, and 1/ctf2 blew single averages up to 1e8
    spectra[:, torch.from_numpy(shell_index(box) > box // 2)] = 0
    averages = torch.fft.irfft2(spectra, s=(box, box), norm="ortho")
    counts = np.bincount(labels, minlength=n_classes)
    averages[torch.from_numpy(counts == 0)] = 0.0
    resolution = resolution_from_ssnr(ssnr, box, pixel_size)
    resolution[counts == 0] = 999.0
    return averages.numpy().astype(np.float32), resolution
