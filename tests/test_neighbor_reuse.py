"""Neighbour lists with a skin, reused between calls: results equal a fresh search's
while atoms move less than skin/2, and the list is rebuilt when they move more."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS
from test_physics import water_box

from aniserve.calculator import ANICalculator
from aniserve.neighbors import NeighborList, find_pairs

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


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
    # A cell 20 % smaller: pairs 6.2 Å apart at the build are now within the cutoff.
    squeezed = listed.pairs(torch.tensor(jumped * 0.8), torch.tensor(cell * 0.8))
    assert listed.builds == 3
    assert_same(
        ani1ccx.evaluate(numbers, jumped * 0.8, cell * 0.8, pairs=[squeezed]),
        ani1ccx.evaluate(numbers, jumped * 0.8, cell * 0.8),
    )


def pair_set(pairs, cutoff=None, positions=None, cell=None):
    keys = zip(pairs.center.tolist(), pairs.neighbor.tolist(), map(tuple, pairs.shift.round().long().tolist()))
    if cutoff is None:
        return set(keys)
    vectors = positions[pairs.neighbor] - positions[pairs.center] + pairs.shift @ cell
    return {key for key, d in zip(keys, vectors.norm(dim=1).tolist()) if d <= cutoff}


@pytest.mark.slow
def test_constant_pressure_steps_reuse_the_list_while_it_is_complete(ani1ccx):
    """Barostat steps deform the cell (and the positions with it) a little each time: the
    list is reused while the deformation bound allows, and whenever it is reused every
    pair within the cutoff is in it (random deformations up to and past the bound)."""
    numbers, positions, cell = water_box()
    rng = np.random.default_rng(3)
    listed = NeighborList(ani1ccx.cutoff, skin=1.0)
    x, h = torch.tensor(positions), torch.tensor(cell)
    listed.pairs(x, h)
    reused = 0
    for _ in range(60):
        deform = torch.eye(3, dtype=torch.float64) + torch.tensor(rng.normal(0, 0.006, (3, 3)))
        x = x @ deform + torch.tensor(rng.normal(0, 0.02, x.shape))
        h = h @ deform
        builds = listed.builds
        pairs = listed.pairs(x, h)
        if listed.builds == builds:
            reused += 1
            assert pair_set(find_pairs(x, ani1ccx.cutoff, h)) <= pair_set(pairs, ani1ccx.cutoff, x, h)
    assert 0 < listed.builds - 1 < reused  # both paths taken, mostly reuse
    assert_same(
        ani1ccx.evaluate(numbers, x.numpy(), h.numpy(), pairs=[pairs]), ani1ccx.evaluate(numbers, x.numpy(), h.numpy())
    )
    # The cell changes but the atoms stay put: far from the origin that is a large move
    # relative to the deformed frame, and the list must still hold every pair.
    h2 = h * 1.03
    pairs = listed.pairs(x, h2)
    assert pair_set(find_pairs(x, ani1ccx.cutoff, h2)) <= pair_set(pairs, ani1ccx.cutoff, x, h2)


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
    builds = atoms.calc.evaluator.neighbor_list("ase-calculator").builds
    assert 1 < builds < 25, builds  # reused most steps, rebuilt at least once at 600 K
    fresh = ANICalculator(ani1ccx, skin=0.0)
    for energy, x in energies[::6]:
        check = Atoms(numbers=numbers, positions=x, cell=cell, pbc=True)
        check.calc = fresh
        assert abs(check.get_potential_energy() - energy) < 1e-8


@pytest.mark.parametrize("case", ["compressed with the atoms", "compressed under still atoms"])
def test_cell_deformation_bound_catches_pairs_coming_into_range(case):
    """Two atoms whose nearest image is just beyond cutoff + skin at the build come within
    the cutoff after the cell shrinks — with the atoms scaled along (the bound's σ_min
    term) or left in place (its deformation-removed displacements)."""
    cutoff, box = 5.2, 20.0
    x = torch.tensor([[1.0, 10.0, 10.0], [14.6, 10.0, 10.0]], dtype=torch.float64)  # image 6.4 Å apart
    h = torch.eye(3, dtype=torch.float64) * box
    listed = NeighborList(cutoff, skin=1.0)
    assert len(listed.pairs(x, h)) == 0
    scale = 0.8 if case == "compressed with the atoms" else 0.93
    x2 = x * scale if case == "compressed with the atoms" else x
    pairs = listed.pairs(x2, h * scale)
    assert pair_set(find_pairs(x2, cutoff, h * scale)) <= pair_set(pairs, cutoff, x2, h * scale)
    assert len(pair_set(pairs, cutoff, x2, h * scale)) == 2 and listed.builds == 2
