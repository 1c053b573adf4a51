"""ANICalculator: an ANI model as an in-process ASE calculator (eV, Å; ASE's signs)."""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

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
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model="ani-1ccx", device: str = "cpu", dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from aniserve.models import load_model

            model = load_model(model, device=device, dtype=dtype)
        self.model = model

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        cell = periodic_cell(self.atoms)
        if "stress" in properties and cell is None:
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        result = self.model.evaluate(self.atoms.numbers, self.atoms.positions, cell)
        energy = float(result.energy) * HARTREE_IN_EV
        self.results = {
            "energy": energy, "free_energy": energy,
            "forces": result.forces * HARTREE_IN_EV,
            "energy_std": float(result.energy_std) * HARTREE_IN_EV,
        }
        if cell is not None:
            strain = 0.5 * (result.strain_derivative + result.strain_derivative.T)
            self.results["stress"] = full_3x3_to_voigt_6_stress(strain * HARTREE_IN_EV / self.atoms.get_volume())
