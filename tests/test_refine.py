"""Refiner.cluster_denoised: BSK-means++ under alignment, through clustering's one Lloyd loop."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from cryo_drvae import clustering, refine
from cryo_drvae.alignment import make_pose_grid, transform_images
from cryo_drvae.config import ClusterConfig
from cryo_drvae.fourier import alignment_mask
from cryo_drvae.preprocess import Preparation, WorkingSet
from cryo_drvae.refine import Refiner
from cryo_drvae.store import RowStore

BOX, PSI_STEP = 32, 20.0


def blobs(centres: list[tuple[float, float, float]]) -> torch.Tensor:
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    image = sum(w * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.5 ** 2)) for cx, cy, w in centres)
    return torch.from_numpy(image).float()


def posed_copies(sizes: list[int], seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images ``(n, W, W)``: copies of 3 asymmetric patterns at random grid rotations, a little noise."""
    patterns = [blobs([(-5, 0, 1.0), (4, 3, 0.5)]), blobs([(-4, -4, 1.0), (0, 5, 0.7), (5, -1, 0.4)]),
                blobs([(0, 0, 1.0), (6, 0, 0.8), (0, 3, 0.5)])]
    rng = np.random.default_rng(seed)
    which = np.repeat(np.arange(len(sizes)), sizes)
    grid = make_pose_grid(PSI_STEP, 0.1 * BOX)           # the grid the Refiner below makes
    psi = rng.choice(grid.psi_deg, size=which.size)
    images = transform_images(torch.stack([patterns[w] for w in which]), torch.from_numpy(psi).float(),
                              torch.zeros(which.size, 2))
    return images + 0.05 * torch.from_numpy(rng.standard_normal(images.shape)).float(), which, psi


def refiner_for(images: torch.Tensor, balance: float) -> Refiner:
    n = len(images)
    plan = Preparation(BOX, 4.0, 1.0, BOX / 2 - 4, torch.ones(BOX, BOX // 2 + 1), 1.0, None)
    ws = WorkingSet(flipped=RowStore.wrap(images), weighted=RowStore.wrap(images[:, alignment_mask(BOX)]),
                    ctf2_shells=torch.ones(n, BOX // 2 + 1), particles=np.arange(n), plan=plan)
    return Refiner(ws, ClusterConfig(n_classes=3, psi_step=PSI_STEP, balance=balance), torch.device("cpu"))


def test_rotated_copies_of_three_patterns_are_recovered_by_the_shared_loop(monkeypatch):
    calls = []

    def spy(metric, *args, **kwargs):
        calls.append(type(metric).__name__)
        return clustering.bsk_means(metric, *args, **kwargs)

    monkeypatch.setattr(refine, "bsk_means", spy)
    images, which, psi = posed_copies([45, 30, 15])
    found = refiner_for(images, balance=0.2).cluster_denoised(images, np.random.default_rng(0))
    assert calls == ["AlignedMetric"]
    assert adjusted_rand_score(which, found.labels) == 1.0
    assert sorted(np.bincount(found.labels)) == [15, 30, 45]
    # each member's pose differs from its true one by the same in-plane turn within its class
    found_psi, found_shift = make_pose_grid(PSI_STEP, 0.1 * BOX).decode(found.pose)
    turn = np.round(found_psi - psi, 6) % 360
    for k in range(3):
        assert np.unique(turn[found.labels == k]).size == 1
    assert not found_shift.any()
    assert np.all(found.cost >= -1e-3) and np.all(found.confidence == 1.0)


def test_balance_one_gives_equal_classes_of_unequal_patterns():
    images, which, _ = posed_copies([45, 30, 15], seed=1)
    found = refiner_for(images, balance=1.0).cluster_denoised(images, np.random.default_rng(0))
    assert np.bincount(found.labels, minlength=3).tolist() == [30, 30, 30]
    # the smallest pattern stays whole: the bound moves only members of the larger ones
    smallest = found.labels[which == 2]
    assert np.unique(smallest).size == 1
