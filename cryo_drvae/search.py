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


def band_shell(box: int) -> int:
    return max(MIN_BAND_SHELL, int(round(BAND_FRACTION * box)))


@dataclass
class Shortlist:
    """Per particle, the classes to score exactly, and the coarse pass's estimate for the others."""

    chosen: torch.Tensor        # (n, K) bool
    coarse_ll: torch.Tensor     # (n, K) band-limited class log-likelihoods, poses marginalised
    fine_pose: torch.Tensor     # (n, K) the band pass's best pose (the same grid as the exact pass)
    best: torch.Tensor          # (n, 1) the class of highest band log-posterior (always chosen)

    @property
    def mean_classes(self) -> float:
        return float(self.chosen.sum(1).float().mean())


class CoarseSearch:
    """The band-limited first pass of a :class:`Refiner` (same poses, low frequencies only)."""

    def __init__(self, fine: Refiner, margin: float):
        self.fine, self.margin, self.device = fine, margin, fine.device
        box = fine.ws.box_size
        self.shell = band_shell(box)
        inside = torch.from_numpy(shell_index(box) <= self.shell)
        self.rows, self.cols = torch.nonzero(inside, as_tuple=True)             # the band's coefficients
        self.root_weight = torch.from_numpy(rfft_weights(box))[self.rows, self.cols].sqrt()
        self.band_shells = torch.from_numpy(shell_index(box))[self.rows, self.cols]
        self.features = self._particle_features().to(self.device)               # (n, 2F)
        self.phases = self._shift_phases().to(self.device)                      # (S, F) complex
        logger.debug("coarse class search: %d Fourier coefficients up to shell %d (%d masked pixels)",
                     len(self.rows), self.shell, fine.op.n_masked)

    @staticmethod
    def applies(refiner: Refiner) -> bool:
        return refiner.cfg.search_margin > 0 and refiner.op.factored

    def _band(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, W, W)`` real images -> ``(n, 2F)`` real features whose dot products are the images'
        inner products restricted to the band."""
        coefficients = self._spectrum(images)
        return torch.cat([coefficients.real, coefficients.imag], dim=1)

    def _particle_features(self) -> torch.Tensor:
        ref = self.fine
        box, mask = ref.ws.box_size, torch.from_numpy(ref.mask)
        out = torch.empty(len(ref.weighted), 2 * len(self.rows))
        for start, rows in ref.weighted.chunks(4096):
            images = torch.zeros(len(rows), box, box)
            images[:, mask] = rows
            out[start:start + len(rows)] = self._band(images)
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

    def _rotated_spectra(self, refs: torch.Tensor) -> torch.Tensor:
        """``(K, R, F)`` band coefficients of every reference at every rotation of the grid, rotated
        by the exact pass's own interpolation."""
        rotated = self.fine.op.rotations(refs)                                  # (K, R, W, W)
        k, n_psi, box = rotated.shape[:3]
        return self._spectrum(rotated.reshape(k * n_psi, box, box)).reshape(k, n_psi, -1)

    def _spectrum(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, W, W)`` -> ``(n, F)`` complex band coefficients, weighted by the rfft multiplicity."""
        rows, cols, weight = (t.to(images.device) for t in (self.rows, self.cols, self.root_weight))
        return torch.fft.rfft2(images, norm="ortho")[:, rows, cols] * weight

    def _templates(self, spectra: torch.Tensor) -> torch.Tensor:
        """``(k, P, 2F)`` real band templates (pose = rotation x shift, as ``PoseGrid``)."""
        k, n_psi, f = spectra.shape
        shifted = spectra[:, :, None, :] * self.phases[None, None]                # (k, R, S, F)
        shifted = shifted.reshape(k, -1, f)
        return torch.cat([shifted.real, shifted.imag], dim=2) / self.fine.ws.noise_var

    def shortlist(self, refs: torch.Tensor, log_prior: torch.Tensor) -> Shortlist:
        """Classes within ``margin`` nats (band-limited log-posterior) of each particle's best."""
        ref = self.fine
        k, p, n = refs.shape[0], ref.grid.n_poses, len(self.features)
        spectra = self._rotated_spectra(refs)                                    # (K, R, F)
        n_shells = ref.ws.ctf2_shells.shape[1]
        power = torch.zeros(k, n_shells).index_add_(                             # psi = 0: unrotated
            1, self.band_shells.clamp(max=n_shells - 1), (spectra[:, 0].abs() ** 2).cpu())
        offset = -0.5 * (ref.ws.ctf2_shells @ power.t()) / ref.ws.noise_var - np.log(p)   # (n, K)
        coarse_ll = torch.empty(n, k)
        best_pose = torch.empty(n, k, dtype=torch.int64)
        group = max(1, TEMPLATE_BUDGET // (p * self.features.shape[1]))
        batch = max(16, min(8192, (1 << 25) // (group * p)))
        for first in range(0, k, group):
            classes = slice(first, min(k, first + group))
            templates = self._templates(spectra[classes])                       # (g, P, 2F)
            g = templates.shape[0]
            flat = templates.reshape(g * p, -1).t().contiguous()
            for start in range(0, n, batch):
                rows = slice(start, min(n, start + batch))
                scores = (self.features[rows] @ flat).reshape(-1, g, p)
                best, arg = scores.max(dim=2)
                within = scores.sub_(best.unsqueeze(2)).clamp_(min=EXP_FLOOR).exp_().sum(2)
                coarse_ll[rows, classes] = (best + within.log()).cpu() + offset[rows, classes]
                best_pose[rows, classes] = arg.cpu()
        joint = coarse_ll + log_prior[None].to(coarse_ll)
        top = joint.max(1, keepdim=True)
        chosen = joint >= top.values - self.margin
        return Shortlist(chosen, coarse_ll, best_pose, top.indices)
