"""In-plane alignment: every class reference at every rotation and shift, scored as one matmul.

A reference is mapped onto a grid of poses (psi, shift) by one sparse bilinear-interpolation
operator, restricted to the pixels inside a circular mask. Scoring ``n`` images against
``K`` references at ``P`` poses is then a dense ``(n, M) @ (M, K*P)`` product, which is what
BLAS and GPUs do fastest. The adjoint operator brings pose-weighted sums of images back into
each reference's frame for the class averages.

Pose convention (working-box pixels, x = column, y = row, centre c = box // 2)::

    image(p) = reference(R(psi) (p - c - shift) + c),   R(psi) = [[cos, -sin], [sin, cos]]

``to_relion_pose`` converts it to RELION's ``rlnAnglePsi`` / ``rlnOriginX/YAngst``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

# RELION's sign for origins relative to ours: origin = ORIGIN_SIGN * shift (see to_relion_pose).
ORIGIN_SIGN = -1.0
PSI_SIGN = 1.0
DENSE_ROTATION_SHARE = 0.5  # kept rotations above this share: one product over every pose
EXP_FLOOR = -80.0          # pose log-ratios below this are exp'ed as this (1.8e-35, no float32 underflow)


@dataclass(frozen=True)
class PoseGrid:
    """All in-plane poses searched: ``n_psi`` rotations times ``n_shifts`` shifts (pose = r * S + s)."""

    psi_deg: NDArray          # (R,)
    shifts: NDArray           # (S, 2) x, y in working pixels

    @property
    def n_poses(self) -> int:
        return len(self.psi_deg) * len(self.shifts)

    def decode(self, pose_index: NDArray) -> tuple[NDArray, NDArray]:
        """Pose indices -> (psi in degrees ``(n,)``, shift in working pixels ``(n, 2)``)."""
        pose_index = np.asarray(pose_index)
        n_shifts = len(self.shifts)
        return self.psi_deg[pose_index // n_shifts], self.shifts[pose_index % n_shifts]


def make_pose_grid(psi_step_deg: float, max_shift_px: float, shift_step_px: float = 1.0) -> PoseGrid:
    """Rotations every ``psi_step_deg`` and integer-step shifts inside a disc of ``max_shift_px``."""
    n_psi = max(1, int(round(360.0 / psi_step_deg)))
    psi = np.arange(n_psi) * (360.0 / n_psi)
    reach = int(math.floor(max_shift_px / shift_step_px))
    steps = np.arange(-reach, reach + 1) * shift_step_px
    sx, sy = np.meshgrid(steps, steps, indexing="xy")
    inside = sx ** 2 + sy ** 2 <= max_shift_px ** 2 + 1e-6
    shifts = np.stack([sx[inside], sy[inside]], axis=1)
    shifts = shifts[np.argsort(np.hypot(shifts[:, 0], shifts[:, 1]), kind="stable")]
    return PoseGrid(psi, shifts)


class PoseOperator:
    """Linear map from a full ``(box, box)`` reference to its masked pixels at every pose.

    ``forward`` gives templates ``(K, P, M)``; ``adjoint`` maps ``(K, P, M)`` back to ``(K, box, box)``.

    With integer shifts (the default grid) the map factors into a sparse bilinear rotation onto a
    box padded by the largest shift, ``(R * Bp^2, box^2)`` with 4 entries per row, followed by a
    gather of the masked pixels at each shift: memory ``O(R * Bp^2 + S * M)`` instead of the
    ``O(R * S * M)`` of one matrix over every pose (29 s and 5.5 GB at a 64 px working box).
    Other shift grids use that one matrix.
    """

    def __init__(self, box_size: int, grid: PoseGrid, mask: NDArray[np.bool_],
                 device: torch.device | str = "cpu"):
        self.box_size = box_size
        self.grid = grid
        self.mask = mask
        self.n_masked = int(mask.sum())
        self.device = torch.device(device)
        shifts = np.asarray(grid.shifts, dtype=np.float64).reshape(-1, 2)
        self.factored = bool(np.all(shifts == np.round(shifts)))
        if self.factored:
            self.pad = int(np.abs(shifts).max()) if len(shifts) else 0
            matrix, gather = self._build_factored(shifts.astype(np.int64))
            self._gather = gather.to(self.device)
        else:
            matrix = self._build()
        if self.device.type == "cpu":     # CSR products are several times faster than COO on CPUs
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                self._matrix, self._matrix_t = matrix.to_sparse_csr(), matrix.t().coalesce().to_sparse_csr()
        else:
            self._matrix = matrix.to(self.device)
            self._matrix_t = self._matrix.t()

    @staticmethod
    def _bilinear(src_x: NDArray, src_y: NDArray, box: int) -> torch.Tensor:
        """Sparse ``(src_x.size, box^2)`` matrix sampling a ``(box, box)`` image bilinearly at the
        given source coordinates (zero outside the box)."""
        x0, y0 = np.floor(src_x), np.floor(src_y)
        fx, fy = src_x - x0, src_y - y0
        out_rows = np.arange(src_x.size).reshape(src_x.shape)
        indices, values = [], []
        for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                               (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xs, ys = x0 + dx, y0 + dy
            ok = (xs >= 0) & (xs < box) & (ys >= 0) & (ys < box) & (weight > 1e-9)
            indices.append(np.stack([out_rows[ok], (ys[ok] * box + xs[ok]).astype(np.int64)]))
            values.append(weight[ok])
        index = torch.from_numpy(np.concatenate(indices, axis=1))
        value = torch.from_numpy(np.concatenate(values).astype(np.float32))
        shape = (src_x.size, box * box)
        return torch.sparse_coo_tensor(index, value, shape, check_invariants=False).coalesce()

    def _rotation_sources(self, px: NDArray) -> tuple[NDArray, NDArray]:
        """Source coordinates ``(R, n)`` of ``px`` ``(n, 2)`` (x, y about the centre) at every psi."""
        c = self.box_size // 2
        psi = np.deg2rad(self.grid.psi_deg)
        cos, sin = np.cos(psi)[:, None], np.sin(psi)[:, None]
        return (cos * px[None, :, 0] - sin * px[None, :, 1] + c,
                sin * px[None, :, 0] + cos * px[None, :, 1] + c)

    def _build_factored(self, shifts: NDArray[np.int64]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation onto the padded box ``(R * Bp^2, box^2)`` and the gather index ``(S * M,)``."""
        box, c, pad = self.box_size, self.box_size // 2, self.pad
        padded = box + 2 * pad
        qy, qx = np.meshgrid(np.arange(padded) - pad - c, np.arange(padded) - pad - c, indexing="ij")
        src_x, src_y = self._rotation_sources(np.stack([qx.ravel(), qy.ravel()], axis=1).astype(np.float64))
        rows_px, cols_px = np.nonzero(self.mask)
        # template pixel p at shift s reads the rotated reference at q = p - s (padded-box index)
        qx_of = cols_px[None, :] - shifts[:, None, 0] + pad
        qy_of = rows_px[None, :] - shifts[:, None, 1] + pad
        gather = torch.from_numpy((qy_of * padded + qx_of).reshape(-1).astype(np.int64))
        return self._bilinear(src_x, src_y, box), gather

    def _build(self) -> torch.Tensor:
        """One matrix ``(P * M, box^2)`` over every pose (any shift grid)."""
        c = self.box_size // 2
        rows_px, cols_px = np.nonzero(self.mask)
        px = np.stack([cols_px - c, rows_px - c], axis=1).astype(np.float64)   # (M, 2) x, y
        rel = (px[None, :, :] - self.grid.shifts[:, None, :]).reshape(-1, 2)    # (S * M, 2)
        src_x, src_y = self._rotation_sources(rel)                               # (R, S * M)
        return self._bilinear(src_x, src_y, self.box_size)

    def _apply(self, references: torch.Tensor) -> torch.Tensor:
        """The sparse matrix applied to ``(K, box, box)`` references -> ``(K, rows)``."""
        k = references.shape[0]
        flat = references.reshape(k, -1).t().to(self.device, torch.float32).contiguous()   # (box², K)
        return (self._matrix @ flat).t().contiguous()

    def rotations(self, references: torch.Tensor) -> torch.Tensor:
        """``(K, box, box)`` -> ``(K, R, box, box)``: every reference at every rotation of the grid,
        unshifted, by the same interpolation as :meth:`forward` (factored operators only)."""
        if not self.factored:
            raise ValueError("rotations need the factored (integer-shift) operator")
        k, n_psi, box, pad = references.shape[0], len(self.grid.psi_deg), self.box_size, self.pad
        padded = self._apply(references).reshape(k, n_psi, box + 2 * pad, box + 2 * pad)
        return padded[:, :, pad:pad + box, pad:pad + box]

    def forward(self, references: torch.Tensor) -> torch.Tensor:
        """``(K, box, box)`` references -> ``(K, P, M)`` templates (contiguous)."""
        k = references.shape[0]
        out = self._apply(references)                                           # (K, rows)
        if not self.factored:
            return out.reshape(k, self.grid.n_poses, self.n_masked)
        padded = out.reshape(k, len(self.grid.psi_deg), -1)                     # (K, R, Bp^2)
        templates = torch.empty(k, self.grid.n_poses, self.n_masked, device=out.device)
        for j in range(k):
            self.shifted(padded[j], out=templates[j])
        return templates

    def padded_rotations(self, references: torch.Tensor) -> torch.Tensor:
        """``(K, box, box)`` -> ``(K, R, Bp^2)``: every reference rotated onto the padded box
        (factored operators); :meth:`shifted` turns one class's into its templates."""
        if not self.factored:
            raise ValueError("padded rotations need the factored (integer-shift) operator")
        return self._apply(references).reshape(references.shape[0], len(self.grid.psi_deg), -1)

    def shifted(self, padded: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One class's ``(R, Bp^2)`` padded rotations -> its ``(P, M)`` templates (into ``out``).

        One class at a time into a reused buffer: ``torch.gather`` there ran 10-15x faster on a
        CPU than advanced indexing of every class into one fresh array (measured, 100 classes at
        a 56 px box: 0.33 s against 3.2-5.5 s)."""
        n_psi = padded.shape[0]
        if out is None:
            out = torch.empty(self.grid.n_poses, self.n_masked, device=padded.device)
        index = self._gather[None].expand(n_psi, -1)
        torch.gather(padded, 1, index, out=out.view(n_psi, -1))
        return out

    def adjoint(self, stacks: torch.Tensor) -> torch.Tensor:
        """``(K, P, M)`` pose-resolved sums -> ``(K, box, box)`` in the reference frame."""
        return self.from_frame(self.to_frame(stacks))

    # A class's *frame*: the rows of the sparse matrix (the padded rotations, factored operators;
    # every pose's masked pixels otherwise). Sums kept there are O(K R Bp^2), not O(K P M).
    @property
    def frame_size(self) -> int:
        return self._matrix.shape[0]

    def to_frame(self, stacks: torch.Tensor) -> torch.Tensor:
        """``(K, P, M)`` pose-resolved sums -> ``(K, frame_size)``."""
        k = stacks.shape[0]
        stacks = stacks.to(self.device, torch.float32)
        if not self.factored:
            return stacks.reshape(k, -1)
        n_psi = len(self.grid.psi_deg)
        frames = torch.zeros(k, n_psi, self.frame_size // n_psi, device=self.device)
        return frames.index_add_(2, self._gather, stacks.reshape(k, n_psi, -1)).reshape(k, -1)

    def place(self, labels: torch.Tensor, pose: torch.Tensor, images: torch.Tensor,
              frames: torch.Tensor) -> torch.Tensor:
        """Add masked ``images`` ``(n, M)`` at their ``pose`` into ``frames[labels]`` (in place):
        a hard assignment's sums without the ``(K, P, M)`` pose-resolved array."""
        n_shifts, m = len(self.grid.shifts), self.n_masked
        labels, pose = labels.to(self.device), pose.to(self.device)
        if self.factored:
            psi, shift = pose // n_shifts, pose % n_shifts
            pixels = self._gather.view(n_shifts, m)[shift]                      # (n, M)
            pixels = pixels + (psi * (self.frame_size // len(self.grid.psi_deg)))[:, None]
        else:
            pixels = pose[:, None] * m + torch.arange(m, device=self.device)[None]
        index = (labels * self.frame_size)[:, None] + pixels
        frames.view(-1).index_add_(0, index.reshape(-1), images.to(self.device, torch.float32).reshape(-1))
        return frames

    def from_frame(self, frames: torch.Tensor) -> torch.Tensor:
        """``(K, frame_size)`` sums -> ``(K, box, box)`` in the reference frame (the matrix's adjoint)."""
        k = frames.shape[0]
        out = self._matrix_t @ frames.to(self.device, torch.float32).reshape(k, -1).t().contiguous()
        return out.t().contiguous().reshape(k, self.box_size, self.box_size)

    def coverage(self) -> torch.Tensor:
        """``(box, box)`` sum of interpolation weights over all poses (for normalising averages)."""
        ones = torch.ones(1, self.grid.n_poses, self.n_masked, device=self.device)
        return self.adjoint(ones)[0] / self.grid.n_poses


def pose_scores(images: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Inner products ``(n, K, P)`` of masked images ``(n, M)`` with templates ``(K, P, M)``."""
    k, p, m = templates.shape
    return (images @ templates.reshape(k * p, m).t()).reshape(-1, k, p)


def kept_rotation_scores(images: torch.Tensor, templates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scores ``(m, P)`` of images ``(m, D)`` against one class's templates ``(P, D)`` at the
    rotations ``keep`` ``(m, R)`` allows (-inf elsewhere): one product per rotation when few are
    kept, one product over every pose when most are."""
    m, n_psi = keep.shape
    n_shifts = templates.shape[0] // n_psi
    if float(keep.float().mean()) > DENSE_ROTATION_SHARE:
        scores = (images @ templates.t()).view(m, n_psi, n_shifts)
        return scores.masked_fill_(~keep.unsqueeze(2), -np.inf).view(m, -1)
    scores = images.new_full((m, n_psi, n_shifts), -np.inf)              # left -inf where not kept
    for r in torch.nonzero(keep.any(0)).flatten().tolist():
        rows = torch.nonzero(keep[:, r]).flatten()
        scores[rows, r] = images[rows] @ templates[r * n_shifts:(r + 1) * n_shifts].t()
    return scores.view(m, -1)


def chunk_size(n_templates: int, budget: int = 1 << 25) -> int:
    """Particles per chunk so that one ``(chunk, K*P)`` score matrix stays within ``budget`` floats."""
    return int(max(16, min(8192, budget // max(1, n_templates))))


def to_relion_pose(psi_deg: NDArray, shift_px: NDArray) -> tuple[NDArray, NDArray]:
    """Our pose -> RELION's ``rlnAnglePsi`` (degrees, in (-180, 180]) and origin in the same pixels.

    RELION's 2D projector samples the reference at ``A^-1 p`` with ``A`` the psi Euler matrix,
    which is our ``R(psi)``; its origin is the offset that re-centres the particle, i.e. minus
    where the particle sits (checked against ``relion_stack_create --apply_transformation``).
    """
    psi = np.mod(PSI_SIGN * np.asarray(psi_deg) + 180.0, 360.0) - 180.0
    return psi, ORIGIN_SIGN * np.asarray(shift_px)


def transform_images(images: torch.Tensor, psi_deg: torch.Tensor, shift_px: torch.Tensor,
                     to_reference: bool = False) -> torch.Tensor:
    """Apply a pose to ``(n, box, box)`` images by bilinear resampling (zero outside).

    With ``to_reference=False`` a reference is placed at the pose (the model above); with
    ``to_reference=True`` a particle is brought back into its reference frame (the inverse).
    ``psi_deg`` is ``(n,)`` and ``shift_px`` ``(n, 2)`` in the pixels of ``images``.
    """
    n, box = images.shape[0], images.shape[-1]
    c = box // 2
    coords = torch.arange(box, dtype=images.dtype, device=images.device) - c
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    psi = torch.deg2rad(psi_deg.to(images)).reshape(n, 1, 1)
    cos, sin = torch.cos(psi), torch.sin(psi)
    sx = shift_px[:, 0].to(images).reshape(n, 1, 1)
    sy = shift_px[:, 1].to(images).reshape(n, 1, 1)
    if to_reference:      # source = R(-psi) q + t
        src_x = cos * gx + sin * gy + sx
        src_y = -sin * gx + cos * gy + sy
    else:                 # source = R(psi) (p - t)
        src_x = cos * (gx - sx) - sin * (gy - sy)
        src_y = sin * (gx - sx) + cos * (gy - sy)
    grid = torch.stack([(2 * (src_x + c) + 1) / box - 1, (2 * (src_y + c) + 1) / box - 1], dim=-1)
    return torch.nn.functional.grid_sample(images.unsqueeze(1), grid, mode="bilinear",
                                           padding_mode="zeros", align_corners=False).squeeze(1)
