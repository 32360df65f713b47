"""Working images: Fourier-cropped, noise-whitened and CTF-prepared particles.

One streaming pass over the stack produces, per particle and at a small working box:
the phase-flipped image (DRVAE input), the image multiplied by its effective CTF (for exact
CTF-aware alignment scores) and the radial profile of the squared effective CTF (for
likelihood norms and Wiener filtering). All FFTs use ``norm="ortho"`` so that white noise has
the same variance per pixel and per Fourier component.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from numpy.typing import NDArray

from .ctf import CtfParams, ctf_images
from .errors import AbortRequested
from .fourier import alignment_mask, circular_mask, fourier_crop, shell_index, shell_mean
from .progress import bar as tqdm
from .stack import ParticleStack
from .store import RowStore

logger = logging.getLogger(__name__)

TARGET_NYQUIST_A = 12.0   # working resolution limit for classification (Å)
MIN_PARTICLE_PX = 32      # the particle's diameter in working pixels, at least (box permitting)
NOISE_SAMPLE = 2000       # particles used to estimate the noise spectrum
READ_BUDGET = 1 << 24     # raw pixels read per batch (64 MB of float32), whatever the box


def read_batch_size(box_size: int, most: int = 1024) -> int:
    """Particles per read batch: ``most`` for small boxes, fewer for large ones, so that the
    memory of one batch (raw images, their spectra, CTFs) does not grow with the box."""
    return int(max(8, min(most, READ_BUDGET // (box_size * box_size))))


@dataclass
class WorkingSet:
    """Prepared particles at the working box ``W``: rows in RAM or streamed from scratch files."""

    flipped: RowStore            # (n, W, W) whitened, CTF phase-flipped
    weighted: RowStore           # (n, M) whitened, multiplied by the effective CTF, inside the disc mask
    ctf2_shells: torch.Tensor    # (n, S) mean squared effective CTF per Fourier shell (small: in RAM)
    particles: NDArray[np.int64]  # (n,) rows of the particle table these are
    plan: Preparation            # how they were prepared: box, pixel, noise, CTF parameters, whitening

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def box_size(self) -> int:
        """W."""
        return self.plan.working_box

    @property
    def pixel_size(self) -> float:
        """Å/px at W."""
        return self.plan.work_pixel

    @property
    def scale(self) -> float:
        """Original box / W."""
        return self.plan.scale

    @property
    def noise_var(self) -> float:
        """Per-pixel noise variance after whitening."""
        return self.plan.noise_var

    @property
    def particle_radius(self) -> float:
        """Particle radius, px at W."""
        return self.plan.radius

    @property
    def mask(self) -> NDArray[np.bool_]:
        """The disc ``weighted`` is restricted to (the CTF delocalises signal beyond the particle)."""
        return alignment_mask(self.box_size)

    def subset(self, rows: NDArray) -> WorkingSet:
        """The given rows of this set, in RAM."""
        rows = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(self, flipped=RowStore.wrap(self.flipped.take(rows)),
                                   weighted=RowStore.wrap(self.weighted.take(rows)),
                                   ctf2_shells=self.ctf2_shells[torch.from_numpy(rows)],
                                   particles=self.particles[rows])

    def effective_ctf(self, rows: NDArray) -> torch.Tensor:
        """``|CTF x whitening|`` of the given rows on the full FFT grid, ``(m, W, W)`` (unshifted).

        Built from the same half-plane values the prepared images were filtered with, extended by
        Hermitian symmetry, so ``flipped`` filtered by it is ``weighted`` (inside the mask).
        """
        box, rows = self.box_size, np.asarray(rows)
        if self.plan.ctf_params is None:
            half = self.plan.whitening.expand(len(rows), *self.plan.whitening.shape)
        else:
            ctf = ctf_images(self.plan.ctf_params.subset(self.particles[rows]), box, self.pixel_size)
            half = torch.from_numpy(np.abs(ctf)) * self.plan.whitening
        full = torch.empty(len(rows), box, box)
        full[..., :box // 2 + 1] = half
        mirrored_rows = torch.from_numpy((-np.arange(box)) % box)
        mirrored_cols = torch.from_numpy(box - np.arange(box // 2 + 1, box))
        full[..., box // 2 + 1:] = half[:, mirrored_rows][:, :, mirrored_cols]
        return full

    def close(self) -> None:
        """Delete scratch files (if streamed)."""
        self.flipped.remove()
        self.weighted.remove()


def choose_working_box(box_size: int, pixel_size: float, requested: int = 0,
                       particle_diameter: float = 0.0) -> int:
    """Requested box, or the multiple of 8 giving a Nyquist near 12 Å *and* a particle at least
    ``MIN_PARTICLE_PX`` pixels across (small proteins need the finer sampling to tell their views
    apart: docs/method.md), within [32, 64] and <= box."""
    if requested:
        return min(box_size, requested - requested % 8)
    box_angst = box_size * pixel_size
    natural = box_angst / (TARGET_NYQUIST_A / 2.0)
    if particle_diameter > 0:
        natural = max(natural, MIN_PARTICLE_PX * box_angst / particle_diameter)
    return int(min(box_size - box_size % 8, max(32, min(64, 8 * round(natural / 8)))))


@dataclass(frozen=True)
class Preparation:
    """Everything needed to turn raw particles into working rows (the same on every rank)."""

    working_box: int
    work_pixel: float
    scale: float                  # original box / W
    radius: float                 # particle radius, px at W
    whitening: torch.Tensor       # (W, W//2+1) 1 / sqrt(relative noise power)
    noise_var: float              # per-pixel noise variance after whitening
    ctf_params: CtfParams | None

    def rows(self, images: NDArray[np.float32], index: NDArray[np.int64]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw ``(b, B, B)`` images -> (flipped ``(b, W, W)``, masked weighted ``(b, M)``, ctf2 ``(b, S)``)."""
        box = self.working_box
        n_shells = box // 2 + 1
        shells = torch.from_numpy(shell_index(box))
        spectrum = fourier_crop(torch.from_numpy(images), box) * self.whitening
        if self.ctf_params is None:
            ctf = torch.ones(len(index), *self.whitening.shape)
        else:
            ctf = torch.from_numpy(ctf_images(self.ctf_params.subset(index), box, self.work_pixel))
        effective = ctf * self.whitening
        size = (box, box)
        flipped = torch.fft.irfft2(spectrum * torch.sign(ctf), s=size, norm="ortho")
        weighted = torch.fft.irfft2(spectrum * effective, s=size, norm="ortho")
        mask = torch.from_numpy(alignment_mask(box))
        return flipped, weighted[:, mask].contiguous(), shell_mean(effective ** 2, shells, n_shells)


