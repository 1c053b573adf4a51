"""ANICalculator: an ANI model as an in-process ASE calculator (eV, Å; ASE's signs)."""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from aniserve.serving import Evaluator, Structure
from aniserve.units import HARTREE_IN_EV


def periodic_cell(atoms) -> np.ndarray | None:
    """The cell (Å, rows) if ``atoms`` is periodic in 3D, None if not periodic at all."""
    if atoms.pbc.all():
        return np.array(atoms.cell.array)
    if not atoms.pbc.any():
        return None
    raise ValueError(
        f"atoms.pbc = {atoms.pbc.tolist()}: ANI models here support periodicity in all "
        f"three directions or none; use a large vacuum gap for slabs or wires"
    )


def ase_results(result, volume: float | None) -> dict:
    """A serving result (Hartree, Å) in ASE's units and signs: energy and free_energy
    (eV), forces (eV/Å), energy_std (eV), and with a cell (``volume`` in Å³) the stress
    (eV/Å³, Voigt order).  The one place where results become ASE's."""
    energy = float(result.energy) * HARTREE_IN_EV
    out = {
        "energy": energy,
        "free_energy": energy,
        "forces": np.asarray(result.forces) * HARTREE_IN_EV,
        "energy_std": float(result.energy_std) * HARTREE_IN_EV,
    }
    if volume is not None:
        # ASE's stress is dE/dε / V = −virial / V.
        out["stress"] = full_3x3_to_voigt_6_stress(-np.asarray(result.virial) * HARTREE_IN_EV / volume)
    return out


class ANICalculator(Calculator):
    """Energies (eV), forces (eV/Å) and stress (eV/Å³) of an ANI model.

    ``results['energy_std']`` holds the ensemble's standard deviation in eV, an
    uncertainty estimate.  model: a name, a path, or a loaded potential (default: the
    embedded model).  skin: Å added to the neighbour-list cutoff; the list is reused
    between calls until an atom moves skin/2 (as in molecular dynamics).  collect: an
    ``aniserve.collect.Collector`` (or a path, for one at the threshold the model states) that
    writes the structures whose ensemble spread is large.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self, model=None, device: str = "cpu", dtype: str = "float32", skin: float = 1.0, collect=None, **kwargs
    ):
        super().__init__(**kwargs)
        if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
            from aniserve.embedded import DEFAULT_MODEL
            from aniserve.models import load_model

            model = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
        if collect is not None and not hasattr(collect, "consider"):
            from aniserve.collect import Collector

            collect = Collector(collect)
        self.model = model
        self.evaluator = Evaluator(model, skin=skin, collector=collect)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        cell = periodic_cell(self.atoms)
        if "stress" in properties and cell is None:
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        structure = Structure(self.atoms.numbers, np.array(self.atoms.positions), cell)
        (result,) = self.evaluator.evaluate([("ase-calculator", structure)])
        self.results = ase_results(result, self.atoms.get_volume() if cell is not None else None)
