"""Atomic models (PDB / mmCIF) as weighted point clouds for simulating particles.

``gemmi`` reads both formats (plain or gzipped). The first biological assembly is built when the
file defines one (an asymmetric unit may hold several copies of the complex, or half of a
symmetric one); hydrogens, waters and ligands are dropped; each heavy atom weighs its atomic
number (its electron count, the first-order scattering weight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .errors import InputFileError


@dataclass(frozen=True)
class AtomicModel:
    """Heavy atoms of one structure, centred on their weighted centre."""

    name: str
    coords: NDArray[np.float64]     # (A, 3) Å
    weights: NDArray[np.float64]    # (A,) atomic numbers

    @property
    def diameter(self) -> float:
        """Largest distance from the centre, doubled (Å)."""
        return float(2 * np.linalg.norm(self.coords, axis=1).max())


def read_atomic_model(path: str | os.PathLike) -> AtomicModel:
    """Read a PDB or mmCIF file (``.gz`` too) into an :class:`AtomicModel`."""
    import gemmi

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputFileError(f"{path}: atomic model not found; give a PDB or mmCIF file (--pdb)")
    try:
        structure = gemmi.read_structure(path)
    except (RuntimeError, ValueError) as exc:
        raise InputFileError(f"{path}: not a readable PDB/mmCIF file ({exc})") from None
    if len(structure) == 0:
        raise InputFileError(f"{path}: the file holds no model")
    structure.setup_entities()
    model = structure[0]
    if structure.assemblies:
        model = gemmi.make_assembly(structure.assemblies[0], model, gemmi.HowToNameCopiedChain.AddNumber)
    coords, weights = [], []
    for chain in model:
        for residue in chain:
            if residue.is_water() or residue.het_flag == "H":
                continue
            for atom in residue:
                if atom.element.is_hydrogen:
                    continue
                coords.append(atom.pos.tolist())
                weights.append(atom.element.atomic_number)
    if not coords:
        raise InputFileError(f"{path}: no polymer heavy atoms found")
    xyz, w = np.asarray(coords, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    xyz -= np.average(xyz, axis=0, weights=w)
    return AtomicModel(os.path.basename(path), xyz, w)
