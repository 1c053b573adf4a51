"""The ASE calculator: ASE units and sign conventions."""

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, cached_model, reference

from aniserve import ANICalculator
from aniserve.units import HARTREE_IN_EV

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def test_energy_forces_in_ev(ani1ccx):
    atoms = Atoms(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)
    atoms.calc = ANICalculator(ani1ccx)
    ref = ani1ccx.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    assert atoms.get_potential_energy() == pytest.approx(float(ref.energy) * HARTREE_IN_EV, abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), ref.forces * HARTREE_IN_EV, atol=1e-9)
    assert atoms.calc.results["energy_std"] == pytest.approx(float(ref.energy_std) * HARTREE_IN_EV)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_stress_matches_numerical_stress():
    record = next(r for r in reference()["records"] if r["name"] == "water27-pbc")
    atoms = Atoms(numbers=record["numbers"], positions=record["positions"], cell=record["cell"], pbc=True)
    atoms.calc = ANICalculator(cached_model("ani-1ccx", "float64"))
    numeric = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(atoms.get_stress(), numeric, atol=1e-7)


def test_mixed_periodicity_is_refused(ani1ccx):
    atoms = Atoms(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS, cell=[10, 10, 10], pbc=[True, True, False])
    atoms.calc = ANICalculator(ani1ccx)
    with pytest.raises(ValueError, match="all\\s+three directions or none"):
        atoms.get_potential_energy()
