"""Alignment: the pose operator, its adjoint, image transforms and pose recovery."""

from __future__ import annotations

import numpy as np
import torch

from cryo_drvae.alignment import PoseOperator, make_pose_grid, pose_scores, to_relion_pose, transform_images
from cryo_drvae.fourier import alignment_mask, circular_mask


def asymmetric_image(box: int = 32) -> torch.Tensor:
    image = torch.zeros(box, box)
    image[10:14, 16:26] = 1.0          # a bar right of centre
    image[18:22, 12:15] = 0.5          # and a weaker blob below-left
    return image


def test_operator_matches_transform_images():
    grid = make_pose_grid(30.0, 2.0)
    mask = circular_mask(32, 15)
    op = PoseOperator(32, grid, mask)
    ref = asymmetric_image()[None]
    templates = op.forward(ref)[0]
    for pose in (0, 7, grid.n_poses - 1):
        psi, shift = grid.decode(np.array([pose]))
        placed = transform_images(ref, torch.tensor(psi), torch.tensor(shift))[0]
        assert torch.allclose(placed[torch.from_numpy(mask)], templates[pose], atol=1e-5)


def test_adjoint_is_the_transpose():
    op = PoseOperator(24, make_pose_grid(45.0, 1.0), circular_mask(24, 11))
    a = torch.randn(2, op.grid.n_poses, op.n_masked)
    b = torch.randn(2, 24, 24)
    assert torch.allclose((op.forward(b) * a).sum(), (op.adjoint(a) * b).sum(), rtol=1e-4)


def test_placing_images_at_poses_is_the_adjoint_of_their_one_hot_pose_sums():
    # hard-assignment statistics go straight into each class's frame; a wrong shift, rotation
    # or class offset in the index puts the pixels elsewhere
    for grid in (make_pose_grid(45.0, 2.0), make_pose_grid(90.0, 1.0, shift_step_px=0.5)):
        op = PoseOperator(24, grid, circular_mask(24, 11))
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(30, op.n_masked, generator=generator)
        labels = torch.randint(0, 3, (30,), generator=generator)
        pose = torch.randint(0, grid.n_poses, (30,), generator=generator)
        one_hot = torch.zeros(3 * grid.n_poses, op.n_masked).index_add_(0, labels * grid.n_poses + pose, images)
        expected = op.adjoint(one_hot.reshape(3, grid.n_poses, -1))
        frames = op.place(labels, pose, images, torch.zeros(3, op.frame_size))
        assert torch.allclose(op.from_frame(frames), expected, atol=1e-4)


def test_rotated_shifted_copy_is_found_at_its_pose():
    grid = make_pose_grid(10.0, 3.0)
    mask = circular_mask(32, 15)
    op = PoseOperator(32, grid, mask)
    ref = asymmetric_image()[None]
    psi, shift = torch.tensor([70.0]), torch.tensor([[2.0, -1.0]])
    particle = transform_images(ref, psi, shift)[0][torch.from_numpy(mask)]
    templates = op.forward(ref)
    norms = (templates ** 2).sum(-1)
    best = int((2 * pose_scores(particle[None], templates) - norms[None]).argmax())
    found_psi, found_shift = grid.decode(np.array([best]))
    assert found_psi[0] == 70.0 and np.array_equal(found_shift[0], [2.0, -1.0])


def test_transform_round_trip():
    ref = asymmetric_image()[None]
    psi, shift = torch.tensor([33.0]), torch.tensor([[1.5, 0.5]])
    back = transform_images(transform_images(ref, psi, shift), psi, shift, to_reference=True)
    inner = torch.from_numpy(circular_mask(32, 10))
    assert np.corrcoef(back[0][inner], ref[0][inner])[0, 1] > 0.95


def test_pose_grid_shifts_inside_disc_and_relion_angles_wrapped():
    grid = make_pose_grid(12.0, 2.5)
    assert len(grid.psi_deg) == 30
    assert np.all(np.hypot(*grid.shifts.T) <= 2.5 + 1e-9)
    psi, origin = to_relion_pose(np.array([190.0, 10.0]), np.array([[1.0, 2.0], [0.0, -1.0]]))
    assert np.allclose(psi, [-170.0, 10.0])
    assert origin.shape == (2, 2) and np.allclose(np.abs(origin), [[1, 2], [0, 1]])


def test_half_pixel_shift_grid_uses_the_general_operator_and_matches_transform_images():
    grid = make_pose_grid(45.0, 1.5, shift_step_px=0.5)
    mask = circular_mask(32, 15)
    op = PoseOperator(32, grid, mask)
    assert not op.factored
    ref = asymmetric_image()[None]
    templates = op.forward(ref)[0]
    for pose in (3, grid.n_poses // 2, grid.n_poses - 1):
        psi, shift = grid.decode(np.array([pose]))
        placed = transform_images(ref, torch.tensor(psi), torch.tensor(shift))[0]
        assert torch.allclose(placed[torch.from_numpy(mask)], templates[pose], atol=1e-5)


def test_operator_size_does_not_grow_with_poses_times_pixels():
    """At the largest working box (64 px, reached by every box >= ~320 px at ~1 Å/px) the
    operator once held P*M*4 = 56 M entries (29 s, 5.5 GB to build); it must stay small."""
    import time
    started = time.perf_counter()
    op = PoseOperator(64, make_pose_grid(10.0, 6.4), alignment_mask(64))
    took = time.perf_counter() - started
    entries = op._matrix._nnz() + op._matrix_t._nnz()
    assert op.grid.n_poses * op.n_masked > 10_000_000
    assert entries < 2 * 4 * len(op.grid.psi_deg) * (64 + 2 * op.pad) ** 2
    assert took < 10.0
    ref = torch.zeros(1, 64, 64)
    ref[0, 20:30, 34:50] = 1.0
    psi, shift = op.grid.decode(np.array([op.grid.n_poses - 1]))
    placed = transform_images(ref, torch.tensor(psi), torch.tensor(shift))[0]
    assert torch.allclose(placed[torch.from_numpy(op.mask)], op.forward(ref)[0, -1], atol=1e-5)
