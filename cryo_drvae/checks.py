"""Sanity checks on valid-looking input that would give a silently wrong result.

Each check either refuses with one line naming the flag or file and the fix, or warns once.

>>> checks.warn_duplicate_rows(table)
>>> checks.check_particle_diameter(diameter, box_size=64, pixel_size=3.0)
"""

from __future__ import annotations

import logging

from .errors import ConfigError
from .evaluate import normalise_image_name
from .normalise import background_radius
from .star_io import IMAGE_NAME, ParticleTable

logger = logging.getLogger(__name__)

MIN_DIAMETER_PX = 4.0        # fewer pixels across than this is no particle at all
SMALL_DIAMETER_FRACTION = 0.25   # extraction boxes are ~1.5-2.5x the particle: warn below this


def warn_duplicate_rows(table: ParticleTable) -> int:
    """Warn when rows point at the same image (each copy would be classified, and weigh, twice).

    Returns the number of repeated rows.
    """
    if IMAGE_NAME not in table.particles.columns:
        return 0
    names = table.particles[IMAGE_NAME].map(normalise_image_name)
    repeated = names.duplicated()
    count = int(repeated.sum())
    if count:
        examples = ", ".join(names[repeated].unique()[:3].tolist())
        logger.warning("%s: %d of %d rows repeat an image listed earlier (e.g. %s); each copy is "
                       "classified and counted in its class; remove the duplicates unless that is "
                       "intended", table.path, count, len(table), examples)
    return count


def check_particle_diameter(diameter: float, box_size: int, pixel_size: float) -> None:
    """Refuse a particle diameter larger than the box or under 4 pixels; warn when small.

    Raises
    ------
    ConfigError
        The diameter cannot be right for these images (names ``--particle_diameter``).
    """
    box_angst = box_size * pixel_size
    if diameter > box_angst:
        raise ConfigError(f"--particle_diameter {diameter:g} Å is larger than the box "
                          f"({box_size} px x {pixel_size:g} Å/px = {box_angst:g} Å); give the "
                          f"particle's diameter in Å (0 = 60% of the box)")
    if diameter < MIN_DIAMETER_PX * pixel_size:
        raise ConfigError(f"--particle_diameter {diameter:g} Å is under {MIN_DIAMETER_PX:g} pixels "
                          f"({pixel_size:g} Å/px); give the particle's diameter in Å, not pixels "
                          f"or nm (0 = 60% of the {box_angst:g} Å box)")
    if diameter < SMALL_DIAMETER_FRACTION * box_angst:
        logger.warning("--particle_diameter %g Å is under %d%% of the %g Å box; the mask will cut "
                       "off most of the particle unless it really is that small", diameter,
                       round(100 * SMALL_DIAMETER_FRACTION), box_angst)


def background_radius_px(diameter: float, box_size: int, pixel_size: float) -> float:
    """Radius in original pixels outside which images are normalised (the particle's)."""
    return background_radius(box_size, diameter / 2 / pixel_size)
