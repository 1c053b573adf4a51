"""The i-PI side of the unit edge, shared by the socket driver (``aniserve.driver``) and
i-PI's in-process PES (``aniserve.ipi_pes``): Bohr → Å and i-PI's cell (vectors as
columns) → rows on the way in; Hartree/Å → Hartree/Bohr on the way out (energies and
virials are Hartree on both sides); the extras string i-PI reads as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from aniserve.contracts import Result, Structure
from aniserve.units import BOHR_IN_ANGSTROM

PBC_CHOICES = ("auto", "yes", "no")
EXTRAS_CHOICES = ("committee", "std", "none")


def is_periodic(cell_h: np.ndarray, pbc: str = "auto") -> bool:
    """Whether i-PI's cell ``h`` makes the structure periodic: ``pbc`` 'yes' or 'no', or
    'auto', periodic when the cell is non-singular.  A cell with NaN or infinite entries
    is refused whatever ``pbc`` says: never read as "no cell"."""
    # Plain floats: for one 3 × 3 cell per structure, numpy's calls cost ~40 µs each
    # (a 64-connection batch noticed them).
    flat = cell_h.ravel().tolist()
    if not all(map(math.isfinite, flat)):
        raise ValueError("the cell contains NaN or infinite values")
    if pbc != "auto":
        return pbc == "yes"
    a0, a1, a2, b0, b1, b2, c0, c1, c2 = flat
    volume = abs(a0 * (b1 * c2 - b2 * c1) - a1 * (b0 * c2 - b2 * c0) + a2 * (b0 * c1 - b1 * c0))
    # Singular relative to the cell's own size, so that a tiny but well-formed box is a
    # box (and refused as too thin), not silently an isolated molecule.  Rows and
    # columns give the same product bound (Hadamard), either will do.
    lengths = (
        math.sqrt(a0 * a0 + a1 * a1 + a2 * a2)
        * math.sqrt(b0 * b0 + b1 * b1 + b2 * b2)
        * math.sqrt(c0 * c0 + c1 * c1 + c2 * c2)
    )
    return lengths > 0 and volume > 1e-9 * lengths


def structure_from_ipi(numbers: np.ndarray, cell_h: np.ndarray, positions_bohr: np.ndarray, pbc: str) -> Structure:
    """One structure as i-PI sends it (cell ``h`` and positions (N, 3) in Bohr), in Å."""
    cell = cell_h.T * BOHR_IN_ANGSTROM if is_periodic(cell_h, pbc) else None
    return Structure(numbers, positions_bohr * BOHR_IN_ANGSTROM, cell)


def results_to_ipi(results: Sequence[Result]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energies (B,), forces (B, N, 3) in Hartree/Bohr and virials (B, 3, 3), Hartree."""
    energies = np.array([r.energy for r in results])
    forces = np.array([r.forces for r in results]) * BOHR_IN_ANGSTROM
    virials = np.array([r.virial for r in results])
    return energies, forces, virials


def extras_json(result: Result, extras: str) -> str:
    """The extras string: '' ('none'), the ensemble's energy std ('std'), or also each
    member's energy, forces and virial for i-PI's committee force field ('committee')."""
    if extras == "none":
        return ""
    extra: dict[str, object] = {"energy_std": result.energy_std}
    if extras == "committee":
        if result.member_forces is None:
            raise ValueError("extras 'committee' needs an evaluator made with members=True")
        k = len(result.member_energies)
        extra["committee_pot"] = result.member_energies.tolist()
        extra["committee_force"] = (result.member_forces * BOHR_IN_ANGSTROM).reshape(k, -1).tolist()
        extra["committee_virial"] = (
            result.member_virials.reshape(k, 9).tolist() if result.member_virials is not None else [[0.0] * 9] * k
        )
    return json.dumps(extra)
