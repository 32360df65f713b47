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

At large K the band pass itself becomes the cost (55 % of a K = 100 round at a 56 px box), so it
is preceded by a screen (K >= ``SCREEN_MIN_CLASSES``): the same band at every other shift in x
and y (a quarter of the poses), over every class; the band pass then scores only the classes
within ``margin + SCREEN_SLACK`` nats of the screen's best. Measured on 3,000 3KPR particles, 100
views, true references, SNR 0.05: of the pairs the band pass keeps at a 10-nat margin, the screen
put none more than 28.7 nats below its best, and the band pass's best class at most 20.8 below
(bench/search_check.py; lower bands or all shifts at a lower band needed larger margins).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .alignment import EXP_FLOOR, kept_rotation_scores
from .fourier import frequency_grid, rfft_weights, shell_index

if TYPE_CHECKING:
    from .refine import Refiner

logger = logging.getLogger(__name__)

MIN_SHORTLISTED_CLASSES = 4   # fewer references (a partial E-step, early growth): score them all
MIN_BAND_SHELL = 6            # the coarse band: at least these shells ...
BAND_FRACTION = 1.0 / 6.0     # ... or this share of the working box
TEMPLATE_BUDGET = 1 << 26     # floats of band templates held at once (classes are taken in groups)
SCREEN_MIN_CLASSES = 24       # from this many classes the band pass is preceded by the screen
SCREEN_SLACK = 15.0           # nats added to the margin for the classes the screen keeps ...
SCREEN_ROTATION_SLACK = 30.0  # ... and for the rotations of theirs the band pass scores
ROTATION_SLACK = 10.0         # nats added to the margin for the rotations scored exactly


def band_shell(box: int) -> int:
    return max(MIN_BAND_SHELL, int(round(BAND_FRACTION * box)))


@dataclass
class Shortlist:
    """Per particle, the classes to score exactly, and the coarse pass's estimate for the others."""

    chosen: torch.Tensor        # (n, K) bool
    coarse_ll: torch.Tensor     # (n, K) band-limited class log-likelihoods, poses marginalised
    fine_pose: torch.Tensor     # (n, K) the band pass's best pose (the same grid as the exact pass)
    best: torch.Tensor          # (n, 1) the class of highest band log-posterior (always chosen)
    rotations: torch.Tensor     # (n, K, B) uint8, packed: the rotations to score exactly (pack_rotations)

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


