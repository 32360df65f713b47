"""Contrast transfer function, computed exactly as RELION 3.1 does.

>>> params = CtfParams.from_arrays(defocus_u=[20000.0], defocus_v=[18000.0], defocus_angle=[30.0])
>>> ctf = ctf_images(params, box_size=64, pixel_size=3.0)     # (1, 64, 33), rfft layout
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from . import star_io as sio
from .errors import InputFileError
from .fourier import frequency_grid


def electron_wavelength(voltage_kv: NDArray) -> NDArray:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


@dataclass(frozen=True)
class CtfParams:
    """Per-particle CTF parameters, one array entry per particle.

    Units: defocus in Å, angle and phase shift in degrees, voltage in kV, Cs in mm,
    B-factor in Å^2.
    """

    defocus_u: NDArray
    defocus_v: NDArray
    defocus_angle: NDArray
    voltage: NDArray
    cs: NDArray
    amplitude_contrast: NDArray
    phase_shift: NDArray
    bfactor: NDArray
    scale: NDArray

    def __len__(self) -> int:
        return len(self.defocus_u)

    @classmethod
    def from_arrays(cls, defocus_u: ArrayLike, defocus_v: ArrayLike, defocus_angle: ArrayLike,
                    voltage: ArrayLike = 300.0, cs: ArrayLike = 2.7,
                    amplitude_contrast: ArrayLike = 0.1, phase_shift: ArrayLike = 0.0,
                    bfactor: ArrayLike = 0.0, scale: ArrayLike = 1.0) -> CtfParams:
        n = len(np.atleast_1d(defocus_u))

        def column(values: ArrayLike) -> NDArray:
            return np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)).copy()

        return cls(*(column(v) for v in (defocus_u, defocus_v, defocus_angle, voltage, cs,
                                         amplitude_contrast, phase_shift, bfactor, scale)))

    def subset(self, index: ArrayLike) -> CtfParams:
        return CtfParams(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def params_from_particles(particles: pd.DataFrame, source: str = "particles") -> CtfParams:
    """CTF parameters from a particle table whose optics columns were merged per row.

    Raises
    ------
    InputFileError
        If a required CTF column is missing or holds non-finite values.
    """
    required = [sio.DEFOCUS_U, sio.DEFOCUS_V, sio.DEFOCUS_ANGLE, sio.VOLTAGE,
                sio.SPHERICAL_ABERRATION, sio.AMPLITUDE_CONTRAST]
    missing = [c for c in required if c not in particles.columns]
    if missing:
        raise InputFileError(f"{source}: missing CTF column(s) {', '.join(missing)}; "
                             f"run CTF estimation (CtfFind) before extraction, or pass --no_ctf")
    premultiplied = "rlnCtfDataAreCtfPremultiplied"
    if premultiplied in particles.columns:
        flagged = pd.to_numeric(particles[premultiplied], errors="coerce").fillna(0).to_numpy() != 0
        if flagged.any():
            raise InputFileError(f"{source}: {premultiplied} = 1 for {int(flagged.sum())} particles "
                                 f"(images already multiplied by their CTF), which cryo-drvae does not "
                                 f"model; re-extract without CTF premultiplication, or pass --no_ctf")
    optional = {sio.PHASE_SHIFT: 0.0, sio.CTF_BFACTOR: 0.0, sio.CTF_SCALEFACTOR: 1.0}
    values = {c: particles[c].to_numpy(np.float64) for c in required}
    values.update({c: particles[c].to_numpy(np.float64) if c in particles.columns
                   else np.full(len(particles), default) for c, default in optional.items()})
    bad = [c for c, v in values.items() if not np.all(np.isfinite(v))]
    if bad:
        raise InputFileError(f"{source}: non-finite values in {', '.join(bad)}; "
                             f"fix or remove those particles (e.g. relion_star_handler)")
    return CtfParams(values[sio.DEFOCUS_U], values[sio.DEFOCUS_V], values[sio.DEFOCUS_ANGLE],
                     values[sio.VOLTAGE], values[sio.SPHERICAL_ABERRATION],
                     values[sio.AMPLITUDE_CONTRAST], values[sio.PHASE_SHIFT],
                     values[sio.CTF_BFACTOR], values[sio.CTF_SCALEFACTOR])


def ctf_images(params: CtfParams, box_size: int, pixel_size: float | NDArray,
               rfft: bool = True, chunk: int = 4096) -> NDArray[np.float32]:
    """CTF of every particle on the FFT grid, ``(n, box, box//2+1)`` (or ``(n, box, box)``).

    ``pixel_size`` may be one value or one per particle (Å/px of the image given).
    Vectorised over particles in chunks of ``chunk``.
    """
    n = len(params)
    pixel_size = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (n,))
    ky0, kx0 = frequency_grid(box_size, 1.0, rfft)
    out = np.empty((n,) + ky0.shape, dtype=np.float32)
    for start in range(0, n, chunk):
        part = slice(start, min(n, start + chunk))
        out[part] = _ctf_chunk(params.subset(part), ky0, kx0, pixel_size[part])
    return out


def _ctf_chunk(p: CtfParams, ky0: NDArray, kx0: NDArray, pixel_size: NDArray) -> NDArray:
    col = (slice(None), None, None)
    ky, kx = ky0[None] / pixel_size[col], kx0[None] / pixel_size[col]
    k2 = kx ** 2 + ky ** 2
    lam = electron_wavelength(p.voltage)[col]
    q0 = p.amplitude_contrast[col]
    angle = np.arctan2(ky, kx) - np.deg2rad(p.defocus_angle)[col]
    mean_df = -(p.defocus_u + p.defocus_v)[col] / 2.0
    dev_df = -(p.defocus_u - p.defocus_v)[col] / 2.0
    deltaf = mean_df + dev_df * np.cos(2.0 * angle)
    chi = (np.pi * lam * deltaf * k2 + 0.5 * np.pi * p.cs[col] * 1e7 * lam ** 3 * k2 ** 2
           - np.deg2rad(p.phase_shift)[col] - np.arctan(q0 / np.sqrt(1.0 - q0 ** 2)))
    return -np.sin(chi) * p.scale[col] * np.exp(-p.bfactor[col] / 4.0 * k2)
