"""Per-particle screening: does each particle look like its class average at its pose?

A class-level choice keeps or drops whole classes, but aggregates and broken particles carry a real
view and join its class. Three tests per particle, against its own class average placed at its pose
and multiplied by its CTF (the prediction ``p``):

* **amplitude**: the least-squares scale ``a = <x, p> / <p, p>`` of the prediction in the particle
  ``x``. A broken particle holds only part of the view, so ``a`` is low (empty ice: about 0).
* **worst half**: the same scale on each half of the prediction, cut through the particle's centre
  in ``N_HALVES`` directions; the lowest (standardised) one. A cut or bitten particle lacks most
  of one half, which the whole-image amplitude dilutes.
* **excess**: the residual ``x - a p`` weighted in Fourier space by the particle's CTF^2 times the
  class average's power per shell (a matched filter for more of the same protein). A neighbour of an
  aggregate adds such power; noise alone does not.

Each statistic is divided by its noise sd (from the noise variance and the prediction), then
centred and scaled per class by a trimmed estimate of its members' mean and sd
(``trimmed_centre_scale``), so the test adapts to each class's fit and to coloured noise; a class
of fewer than ``MIN_CLASS_FOR_OWN_SCALE`` members uses the scale pooled over all particles. The evidence of a bad fit is
``max(-z_amplitude, -z_worst_half, z_excess)``, and the figure of merit written as
``rlnParticleFigureOfMerit`` is its tail probability over the three tests,
``min(1, 3 Phi(-evidence))``: 1 for a typical member, about 0.01 for a particle that a good
member matches in 1 of 100 cases.

>>> fit = measure_fit(stack, ctf, pixel_size, labels, psi, shift, averages, noise_var, radius_px)
>>> fom = figure_of_merit(fit, labels, n_classes)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from scipy.special import ndtr

from . import star_io
from .alignment import ORIGIN_SIGN, PSI_SIGN, transform_images
from .ctf import CtfParams, ctf_images, params_from_particles
from .fourier import circular_mask, rfft_weights, shell_index, shell_mean
from .normalise import background_radius
from .preprocess import read_batch_size
from .progress import bar as tqdm
from .stack import ParticleStack
from .star_io import ParticleTable

#: Classes with fewer members than this take the scale of the statistics pooled over all particles.
MIN_CLASS_FOR_OWN_SCALE = 20
#: ``select``'s default: particles with a figure of merit below this are dropped from kept classes.
DEFAULT_MIN_FOM = 0.01
MAD_TO_SD = 1.4826
#: Directions of the half-plane cuts of the worst-half test.
N_HALVES = 8
N_TESTS = 3
#: Values beyond this many sd are left out when the bulk's mean and sd are re-estimated.
TRIM_CUT = 2.5
# sd of a standard normal truncated at +-TRIM_CUT
_TRUNCATED_SD = float(np.sqrt(1 - 2 * TRIM_CUT * np.exp(-TRIM_CUT ** 2 / 2) / np.sqrt(2 * np.pi) / (2 * ndtr(TRIM_CUT) - 1)))


@dataclass(frozen=True)
class ParticleFit:
    """Per particle (input row order): the three statistics in units of their noise sd."""

    amplitude: NDArray[np.float64]     # (n,) a / sd(a)
    excess: NDArray[np.float64]        # (n,) (residual band power - noise) / its noise sd
    halves: NDArray[np.float64]        # (n, N_HALVES) a / sd(a) on each half of the prediction


def measure_fit(stack: ParticleStack, ctf_params: CtfParams | None, pixel_size: float, labels: NDArray,
                psi_deg: NDArray, shift_px: NDArray, averages: NDArray, noise_var: float, radius_px: float,
                batch_size: int | None = None, particles: NDArray | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] = lambda values: values) -> ParticleFit:
    """The three statistics for ``particles`` (default all) in one streaming pass over the stack.

    Poses are in our convention with shifts in original pixels, as ``averaging.class_averages``
    takes them; ``averages`` ``(K, B, B)`` are the CTF-corrected class averages. ``reduce`` sums the
    per-particle arrays over ranks (each rank fills its own particles).
    """
    box = stack.box_size
    refs = torch.from_numpy(averages * circular_mask(box, radius_px)[None].astype(np.float32))
    mult = torch.from_numpy(rfft_weights(box))
    shells = torch.from_numpy(shell_index(box)).clamp(max=box // 2)
    power = shell_mean(torch.fft.rfft2(refs, norm="ortho").abs() ** 2, shells, box // 2 + 1)[:, shells]
    amplitude = torch.zeros(stack.n_particles, dtype=torch.float64)
    excess = torch.zeros(stack.n_particles, dtype=torch.float64)
    halves = torch.zeros(stack.n_particles, N_HALVES, dtype=torch.float64)
    chosen = np.arange(stack.n_particles) if particles is None else particles
    batch_size = batch_size or read_batch_size(box, most=512)
    for index, images in tqdm(stack.iter_batches(batch_size, chosen), desc="screening particles",
                              total=-(-len(chosen) // batch_size), disable=None, leave=False):
        group = torch.from_numpy(labels[index])
        placed = transform_images(refs[group], torch.from_numpy(psi_deg[index]),
                                  torch.from_numpy(shift_px[index]))
        ctf = (torch.ones(len(index), box, box // 2 + 1) if ctf_params is None else
               torch.from_numpy(ctf_images(ctf_params.subset(index), box, pixel_size)))
        predicted = torch.fft.rfft2(placed, norm="ortho") * ctf
        observed = torch.fft.rfft2(torch.from_numpy(images), norm="ortho")
        a_stat, e_stat = _fit_statistics(observed, predicted, ctf ** 2 * power[group], mult, noise_var)
        rows = torch.from_numpy(index)
        amplitude[rows], excess[rows] = a_stat, e_stat
        halves[rows] = _half_statistics(torch.from_numpy(images), torch.fft.irfft2(predicted, s=(box, box), norm="ortho"),
                                        torch.from_numpy(shift_px[index]), noise_var)
    return ParticleFit(reduce(amplitude).numpy(), reduce(excess).numpy(), reduce(halves).numpy())


def _half_statistics(images: torch.Tensor, predicted: torch.Tensor, centres: torch.Tensor,
                     noise_var: float) -> torch.Tensor:
    """``(b, N_HALVES)``: ``<x, p m> / (sigma ||p m||)`` for the half planes ``m`` through each
    particle's centre (real space; ``centres`` ``(b, 2)`` x, y px from the box centre). Sums are
    taken once per angular sector of ``180 / N_HALVES`` degrees around the centre; a half plane is
    ``N_HALVES`` consecutive sectors."""
    b, box = images.shape[0], images.shape[-1]
    coords = torch.arange(box, dtype=torch.float32) - box // 2
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.atan2(gy[None] - centres[:, 1, None, None].float(), gx[None] - centres[:, 0, None, None].float())
    n_sectors = 2 * N_HALVES
    sector = ((angle + np.pi) * (n_sectors / (2 * np.pi))).long().clamp_(0, n_sectors - 1).reshape(b, -1)
    products = torch.stack([(images.float() * predicted.float()).reshape(b, -1),
                            (predicted.float() ** 2).reshape(b, -1)])                 # (2, b, box^2)
    sums = torch.zeros(2, b, n_sectors).scatter_add_(2, sector.expand(2, -1, -1), products)
    cross, energy = (sums @ _half_plane_sectors()).unbind(0)                           # (b, N_HALVES) each
    return (cross / torch.sqrt(energy.clamp(min=1e-12) * noise_var)).double()


def _half_plane_sectors() -> torch.Tensor:
    """``(2 N_HALVES, N_HALVES)`` 0/1: the sectors (from -180 degrees, counter-clockwise) of each
    half plane, half h facing ``h * 360 / N_HALVES`` degrees."""
    n_sectors = 2 * N_HALVES
    member = torch.zeros(n_sectors, N_HALVES)
    for h in range(N_HALVES):
        member[(2 * h + N_HALVES // 2 + torch.arange(N_HALVES)) % n_sectors, h] = 1.0
    return member


def _fit_statistics(observed: torch.Tensor, predicted: torch.Tensor, band: torch.Tensor, mult: torch.Tensor,
                    noise_var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``a / sd(a)`` and the residual's band-power z for a batch of rfft spectra."""
    cross = (mult * (observed * predicted.conj()).real).sum(dim=(-2, -1)).double()
    energy = (mult * predicted.abs() ** 2).sum(dim=(-2, -1)).double().clamp(min=1e-12)
    scale = cross / energy
    residual = observed - scale[:, None, None].to(observed.real.dtype) * predicted
    weight = mult * band
    total = weight.sum(dim=(-2, -1)).double().clamp(min=1e-12)
    band_power = (weight * residual.abs() ** 2).sum(dim=(-2, -1)).double() / total
    spread = noise_var * torch.sqrt((weight ** 2).sum(dim=(-2, -1)).double()) / total
    return scale * torch.sqrt(energy / noise_var), (band_power - noise_var) / spread.clamp(min=1e-12)


