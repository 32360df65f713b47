"""CTF-corrected class averages: Wiener filtering of aligned, CTF-weighted particle sums.

``class_averages`` accumulates the full-size averages written at the end in one streaming pass
over the original stack (``average_sums``), and filters them with ``fourier.wiener_filter``
(``finish_averages``; the working-box references of the classification rounds use it too). The sums
of two sets of particles subtract, so averages without a few particles need only those re-read.
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
from .fourier import resolution_from_ssnr, shell_index, wiener_filter
from .preprocess import read_batch_size
from .progress import bar as tqdm
from .stack import ParticleStack

logger = logging.getLogger(__name__)


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
    sums = average_sums(stack, ctf_params, pixel_size, labels, psi_deg, shift_px, n_classes, batch_size,
                        particles, reduce, should_abort)
    return finish_averages(sums, np.bincount(labels, minlength=n_classes), noise_var, pixel_size)


def average_sums(stack: ParticleStack, ctf_params: CtfParams | None, pixel_size: float,
                 labels: NDArray, psi_deg: NDArray, shift_px: NDArray, n_classes: int,
                 batch_size: int | None = None, particles: NDArray | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
                 should_abort: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor, torch.Tensor]:
    """The aligned CTF-weighted sums and CTF^2 sums ``(K, B, B)`` of ``particles``, summed over ranks
    (sums of disjoint sets of particles add and subtract)."""
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
    return reduce(numerator), reduce(ctf2_sum)


def finish_averages(sums: tuple[torch.Tensor, torch.Tensor], counts: NDArray, noise_var: float,
                    pixel_size: float) -> tuple[NDArray, NDArray]:
    """Wiener-filtered averages ``(K, B, B)`` and resolutions ``(K,)`` from ``average_sums``;
    classes with ``counts`` 0 are blank, at 999 Å."""
    numerator, ctf2_sum = sums
    box = numerator.shape[-1]
    ctf2_half = torch.fft.ifftshift(ctf2_sum, dim=(-2, -1))[..., : box // 2 + 1]
    shells = torch.from_numpy(shell_index(box)).clamp(max=box // 2)
    spectra, ssnr = wiener_filter(torch.fft.rfft2(numerator, norm="ortho"), ctf2_half, noise_var, shells)
    # corners beyond Nyquist: the rotated CTF^2 is ~0 there, and 1/ctf2 blew single averages up to 1e8
    spectra[:, torch.from_numpy(shell_index(box) > box // 2)] = 0
    averages = torch.fft.irfft2(spectra, s=(box, box), norm="ortho")
    averages[torch.from_numpy(counts == 0)] = 0.0
    resolution = resolution_from_ssnr(ssnr, box, pixel_size)
    resolution[counts == 0] = 999.0
    return averages.numpy().astype(np.float32), resolution
