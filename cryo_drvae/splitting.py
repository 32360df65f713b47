"""Low-SNR initialisation: grow the classes from one by splitting, with coarse-to-fine EM.

Starting K-means++ from single particles fails at low SNR (each seed is mostly noise). Here
classes are grown instead: EM over (class, pose) with the exact CTF likelihood from one class;
then, repeatedly, the class whose aligned members are most heterogeneous is split in two
(2-means on the top principal components of its members brought into the reference frame)
and EM continues, until there are K classes. The references are low-passed to a resolution
that rises with the number of classes (annealing), which keeps early alignment from locking
onto noise.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from numpy.typing import NDArray

from .alignment import circular_mask, transform_images
from .errors import AbortRequested
from .refine import EMState, Refiner, lowpass, posterior

logger = logging.getLogger(__name__)


def aligned_members(ref: Refiner, members: NDArray, pose: NDArray, max_shell: float) -> torch.Tensor:
    """Phase-flipped members brought into the reference frame, low-passed, masked, flattened."""
    psi, shift = ref.grid.decode(pose)
    imgs = transform_images(ref.ws.flipped[members], torch.from_numpy(psi).float(),
                            torch.from_numpy(shift).float(), to_reference=True)
    imgs = lowpass(imgs, max_shell)
    mask = torch.from_numpy(circular_mask(ref.ws.box_size, ref.ws.particle_radius))
    return imgs[:, mask]


def split_score(x: torch.Tensor, noise_var: float, d_eff: int = 0) -> tuple[float, torch.Tensor]:
    """Excess of the top eigenvalue over the Marchenko-Pastur noise edge, times the class size."""
    m, d = x.shape
    xc = (x - x.mean(0, keepdim=True)).double()
    cov = (xc.t() @ xc / max(m - 1, 1)).numpy()
    # numpy's LAPACK eigh on one thread: torch's CPU eigh, or OpenBLAS threads competing with
    # torch's OpenMP threads, were 10-100x slower on this 700 x 700 covariance
    with threadpool_limits(1):
        evals, evecs = np.linalg.eigh(cov)                   # ascending
    lam = evals[::-1]
    vt = torch.from_numpy(np.ascontiguousarray(evecs[:, ::-1][:, :3].T)).float()
    # noise level: median eigenvalue within the effective dimension of the low-passed subspace
    d_eff = int(np.clip(d_eff or d, 2, min(d, m)))
    edge = float(np.median(lam[:d_eff])) * (1 + np.sqrt(d_eff / max(m, 1))) ** 2
    return float(m * max(lam[0] - edge, 0.0)), vt


def two_means(x: torch.Tensor, vt: torch.Tensor, n_iter: int = 10) -> NDArray:
    """2-means on the top principal components, started from the sign of the first."""
    z = ((x - x.mean(0, keepdim=True)) @ vt.t()).numpy()
    side = z[:, 0] > np.median(z[:, 0])
    for _ in range(n_iter):
        if side.all() or (~side).all():
            break
        c1, c0 = z[side].mean(0), z[~side].mean(0)
        new = ((z - c1) ** 2).sum(1) < ((z - c0) ** 2).sum(1)
        if np.array_equal(new, side):
            break
        side = new
    return side


def split_classes(ref: Refiner, state: EMState, max_shell: float, split_shell: float,
                  n_splits: int = 1) -> EMState:
    """Split the ``n_splits`` most heterogeneous classes of ``state`` in two (by their aligned members)."""
    k = state.refs.shape[0]
    labels = posterior(state.loglik, state.log_prior).argmax(1)
    box = ref.ws.box_size
    f = np.fft.fftfreq(box) * box
    inside = float((np.hypot(f[:, None], f[None, :]) <= split_shell).sum())
    mask_frac = np.pi * ref.ws.particle_radius ** 2 / box ** 2
    d_eff = int(inside * min(1.0, mask_frac))
    sizes = np.bincount(labels, minlength=k)
    smallest = min(20, int(sizes.max()))          # fall back to the largest class if all are tiny
    candidates = []
    for j in range(k):
        members = np.nonzero(labels == j)[0]
        if len(members) < max(smallest, 2):
            continue
        x = aligned_members(ref, members, state.best_pose[members, j], split_shell)
        score, vt = split_score(x, ref.ws.noise_var, d_eff)
        candidates.append((score, j, x, vt, members))
    candidates.sort(key=lambda c: -c[0])
    refs, prior = state.refs, np.exp(state.log_prior)
    if not candidates:                 # too few particles to split: duplicate the likeliest class
        j = int(np.argmax(prior))
        prior = np.append(prior, prior[j] / 2)
        prior[j] /= 2
        return EMState(torch.cat([refs, refs[j:j + 1]], 0), np.log(prior / prior.sum()),
                       state.loglik, state.best_pose)
    for score, j, x, vt, members in candidates[:n_splits]:
        side = two_means(x, vt)
        halves = ref.references(ref.statistics_from_labels(side.astype(np.int64), state.best_pose[members, j],
                                                           n_classes=2, members=members))
        halves = lowpass(halves, max_shell) * ref.solvent_mask
        refs = torch.cat([refs, halves[1:]], 0)
        refs[j] = halves[0]
        frac = float(side.mean())
        prior = np.append(prior, prior[j] * frac)
        prior[j] *= (1 - frac)
        logger.debug("split class %d (%d members, score %.3g) into %d + %d", j, len(members),
                     score, int((~side).sum()), int(side.sum()))
    return EMState(refs, np.log(prior / prior.sum()), state.loglik, state.best_pose)


def splits_per_stage(k: int) -> int:
    """Classes split at once when there are ``k``: one at a time up to 15, then k/8 (geometric growth,
    so that growing to K costs O(K) class-steps of EM instead of O(K^2))."""
    return max(1, k // 8)


def grow_classes(ref: Refiner, n_classes: int, rounds_per_split: int = 2, shell_start: float = 5.0,
                 should_abort: Callable[[], bool] = lambda: False) -> EMState:
    """EM from one class, splitting the most heterogeneous classes until there are ``n_classes``.

    The references are low-passed to a shell that rises linearly from ``shell_start`` (one class)
    to Nyquist (``n_classes``), so the early, coarse alignments cannot lock onto noise.
    """
    shell_end = ref.ws.box_size // 2
    n = len(ref.weighted)
    zeros = np.zeros(n, dtype=np.int64)
    refs = lowpass(ref.references(ref.statistics_from_labels(zeros, zeros, n_classes=1)), shell_start)
    state = EMState(refs * ref.solvent_mask, np.zeros(1), None, None)
    k = 1
    while True:
        shell = shell_start + (shell_end - shell_start) * min(1.0, (k - 1) / max(n_classes - 1, 1))
        for _ in range(rounds_per_split + (k == 1)):
            state = ref.em_step(state.refs, state.log_prior, shell, floor=0.0)
        if should_abort():
            raise AbortRequested("abort requested while growing classes")
        logger.info("grown to %d of %d classes (references filtered to %.0f Å)", k, n_classes,
                    ref.ws.box_size * ref.ws.pixel_size / max(shell, 1.0))
        if k >= n_classes:
            return state
        state = split_classes(ref, state, shell, shell, min(splits_per_stage(k), n_classes - k))
        k = state.refs.shape[0]
