"""Neighbour lists with a skin, reused between calls: results equal a fresh search's
while atoms move less than skin/2, and the list is rebuilt when they move more."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet

from aniserve.calculator import ANICalculator
from aniserve.neighbors import NeighborList
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS
from test_physics import water_box


def assert_same(a, b):
    assert abs(float(a.energy) - float(b.energy)) < 1e-10
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-10, rtol=0)
    if a.strain_derivative is not None:
        np.testing.assert_allclose(a.strain_derivative, b.strain_derivative, atol=1e-10, rtol=0)


@pytest.mark.parametrize("periodic", [False, True])
def test_reused_list_gives_fresh_results_until_rebuild(ani1ccx, periodic):
    if periodic:
        numbers, positions, cell = water_box()
    else:
        numbers, positions, cell = np.array(ETHANOL_NUMBERS), np.array(ETHANOL_POSITIONS), None
    listed = NeighborList(ani1ccx.cutoff, skin=1.0)
    rng = np.random.default_rng(0)
    # Small steps: every atom stays within skin/2 of where the list was built.
    for step in range(4):
        moved = positions + rng.uniform(-0.25, 0.25, positions.shape) * (step > 0)
        pairs = listed.pairs(torch.tensor(moved), None if cell is None else torch.tensor(cell))
        assert_same(ani1ccx.evaluate(numbers, moved, cell, pairs=[pairs]), ani1ccx.evaluate(numbers, moved, cell))
    assert listed.builds == 1
    # One atom moves 0.6 Å (> skin/2): the list must be rebuilt, and still be right.
    far = moved.copy()
    far[0] += [0.6, 0.0, 0.0]
    pairs = listed.pairs(torch.tensor(far), None if cell is None else torch.tensor(cell))
    assert listed.builds == 2
    assert_same(ani1ccx.evaluate(numbers, far, cell, pairs=[pairs]), ani1ccx.evaluate(numbers, far, cell))


def test_cell_change_and_lattice_jump_rebuild(ani1ccx):
    numbers, positions, cell = water_box()
    listed = NeighborList(ani1ccx.cutoff, skin=1.0)
    listed.pairs(torch.tensor(positions), torch.tensor(cell))
    # An atom re-wrapped by a lattice vector: same physics, list rebuilt.
    jumped = positions.copy()
    jumped[3] += cell[0]
    pairs = listed.pairs(torch.tensor(jumped), torch.tensor(cell))
    assert listed.builds == 2
    assert_same(ani1ccx.evaluate(numbers, jumped, cell, pairs=[pairs]), ani1ccx.evaluate(numbers, positions, cell))
    # A 0.5 % larger cell, positions scaled with it.
    bigger = cell * 1.005
    scaled = jumped * 1.005
    pairs = listed.pairs(torch.tensor(scaled), torch.tensor(bigger))
    assert listed.builds == 3
    assert_same(ani1ccx.evaluate(numbers, scaled, bigger, pairs=[pairs]), ani1ccx.evaluate(numbers, scaled, bigger))


def test_calculator_md_matches_fresh_search(ani1ccx):
    """An ASE MD trajectory with the reused list gives the energies of a fresh search."""
    numbers, positions, cell = water_box()
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)
    # Maxwell–Boltzmann velocities at 600 K (σ = √(kT/m) per component).
    sigma = np.sqrt(600 * units.kB / atoms.get_masses())[:, None]
    atoms.set_momenta(atoms.get_masses()[:, None] * sigma * np.random.default_rng(1).normal(size=(len(atoms), 3)))
    atoms.calc = ANICalculator(ani1ccx, skin=0.3)
    energies = []
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dynamics.attach(lambda: energies.append((atoms.get_potential_energy(), atoms.positions.copy())))
    dynamics.run(25)
    builds = atoms.calc.neighbors.builds
    assert 1 < builds < 25, builds  # reused most steps, rebuilt at least once at 600 K
    fresh = ANICalculator(ani1ccx, skin=0.0)
    for energy, x in energies[::6]:
        check = Atoms(numbers=numbers, positions=x, cell=cell, pbc=True)
        check.calc = fresh
        assert abs(check.get_potential_energy() - energy) < 1e-8
