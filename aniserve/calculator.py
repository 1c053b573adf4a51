"""ANICalculator: an ANI model as an in-process ASE calculator (eV, Å; ASE's signs)."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from aniserve.neighbors import NeighborList
from aniserve.units import HARTREE_IN_EV


def periodic_cell(atoms) -> np.ndarray | None:
    """The cell (Å, rows) if ``atoms`` is periodic in 3D, None if not periodic at all."""
    if atoms.pbc.all():
        return np.array(atoms.cell.array)
    if not atoms.pbc.any():
        return None
    raise ValueError(f"atoms.pbc = {atoms.pbc.tolist()}: ANI models here support periodicity in all "
                     f"three directions or none; use a large vacuum gap for slabs or wires")


class ANICalculator(Calculator):
    """Energies (eV), forces (eV/Å) and stress (eV/Å³) of an ANI model.

    ``results['energy_std']`` holds the ensemble's standard deviation in eV, an
    uncertainty estimate.  model: a name (``ani-1ccx``), a path, or a loaded potential.
    skin: Å added to the neighbour-list cutoff; the list is reused between calls until
    an atom moves skin/2 (as in molecular dynamics).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model="ani-1ccx", device: str = "cpu", dtype: str = "float32", skin: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from aniserve.models import load_model

            model = load_model(model, device=device, dtype=dtype)
        self.model = model
        self.neighbors = NeighborList(model.cutoff, skin)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        cell = periodic_cell(self.atoms)
        if "stress" in properties and cell is None:
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        pairs = self.neighbors.pairs(torch.from_numpy(self.atoms.positions),
                                     None if cell is None else torch.from_numpy(cell))
        result = self.model.evaluate(self.atoms.numbers, self.atoms.positions, cell, pairs=[pairs])
        energy = float(result.energy) * HARTREE_IN_EV
        self.results = {
            "energy": energy, "free_energy": energy,
            "forces": result.forces * HARTREE_IN_EV,
            "energy_std": float(result.energy_std) * HARTREE_IN_EV,
        }
        if cell is not None:
            strain = 0.5 * (result.strain_derivative + result.strain_derivative.T)
            self.results["stress"] = full_3x3_to_voigt_6_stress(strain * HARTREE_IN_EV / self.atoms.get_volume())
