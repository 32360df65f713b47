"""Coarse-to-fine class search: which classes each particle is scored against exactly.

Scoring every particle against every class at every pose costs ``2 K P M`` flops per particle
(P poses, M masked pixels), which on a CPU is the whole run at large K. Most classes are
hopeless for a given particle long before the finest detail is looked at, so (as RELION's
adaptive oversampling and cryoSPARC's branch-and-bound do for poses) a first pass scores every
class at every pose of the same grid, but only on the low spatial frequencies: by Parseval, a
masked particle's inner product with a template band-limited to shell ``b`` is the sum over the
Fourier coefficients inside ``b`` alone, about ``pi b^2 / 2`` complex numbers per particle
(computed once) instead of ``M`` pixels. With ``b = W / 6`` that pass takes about an eighth of the
flops of an exact one. The exact E-step then runs only on the classes whose coarse log-posterior is within
``margin`` nats of the particle's best; the others get an estimate at least ``margin`` below the
best, and no responsibility.

Cropping the working box instead (the first design) was measured worse: on a cropped box the
shift grid and the bilinear rotations undersample the references near the new Nyquist, and on
kpr-0.05-s1 it missed the best class of 1.9 % of the particles at a 10-nat margin; the band pass
uses the exact poses and missed none, while trying every other shift only (a quarter of the
poses) missed 0.7 % (docs/method.md).

A fixed margin is not enough once the signal is strong: the shells above the band then add
tens to hundreds of nats, differently per class (at SNR 0.5 a 10-nat margin missed the best
class of 1.8 % of particles). After the exact pass on the shortlist, every left-out class whose
band log-posterior plus the most its higher shells could add (:func:`high_band_allowance`) reaches
the particle's best exact log-posterior is scored exactly too.

The exact pass then scores only the rotations whose best band pose is within ``margin +
ROTATION_SLACK + log S`` nats of the particle-class pair's best (docs/method.md). A screen in
front of the band pass (the band at every other shift) was tried and dropped: its error grows with
the signal, and guarding it per particle cost what it saved (docs/method.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .alignment import EXP_FLOOR
from .fourier import frequency_grid, rfft_weights, shell_index

if TYPE_CHECKING:
    from .refine import Refiner

logger = logging.getLogger(__name__)

MIN_SHORTLISTED_CLASSES = 4   # fewer references (a partial E-step, early growth): score them all
MIN_BAND_SHELL = 6            # the coarse band: at least these shells ...
BAND_FRACTION = 1.0 / 6.0     # ... or this share of the working box
TEMPLATE_BUDGET = 1 << 26     # floats of band templates held at once (classes are taken in groups)
ROTATION_SLACK = 10.0         # nats added to the margin for the rotations scored exactly
HIGH_BAND_SD = 3.0            # a left-out class is scored exactly too when its band log-posterior plus
HIGH_BAND_SLACK = 5.0         # what the shells above the band could add (q + 3 sqrt(2 q) + 5 nats, q its
                              # CTF-weighted power there) reaches the best exact one (docs/method.md)


def band_shell(box: int) -> int:
    return max(MIN_BAND_SHELL, int(round(BAND_FRACTION * box)))


def high_band_allowance(ctf2: torch.Tensor, power: torch.Tensor, shell: int, noise_var: float) -> torch.Tensor:
    """``(c, K)`` the most, in nats, that the shells above ``shell`` can add to a class's band
    log-likelihood: with ``q = |CTF x reference|^2 / (2 sigma^2)`` over those shells, a particle that
    is the reference there gains ``q``, and its noise ``3 sd = 3 sqrt(2 q)`` more.
    ``ctf2`` ``(c, S)``: the particles' CTF^2 per shell; ``power`` ``(K, S)``: the references'."""
    high = torch.arange(power.shape[1], device=power.device) > shell
    q = (0.5 * (ctf2[:, high] @ power[:, high].t()) / noise_var).clamp_(min=0.0)
    return q + HIGH_BAND_SD * (2 * q).sqrt() + HIGH_BAND_SLACK


@dataclass
class Shortlist:
    """Per particle, the classes to score exactly, and the coarse pass's estimate for the others."""

    chosen: torch.Tensor        # (n, K) bool
    coarse_ll: torch.Tensor     # (n, K) band-limited class log-likelihoods, poses marginalised
    fine_pose: torch.Tensor     # (n, K) the band pass's best pose (the same grid as the exact pass)
    best: torch.Tensor          # (n, 1) the class of highest band log-posterior (always chosen)
    rotations: torch.Tensor     # (n, K, B) uint8, packed: the rotations to score exactly (pack_rotations)
    shell: int                  # the band's last shell

    @property
    def mean_classes(self) -> float:
        return float(self.chosen.sum(1).float().mean())

    def rotations_of(self, rows: torch.Tensor | slice, j: int, n_psi: int) -> torch.Tensor:
        """``(m, R)`` bool: the rotations of class ``j`` worth scoring exactly for ``rows``."""
        return unpack_rotations(self.rotations[rows, j], n_psi)


BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_rotations(keep: torch.Tensor) -> torch.Tensor:
    """``(..., R)`` bool -> ``(..., ceil(R / 8))`` uint8 bit masks."""
    pad = (-keep.shape[-1]) % 8
    keep = torch.cat([keep, keep.new_zeros(*keep.shape[:-1], pad)], dim=-1)
    bits = keep.reshape(*keep.shape[:-1], -1, 8).to(torch.uint8) * BIT_VALUES.to(keep.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_rotations(packed: torch.Tensor, n_psi: int) -> torch.Tensor:
    """Inverse of :func:`pack_rotations`: ``(..., B)`` uint8 -> ``(..., R)`` bool."""
    bits = (packed.unsqueeze(-1) & BIT_VALUES.to(packed.device)) != 0
    return bits.reshape(*packed.shape[:-1], -1)[..., :n_psi]


class BandPass:
    """Class log-likelihoods of a :class:`Refiner`'s particles on the Fourier coefficients up to
    ``shell``, marginalised over the poses of its grid."""

    def __init__(self, fine: Refiner, shell: int, rotation_margin: float):
        self.fine, self.device, self.shell = fine, fine.device, shell
        self.rotation_margin = rotation_margin
        box = fine.ws.box_size
        inside = torch.from_numpy(shell_index(box) <= shell)
        self.rows, self.cols = torch.nonzero(inside, as_tuple=True)             # the band's coefficients
        self.root_weight = torch.from_numpy(rfft_weights(box))[self.rows, self.cols].sqrt()
        self.band_shells = torch.from_numpy(shell_index(box))[self.rows, self.cols]
        self.n_poses = fine.grid.n_poses
        self.features = self._particle_features().to(self.device)               # (n, 2F)
        self.phases = self._shift_phases().to(self.device)                      # (S, F) complex

    def _particle_features(self) -> torch.Tensor:
        """``(n, 2F)`` real features whose dot products are the masked particles' inner products
        restricted to the band."""
        ref = self.fine
        box, mask = ref.ws.box_size, torch.from_numpy(ref.mask)
        out = torch.empty(len(ref.weighted), 2 * len(self.rows))
        for start, rows in ref.weighted.chunks(4096):
            images = torch.zeros(len(rows), box, box)
            images[:, mask] = rows
            coefficients = self.coefficients(torch.fft.rfft2(images, norm="ortho"))
            out[start:start + len(rows)] = torch.view_as_real(coefficients).reshape(len(rows), -1)
        return out

    def _shift_phases(self) -> torch.Tensor:
        """``exp(-2 pi i f . s / W)`` for every shift of the grid and every band coefficient."""
        box = self.fine.ws.box_size
        ky, kx = frequency_grid(box)                                            # cycles per pixel
        fy = torch.from_numpy(ky)[self.rows, self.cols].double()
        fx = torch.from_numpy(kx)[self.rows, self.cols].double()
        shifts = torch.from_numpy(np.asarray(self.fine.grid.shifts, np.float64))
        angle = -2 * np.pi * (shifts[:, :1] * fx[None] + shifts[:, 1:] * fy[None])
        return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)

    def coefficients(self, spectra: torch.Tensor) -> torch.Tensor:
        """``(..., W, W/2+1)`` rfft2 spectra -> ``(..., F)`` band coefficients, weighted by the
        rfft multiplicity."""
        rows, cols, weight = (t.to(spectra.device) for t in (self.rows, self.cols, self.root_weight))
        return spectra[..., rows, cols] * weight

    def offsets(self, spectra: torch.Tensor) -> torch.Tensor:
        """``(n, K)`` the CTF-weighted reference power in the band and the uniform pose prior."""
        ref = self.fine
        n_shells = ref.ws.ctf2_shells.shape[1]
        power = torch.zeros(spectra.shape[0], n_shells).index_add_(              # psi = 0: unrotated
            1, self.band_shells.clamp(max=n_shells - 1), (spectra[:, 0].abs() ** 2).cpu())
        return -0.5 * (ref.ws.ctf2_shells @ power.t()) / ref.ws.noise_var - np.log(self.n_poses)

    def templates(self, spectra: torch.Tensor) -> torch.Tensor:
        """``(k, R, F)`` band spectra -> ``(k * P, 2F)`` real templates (pose = rotation x shift;
        real and imaginary parts interleaved, as the features)."""
        k, n_psi, f = spectra.shape
        shifted = (spectra[:, :, None, :] * self.phases[None, None]).reshape(k * self.n_poses, f)
        return torch.view_as_real(shifted).reshape(k * self.n_poses, 2 * f).div_(self.fine.ws.noise_var)

    def score_every_class(self, spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n, K)`` log-likelihoods and best poses for every particle and class, and the
        rotations worth scoring exactly (packed, :meth:`marginalise`)."""
        features = self.features
        k, n, p = spectra.shape[0], len(features), self.n_poses
        offset = self.offsets(spectra)
        loglik, best_pose = torch.empty(n, k), torch.empty(n, k, dtype=torch.int64)
        rotations = torch.empty(n, k, (spectra.shape[1] + 7) // 8, dtype=torch.uint8)   # every entry filled below
        group = max(1, TEMPLATE_BUDGET // (p * self.features.shape[1]))
        batch = max(16, min(8192, (1 << 25) // (group * p)))
        for first in range(0, k, group):
            classes = slice(first, min(k, first + group))
            flat = self.templates(spectra[classes])
            g = flat.shape[0] // p
            for start in range(0, n, batch):
                rows = slice(start, min(n, start + batch))
                ll, arg, kept = self.marginalise((features[rows] @ flat.t()).reshape(-1, g, p))
                loglik[rows, classes] = ll.cpu() + offset[rows, classes]
                best_pose[rows, classes] = arg.cpu()
                rotations[rows, classes] = kept.cpu()
        return loglik, best_pose, rotations

    def marginalise(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c, g, P)`` pose scores -> log-sum over poses, the best pose ``(c, g)`` and the packed
        rotations ``(c, g, B)`` whose best pose is within ``rotation_margin + log S`` nats of the best
        (a superset of those whose share of the sum is within ``rotation_margin``), in place."""
        c, g, _ = scores.shape
        n_psi = len(self.fine.grid.psi_deg)
        by_rotation = scores.view(c, g, n_psi, -1)
        best, arg = scores.max(dim=2)
        reach = self.rotation_margin + float(np.log(by_rotation.shape[3]))
        kept = by_rotation.amax(3) >= (best - reach).unsqueeze(2)
        within = scores.sub_(best.unsqueeze(2)).clamp_(min=EXP_FLOOR).exp_().sum(2)
        return best + within.log(), arg, pack_rotations(kept)