def every_rotation(n: int, k: int, n_psi: int) -> torch.Tensor:
    return torch.full((n, k, (n_psi + 7) // 8), 255, dtype=torch.uint8)


class BandPass:
    """Class log-likelihoods of a :class:`Refiner`'s particles on the Fourier coefficients up to
    ``shell``, marginalised over its rotations and the shifts ``shift_ids`` (indices into its grid)."""

    def __init__(self, fine: Refiner, shell: int, shift_ids: np.ndarray, rotation_margin: float):
        self.fine, self.device, self.shell = fine, fine.device, shell
        self.rotation_margin = rotation_margin
        box = fine.ws.box_size
        inside = torch.from_numpy(shell_index(box) <= shell)
        self.rows, self.cols = torch.nonzero(inside, as_tuple=True)             # the band's coefficients
        self.root_weight = torch.from_numpy(rfft_weights(box))[self.rows, self.cols].sqrt()
        self.band_shells = torch.from_numpy(shell_index(box))[self.rows, self.cols]
        self.shift_ids = torch.from_numpy(np.asarray(shift_ids, np.int64))
        self.n_poses = len(fine.grid.psi_deg) * len(self.shift_ids)
        self.features = self._particle_features().to(self.device)               # (n, 2F)
        self.phases = self._shift_phases().to(self.device)                      # (S', F) complex

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
        """``exp(-2 pi i f . s / W)`` for every shift of this pass and every band coefficient."""
        box = self.fine.ws.box_size
        ky, kx = frequency_grid(box)                                            # cycles per pixel
        fy = torch.from_numpy(ky)[self.rows, self.cols].double()
        fx = torch.from_numpy(kx)[self.rows, self.cols].double()
        shifts = torch.from_numpy(np.asarray(self.fine.grid.shifts, np.float64))[self.shift_ids]
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
        """``(k, R, F)`` band spectra -> ``(k * P', 2F)`` real templates (pose = rotation x shift;
        real and imaginary parts interleaved, as the features)."""
        k, n_psi, f = spectra.shape
        shifted = (spectra[:, :, None, :] * self.phases[None, None]).reshape(k * self.n_poses, f)
        return torch.view_as_real(shifted).reshape(k * self.n_poses, 2 * f).div_(self.fine.ws.noise_var)

    def fine_pose(self, pose: torch.Tensor) -> torch.Tensor:
        """This pass's pose indices -> the refiner grid's (same rotations, a subset of shifts)."""
        n_shifts = len(self.shift_ids)
        return (pose // n_shifts) * len(self.fine.grid.shifts) + self.shift_ids[pose % n_shifts]

    def score_every_class(self, spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n, K)`` log-likelihoods and best poses (refiner grid) for every particle and class,
        and the rotations within ``rotation_margin`` nats of the best (packed)."""
        k, n, p = spectra.shape[0], len(self.features), self.n_poses
        offset = self.offsets(spectra)
        loglik, best_pose = torch.empty(n, k), torch.empty(n, k, dtype=torch.int64)
        rotations = every_rotation(n, k, spectra.shape[1])
        group = max(1, TEMPLATE_BUDGET // (p * self.features.shape[1]))
        batch = max(16, min(8192, (1 << 25) // (group * p)))
        for first in range(0, k, group):
            classes = slice(first, min(k, first + group))
            flat = self.templates(spectra[classes])
            g = flat.shape[0] // p
            for start in range(0, n, batch):
                rows = slice(start, min(n, start + batch))
                ll, arg, kept = self.marginalise((self.features[rows] @ flat.t()).reshape(-1, g, p))
                loglik[rows, classes] = ll.cpu() + offset[rows, classes]
                best_pose[rows, classes] = self.fine_pose(arg.cpu())
                rotations[rows, classes] = kept.cpu()
        return loglik, best_pose, rotations

    def score_pairs(self, spectra: torch.Tensor, chosen: torch.Tensor, allowed: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`score_every_class` for the ``chosen`` ``(n, K)`` pairs only (others: -inf,
        pose 0, every rotation), at the rotations ``allowed`` (packed, ``(n, K, B)``)."""
        n_psi = spectra.shape[1]
        k, n = spectra.shape[0], len(self.features)
        offset = self.offsets(spectra)
        loglik = torch.full((n, k), -np.inf)
        best_pose = torch.zeros(n, k, dtype=torch.int64)
        rotations = every_rotation(n, k, spectra.shape[1])
        for j in torch.nonzero(chosen.any(0)).flatten().tolist():
            rows = torch.nonzero(chosen[:, j]).flatten()
            keep = unpack_rotations(allowed[rows, j], n_psi).to(self.device)
            scores = kept_rotation_scores(self.features[rows.to(self.device)], self.templates(spectra[j:j + 1]), keep)
            ll, arg, kept = self.marginalise(scores.unsqueeze(1))
            loglik[rows, j] = ll[:, 0].cpu() + offset[rows, j]
            best_pose[rows, j] = self.fine_pose(arg[:, 0].cpu())
            rotations[rows, j] = kept[:, 0].cpu()
        return loglik, best_pose, rotations

    def marginalise(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c, g, P)`` pose scores -> log-sum over poses, the best pose ``(c, g)`` and the packed
        rotations whose share of that sum is within ``rotation_margin`` nats of the best one's
        ``(c, g, B)`` (in place)."""
        c, g, _ = scores.shape
        best, arg = scores.max(dim=2)
        spread = scores.sub_(best.unsqueeze(2)).clamp_(min=EXP_FLOOR).exp_()
        per_rotation = spread.view(c, g, len(self.fine.grid.psi_deg), -1).sum(3)   # (c, g, R)
        floor = per_rotation.amax(2, keepdim=True) * float(np.exp(-min(self.rotation_margin, -EXP_FLOOR)))
        return best + per_rotation.sum(2).log(), arg, pack_rotations(per_rotation >= floor)


class CoarseSearch:
    """The band-limited first pass of a :class:`Refiner` (same poses, low frequencies only), with
    the screen in front of it at large K."""

    def __init__(self, fine: Refiner, margin: float):
        self.fine, self.margin = fine, margin
        box = fine.ws.box_size
        every_shift = np.arange(len(fine.grid.shifts))
        self.band = BandPass(fine, band_shell(box), every_shift, margin + ROTATION_SLACK)
        self.shell = self.band.shell
        even = np.all(np.mod(np.asarray(fine.grid.shifts), 2) == 0, axis=1)
        self._screen_shifts = every_shift[even]
        self._screen: BandPass | None = None
        logger.debug("coarse class search: %d Fourier coefficients up to shell %d (%d masked pixels)",
                     len(self.band.rows), self.shell, fine.op.n_masked)

    @staticmethod
    def applies(refiner: Refiner) -> bool:
        return refiner.cfg.search_margin > 0 and refiner.op.factored

    @property
    def screen(self) -> BandPass:
        if self._screen is None:
            self._screen = BandPass(self.fine, self.shell, self._screen_shifts, self.margin + SCREEN_ROTATION_SLACK)
        return self._screen

    def _rotated_spectra(self, refs: torch.Tensor) -> torch.Tensor:
        """``(K, R, W, W/2+1)`` spectra of every reference at every rotation of the grid, rotated
        by the exact pass's own interpolation."""
        rotated = self.fine.op.rotations(refs)                                  # (K, R, W, W)
        return torch.fft.rfft2(rotated, norm="ortho")

    def shortlist(self, refs: torch.Tensor, log_prior: torch.Tensor) -> Shortlist:
        """Classes within ``margin`` nats (band-limited log-posterior) of each particle's best."""
        spectra = self._rotated_spectra(refs)
        prior = log_prior[None].float()
        band_spectra = self.band.coefficients(spectra)
        if refs.shape[0] < SCREEN_MIN_CLASSES:
            coarse_ll, best_pose, rotations = self.band.score_every_class(band_spectra)
        else:
            coarse_ll, best_pose, rotations = self.screened(spectra, band_spectra, prior)
        joint = coarse_ll + prior
        top = joint.max(1, keepdim=True)
        chosen = joint >= top.values - self.margin
        return Shortlist(chosen, coarse_ll, best_pose, top.indices, rotations)

    def screened(self, spectra: torch.Tensor, band_spectra: torch.Tensor, prior: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Band log-likelihoods of the classes the screen keeps; the others get the screen's
        estimate moved by the particle's band-minus-screen difference on its best screened class
        (and every rotation, should the exact pass score them)."""
        screen_ll, screen_pose, allowed = self.screen.score_every_class(self.screen.coefficients(spectra))
        joint = screen_ll + prior
        top = joint.max(1, keepdim=True)
        kept = joint >= top.values - (self.margin + SCREEN_SLACK)
        band_ll, band_pose, rotations = self.band.score_pairs(band_spectra, kept, allowed)
        moved = screen_ll + (band_ll.gather(1, top.indices) - screen_ll.gather(1, top.indices))
        logger.debug("coarse screen: %.1f of %d classes per particle kept for the band pass",
                     float(kept.sum(1).float().mean()), spectra.shape[0])
        return torch.where(kept, band_ll, moved), torch.where(kept, band_pose, screen_pose), rotations
