"""Per-image background normalisation, as RELION's Extract does it.

Every image is shifted and scaled so that its background (the pixels outside a circle of
``radius_px`` around the centre) has mean 0 and standard deviation 1. Already normalised
stacks are unchanged (up to rounding); uint16 stacks, stacks with a constant offset and
stacks whose images carry different offsets or gains become comparable.

>>> images = normalise_background(raw, radius_px=0.3 * raw.shape[-1])
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .fourier import circular_mask


def background_radius(box_size: int, particle_radius_px: float) -> float:
    """Radius outside which pixels count as background: the particle's, at most ``box/2 - 1``
    (the corners are always left, about a fifth of the box)."""
    return float(min(particle_radius_px, box_size / 2 - 1))


def background_mask(box_size: int, radius_px: float) -> NDArray[np.bool_]:
    """``(box, box)`` True outside the circle of ``radius_px`` around the box centre."""
    return ~circular_mask(box_size, radius_px)


def normalise_background(images: NDArray, radius_px: float) -> tuple[NDArray[np.float32], NDArray]:
    """``(n, box, box)`` images with background mean 0 and sd 1, and the ``(n,)`` background sd
    before scaling (0 or not finite marks an image that cannot be normalised: left unscaled)."""
    images = np.asarray(images, dtype=np.float32)
    background = images[:, background_mask(images.shape[-1], radius_px)].astype(np.float64)
    mean = background.mean(axis=1)
    sd = background.std(axis=1)
    usable = np.isfinite(sd) & (sd > 0)
    scale = np.where(usable, sd, 1.0)
    out = ((images - mean[:, None, None]) / scale[:, None, None]).astype(np.float32)
    return out, sd