class CoarseSearch:
    """The band-limited first pass of a :class:`Refiner` (same poses, low frequencies only)."""

    def __init__(self, fine: Refiner, margin: float):
        self.fine, self.margin = fine, margin
        self.band = BandPass(fine, band_shell(fine.ws.box_size), margin + ROTATION_SLACK)
        logger.debug("coarse class search: %d Fourier coefficients up to shell %d (%d masked pixels)",
                     len(self.band.rows), self.shell, fine.op.n_masked)

    @property
    def shell(self) -> int:
        return self.band.shell

    @staticmethod
    def applies(refiner: Refiner) -> bool:
        return refiner.cfg.search_margin > 0 and refiner.op.factored

    def _rotated_spectra(self, refs: torch.Tensor) -> torch.Tensor:
        """``(K, R, W, W/2+1)`` spectra of every reference at every rotation of the grid, rotated
        by the exact pass's own interpolation."""
        rotated = self.fine.op.rotations(refs)                                  # (K, R, W, W)
        return torch.fft.rfft2(rotated, norm="ortho")

    def shortlist(self, refs: torch.Tensor, log_prior: torch.Tensor) -> Shortlist:
        """Classes within ``margin`` nats (band-limited log-posterior) of each particle's best."""
        band_spectra = self.band.coefficients(self._rotated_spectra(refs))
        coarse_ll, best_pose, rotations = self.band.score_every_class(band_spectra)
        joint = coarse_ll + log_prior[None].float()
        top = joint.max(1, keepdim=True)
        chosen = joint >= top.values - self.margin
        return Shortlist(chosen, coarse_ll, best_pose, top.indices, rotations, self.shell)