def robust_z(values: NDArray, labels: NDArray, n_classes: int) -> NDArray[np.float64]:
    """``values`` centred and scaled per class by a trimmed estimate of its good members' mean and sd
    (pooled over all particles for classes of fewer than ``MIN_CLASS_FOR_OWN_SCALE`` members)."""
    finite = np.isfinite(values)
    members = [np.flatnonzero((labels == k) & finite) for k in range(n_classes)]
    estimates = np.array([trimmed_centre_scale(values[rows]) for rows in members])   # (K, 2)
    pooled = trimmed_centre_scale(values[finite] - estimates[labels[finite], 0])[1]
    z = np.zeros(len(values))
    for rows, (centre, scale) in zip(members, estimates):
        z[rows] = (values[rows] - centre) / (scale if len(rows) >= MIN_CLASS_FOR_OWN_SCALE else pooled)
    return z


def trimmed_centre_scale(values: NDArray, cut: float = TRIM_CUT, steps: int = 5) -> tuple[float, float]:
    """Mean and sd of the bulk of ``values``: start from the median and MAD, then re-estimate from the
    values within ``cut`` sd, corrected for the truncation, so that a minority of outliers on one
    side (the junk) moves neither."""
    if not len(values):
        return 0.0, 1.0
    centre = float(np.median(values))
    scale = max(MAD_TO_SD * float(np.median(np.abs(values - centre))), 1e-6)
    for _ in range(steps):
        inside = values[np.abs(values - centre) < cut * scale]
        if len(inside) < 3:
            break
        centre, scale = float(inside.mean()), max(float(inside.std()) / _TRUNCATED_SD, 1e-6)
    return centre, scale