def plan_preparation(stack: ParticleStack, ctf_params: CtfParams | None, pixel_size: float,
                     particle_diameter: float, working_box: int, seed: int) -> Preparation:
    """Whitening filter and noise variance from the background of a seeded sample of particles."""
    scale = stack.box_size / working_box
    work_pixel = pixel_size * scale
    radius = min(working_box / 2 - 1, particle_diameter / 2 / work_pixel + 1)
    n = stack.n_particles
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, NOISE_SAMPLE), replace=False))
    step = read_batch_size(stack.box_size)      # full-size images are read a batch at a time
    spectrum = torch.cat([fourier_crop(torch.from_numpy(stack.read(sample[i:i + step])), working_box)
                          for i in range(0, len(sample), step)])
    background = torch.from_numpy(~circular_mask(working_box, radius))
    size = (working_box, working_box)
    n_shells = working_box // 2 + 1
    shells = torch.from_numpy(shell_index(working_box))
    small = torch.fft.irfft2(spectrum, s=size, norm="ortho")
    small = (small - small.mean(dim=(1, 2), keepdim=True)) * background.float()
    power = torch.fft.rfft2(small, norm="ortho").abs() ** 2 / background.float().mean()
    noise = shell_mean(power, shells, n_shells).mean(0)
    noise = noise.clamp(min=float(noise.max()) * 1e-3)
    whitening = (1.0 / torch.sqrt(noise / noise.mean()))[shells.clamp(max=n_shells - 1)]
    whitened = torch.fft.irfft2(spectrum * whitening, s=size, norm="ortho")
    noise_var = float(whitened[:, background].var())
    return Preparation(working_box, work_pixel, scale, radius, whitening, noise_var, ctf_params)


class _PreparedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of the chosen particles, read from the stack and prepared (DataLoader workers)."""

    def __init__(self, stack: ParticleStack, plan: Preparation, particles: NDArray, batch_size: int):
        self.stack, self.plan, self.particles, self.batch_size = stack, plan, particles, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.particles) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        start = i * self.batch_size
        index = self.particles[start:start + self.batch_size]
        return (start, *self.plan.rows(self.stack.read(index), index))


def prepare_working_set(stack: ParticleStack, plan: Preparation, particles: NDArray | None = None,
                        scratch_dir: Path | None = None, workers: int = 0, batch_size: int | None = None,
                        should_abort: Callable[[], bool] = lambda: False) -> WorkingSet:
    """Read the chosen particles (default: all) once and build the :class:`WorkingSet`.

    With ``scratch_dir`` the rows stream to files there (memory bounded by one batch per
    worker); without, they stay in RAM. ``workers`` DataLoader processes read and prepare.
    """
    particles = np.arange(stack.n_particles) if particles is None else np.asarray(particles, np.int64)
    batch_size = batch_size or read_batch_size(stack.box_size)
    n, box = len(particles), plan.working_box
    n_masked = int(alignment_mask(box).sum())
    if scratch_dir is None:
        flipped, weighted = RowStore.in_memory(n, (box, box)), RowStore.in_memory(n, (n_masked,))
    else:
        flipped = RowStore.on_disk(Path(scratch_dir) / "flipped.f32", n, (box, box))
        weighted = RowStore.on_disk(Path(scratch_dir) / "weighted.f32", n, (n_masked,))
    ctf2_shells = torch.empty(n, box // 2 + 1)
    batches = _PreparedBatches(stack, plan, particles, batch_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                         persistent_workers=False)
    for start, flip, weight, ctf2 in tqdm(loader, desc="reading particles", total=len(batches),
                                          disable=None, leave=False, unit="batch"):
        flipped.write(start, flip)
        weighted.write(start, weight)
        ctf2_shells[start:start + len(flip)] = ctf2
        if should_abort():
            raise AbortRequested("abort requested while reading particles")
    where = "in RAM" if scratch_dir is None else f"streamed from {scratch_dir}"
    logger.info("prepared %d particles at a %d px working box (%.2f Å/px, %s), noise variance %.3f",
                n, box, plan.work_pixel, where, plan.noise_var)
    return WorkingSet(flipped, weighted, ctf2_shells, particles, plan)
