"""Class growing: what counts as heterogeneity when choosing the class to split."""

from __future__ import annotations

import numpy as np
import torch

from cryo_drvae.alignment import make_pose_grid, transform_images
from cryo_drvae.config import ClusterConfig
from cryo_drvae.ctf import CtfParams, ctf_images
from cryo_drvae.fourier import alignment_mask, circular_mask, lowpass, shell_index, shell_mean
from cryo_drvae.preprocess import Preparation, WorkingSet
from cryo_drvae.refine import Refiner
from cryo_drvae.splitting import aligned_members, effective_dimension, member_residuals, split_score, tails, two_means
from cryo_drvae.store import RowStore

BOX, PIXEL, NOISE_VAR = 32, 6.0, 0.25
RADIUS = 10.0


def test_effective_dimension_counts_the_components_inside_the_shell_and_the_mask():
    # shell 1 holds the DC and the 4 nearest components (5); a mask covering a quarter keeps 1
    assert effective_dimension(32, 32.0, 1.0) == 5
    assert effective_dimension(32, 16 / np.sqrt(np.pi), 1.0) == 1
    # shell 2: 13 components (|k| <= 2 on the integer grid)
    assert effective_dimension(64, 64.0, 2.0) == 13


def blob_image(centres: list[tuple[float, float, float]]) -> torch.Tensor:
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    image = sum(w * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.5 ** 2)) for cx, cy, w in centres)
    return torch.from_numpy(image).float()


def test_pure_noise_scores_below_the_edge_at_any_class_size():
    # masked, low-passed white noise: the median eigenvalue is biased low, so an edge from it
    # alone called large pure-noise classes heterogeneous (score 44-85 at 300-600 members; a
    # real second structure scores in the hundreds); what is left is the edge's own fluctuation
    mask = torch.from_numpy(circular_mask(BOX, RADIUS))
    gen = torch.Generator().manual_seed(0)
    for m in (100, 300, 600):
        x = lowpass(torch.randn(m, BOX, BOX, generator=gen) * NOISE_VAR ** 0.5, 16)[:, mask]
        score, _ = split_score(x, NOISE_VAR, effective_dimension(BOX, RADIUS, 16))
        assert score < 20, (m, score)


def working_set(refs: list[torch.Tensor], which: np.ndarray, pose: np.ndarray, grid,
                scale: np.ndarray, rng: np.random.Generator) -> WorkingSet:
    """Particles ``scale * CTF * T_pose(ref) + white noise``, whitened and CTF-weighted as in preprocess."""
    n = len(which)
    defocus = rng.uniform(10000, 25000, n)
    params = CtfParams.from_arrays(defocus, defocus, np.zeros(n))
    ctf = torch.from_numpy(ctf_images(params, BOX, PIXEL))
    psi, shift = grid.decode(pose)
    placed = transform_images(torch.stack([refs[w] for w in which]), torch.from_numpy(psi).float(),
                              torch.from_numpy(shift).float())
    signal = torch.fft.rfft2(placed, norm="ortho") * ctf * torch.from_numpy(scale).float()[:, None, None]
    noise = torch.fft.rfft2(torch.from_numpy(rng.standard_normal((n, BOX, BOX))).float() * NOISE_VAR ** 0.5,
                            norm="ortho")
    spectrum = signal + noise
    shells = torch.from_numpy(shell_index(BOX))
    mask = torch.from_numpy(alignment_mask(BOX))
    weighted = torch.fft.irfft2(spectrum * ctf, s=(BOX, BOX), norm="ortho")[:, mask]
    plan = Preparation(BOX, PIXEL, 1.0, RADIUS, torch.ones(BOX, BOX // 2 + 1), NOISE_VAR, params)
    return WorkingSet(flipped=RowStore.wrap(torch.fft.irfft2(spectrum * torch.sign(ctf), s=(BOX, BOX), norm="ortho")),
                      weighted=RowStore.wrap(weighted.contiguous()),
                      ctf2_shells=shell_mean(ctf ** 2, shells, BOX // 2 + 1), particles=np.arange(n), plan=plan)


def test_defocus_and_amplitude_are_not_heterogeneity_but_a_second_structure_is():
    rng = np.random.default_rng(1)
    first = blob_image([(-4, 0, 1.0), (3, 2, 0.8), (0, -5, 0.6)]) * 4
    second = blob_image([(-4, 0, 1.0), (3, -3, 0.8), (4, 5, 0.6)]) * 4
    n = 400
    grid = make_pose_grid(20.0, 0.1 * BOX)           # the grid the Refiner below makes
    pose = rng.integers(grid.n_poses, size=n)
    scale = rng.uniform(0.8, 1.2, n)
    members = np.arange(n)
    d_eff = effective_dimension(BOX, RADIUS, BOX // 2)

    one = working_set([first], np.zeros(n, dtype=int), pose, grid, scale, rng)
    ref = Refiner(one, ClusterConfig(n_classes=2, psi_step=20.0), torch.device("cpu"))
    assert np.array_equal(ref.grid.shifts, grid.shifts)
    reference = lowpass(first[None], BOX // 2)[0] * ref.solvent_mask
    plain, _ = split_score(aligned_members(ref, members, pose, BOX // 2), NOISE_VAR, d_eff)
    residual, _ = split_score(member_residuals(ref, members, pose, reference, BOX // 2), NOISE_VAR, d_eff)
    assert plain > 0            # the phase-flipped members differ by defocus and amplitude ...
    assert residual <= 0        # ... which the class model, seen through each member's CTF, explains

    which = (rng.random(n) < 0.25).astype(int)       # a quarter are another structure
    two = working_set([first, second], which, pose, grid, scale, rng)
    ref = Refiner(two, ClusterConfig(n_classes=2, psi_step=20.0), torch.device("cpu"))
    mixed = lowpass((0.75 * first + 0.25 * second)[None], BOX // 2)[0] * ref.solvent_mask
    residual, _ = split_score(member_residuals(ref, members, pose, mixed, BOX // 2), NOISE_VAR, d_eff)
    assert residual > 0


def test_a_small_group_below_the_noise_edge_lands_in_one_tail_not_in_a_half():
    # 540 members of one structure + 60 of another, displaced along one direction by less than the
    # noise: the 2-means halves each get about half of the minority, one tail of the first principal
    # component most of it (what a move re-seeds a class from)
    rng = np.random.default_rng(3)
    d, n_major, n_minor = 400, 540, 60
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(n_major + n_minor, d))
    x[n_major:] += 4.0 * direction
    x = torch.from_numpy(x).float()
    _, vt = split_score(x, 1.0)
    minority = np.arange(n_major + n_minor) >= n_major
    half = two_means(x, vt)
    low, high = tails(x, vt)
    tail_purity = max(minority[low].mean(), minority[high].mean())
    half_purity = max(minority[half].mean(), minority[~half].mean())
    assert (low.sum(), high.sum()) == (60, 60) and not (low & high).any()
    assert tail_purity >= 0.6 and tail_purity >= 2 * half_purity, (tail_purity, half_purity)