def worst_half_z(fit: ParticleFit, labels: NDArray, n_classes: int) -> NDArray[np.float64]:
    """The lowest of the standardised half-plane amplitudes, itself standardised per class."""
    per_half = np.stack([robust_z(fit.halves[:, j], labels, n_classes) for j in range(fit.halves.shape[1])], 1)
    return robust_z(per_half.min(axis=1), labels, n_classes)


def bad_fit_evidence(fit: ParticleFit, labels: NDArray, n_classes: int) -> NDArray[np.float64]:
    """``max(-z_amplitude, -z_worst_half, z_excess)`` per particle; about N(0, 1)-sized for good members."""
    return np.maximum.reduce([-robust_z(fit.amplitude, labels, n_classes), -worst_half_z(fit, labels, n_classes),
                              robust_z(fit.excess, labels, n_classes)])


def figure_of_merit(fit: ParticleFit, labels: NDArray, n_classes: int) -> NDArray[np.float64]:
    """``min(1, N_TESTS Phi(-evidence))`` per particle, in [0, 1]; NaN statistics give 0."""
    evidence = bad_fit_evidence(fit, labels, n_classes)
    fom = np.minimum(1.0, N_TESTS * ndtr(-evidence))
    return np.where(np.isfinite(fom), fom, 0.0)


def figure_of_merit_from_table(table: ParticleTable, stack: ParticleStack, averages: NDArray,
                               radius_px: float) -> NDArray[np.float64]:
    """The figure of merit of a classification that did not write one (RELION's Class2D): poses,
    classes and CTFs from the data STAR ``table`` (its images: ``stack``), its class averages
    ``(K, B, B)``; the particles normalised as ``classify`` does (background sd 1, so the noise
    variance is taken as 1)."""
    labels = pd.to_numeric(table.particles[star_io.CLASS_NUMBER]).to_numpy(np.int64) - 1
    psi = PSI_SIGN * (pd.to_numeric(table.particles[star_io.ANGLE_PSI]).to_numpy(np.float64)
                      if star_io.ANGLE_PSI in table.particles else np.zeros(len(table)))
    shift = ORIGIN_SIGN * star_io.origins_px(table)
    pixel_size = float(star_io.pixel_sizes(table)[0])
    stack.normalise(background_radius(stack.box_size, radius_px))
    fit = measure_fit(stack, params_from_particles(table.per_particle(), str(table.path)), pixel_size,
                      labels, psi, shift, averages, 1.0, radius_px)
    return figure_of_merit(fit, labels, len(averages))
