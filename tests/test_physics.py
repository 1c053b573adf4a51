"""Physics the potential must obey, checked against finite differences and symmetry."""

import math

import numpy as np
import pytest
import torch
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, cached_model, reference

from aniserve import kernels
from aniserve.neighbors import find_pairs

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def water_box():
    record = next(r for r in reference()["records"] if r["name"] == "water27-pbc")
    return np.array(record["numbers"]), np.array(record["positions"]), np.array(record["cell"])


def test_forces_are_minus_energy_gradient(ani1ccx):
    x = np.array(ETHANOL_POSITIONS)
    forces = ani1ccx.evaluate(ETHANOL_NUMBERS, x).forces
    h = 1e-5
    for atom, axis in [(0, 0), (2, 1), (8, 2), (4, 0)]:
        plus, minus = x.copy(), x.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(
            ani1ccx.evaluate(ETHANOL_NUMBERS, plus).energy - ani1ccx.evaluate(ETHANOL_NUMBERS, minus).energy
        ) / (2 * h)
        assert abs(numeric - forces[atom, axis]) < 1e-6


def test_strain_derivative_matches_finite_difference(ani1ccx):
    numbers, positions, cell = water_box()
    analytic = ani1ccx.evaluate(numbers, positions, cell).strain_derivative
    h = 1e-5
    for i, j in [(0, 0), (1, 2), (2, 1), (2, 2)]:
        eps = np.zeros((3, 3))
        eps[i, j] = h
        e_plus = ani1ccx.evaluate(numbers, positions @ (np.eye(3) + eps), cell @ (np.eye(3) + eps)).energy
        e_minus = ani1ccx.evaluate(numbers, positions @ (np.eye(3) - eps), cell @ (np.eye(3) - eps)).energy
        assert abs((e_plus - e_minus) / (2 * h) - analytic[i, j]) < 1e-6


def random_rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_rotation_translation_permutation_invariance(ani1ccx):
    x = np.array(ETHANOL_POSITIONS)
    base = ani1ccx.evaluate(ETHANOL_NUMBERS, x)
    rot = random_rotation(1)
    moved = ani1ccx.evaluate(ETHANOL_NUMBERS, x @ rot.T + [3.0, -7.0, 11.0])
    assert abs(moved.energy - base.energy) < 1e-9
    np.testing.assert_allclose(moved.forces, base.forces @ rot.T, atol=1e-9)
    perm = np.random.default_rng(2).permutation(len(x))
    permuted = ani1ccx.evaluate(np.array(ETHANOL_NUMBERS)[perm], x[perm])
    assert abs(permuted.energy - base.energy) < 1e-9
    np.testing.assert_allclose(permuted.forces, base.forces[perm], atol=1e-9)


@pytest.mark.parametrize("name", ["water27-pbc", "methane-tight-pbc"])
def test_supercell_has_eight_times_the_energy(ani1ccx, name):
    record = next(r for r in reference()["records"] if r["name"] == name)
    numbers, positions, cell = np.array(record["numbers"]), np.array(record["positions"]), np.array(record["cell"])
    shifts = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) @ cell
    big = ani1ccx.evaluate(np.tile(numbers, 8), (positions[None] + shifts[:, None]).reshape(-1, 3), 2 * cell)
    small = ani1ccx.evaluate(numbers, positions, cell)
    assert abs(big.energy - 8 * small.energy) < 1e-8
    np.testing.assert_allclose(big.forces[: len(numbers)], small.forces, atol=1e-8)


def test_wrapping_atoms_into_the_cell_changes_nothing(ani1ccx):
    numbers, positions, cell = water_box()
    shifted = positions + np.array([[3, -2, 1]] * len(positions)) @ cell  # whole-cell translations
    shifted[::2] += np.array([-1, 0, 2]) @ cell
    a = ani1ccx.evaluate(numbers, positions, cell)
    b = ani1ccx.evaluate(numbers, shifted, cell)
    assert abs(a.energy - b.energy) < 1e-9
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-9)
    np.testing.assert_allclose(a.strain_derivative, b.strain_derivative, atol=1e-8)


def test_molecules_far_apart_do_not_interact(ani1ccx):
    x = np.array(ETHANOL_POSITIONS)
    one = ani1ccx.evaluate(ETHANOL_NUMBERS, x).energy
    two = ani1ccx.evaluate(ETHANOL_NUMBERS * 2, np.concatenate([x, x + [40.0, 0, 0]])).energy
    assert abs(two - 2 * one) < 1e-9
    cell = np.diag([60.0, 30.0, 30.0])
    boxed = ani1ccx.evaluate(ETHANOL_NUMBERS * 2, np.concatenate([x, x + [30.0, 0, 0]]), cell).energy
    assert abs(boxed - 2 * one) < 1e-9


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("n_atoms", [30, 400])
def test_neighbour_pairs_match_ase(periodic, n_atoms):
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    rng = np.random.default_rng(n_atoms)
    cell = np.array([[9.0, 0, 0], [2.5, 8.0, 0], [-1.5, 1.0, 7.5]]) * (n_atoms / 30) ** (1 / 3)
    atoms = Atoms(numbers=[1] * n_atoms, positions=rng.uniform(-2, 12, (n_atoms, 3)), cell=cell, pbc=periodic)
    pairs = find_pairs(torch.tensor(atoms.positions), 5.2, torch.tensor(cell) if periodic else None)
    i, j, S = neighbor_list("ijS", atoms, 5.2)
    shifts = pairs.shift.long().tolist() if pairs.shift is not None else [[0, 0, 0]] * len(pairs)
    ours = sorted(zip(pairs.center.tolist(), pairs.neighbor.tolist(), map(tuple, shifts)))
    theirs = sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))
    assert ours == theirs
    assert bool((pairs.center[1:] >= pairs.center[:-1]).all())


def test_cell_shorter_than_cutoff_sees_its_own_images():
    cell = np.array([[2.0, 0, 0], [0.5, 2.2, 0], [0.3, 0.2, 2.1]])
    pairs = find_pairs(torch.zeros(1, 3, dtype=torch.float64), 5.2, torch.tensor(cell))
    assert len(pairs) > 50 and bool((pairs.neighbor == 0).all())
    vectors = pairs.shift.numpy() @ cell
    assert np.linalg.norm(vectors, axis=1).max() <= 5.2 and np.linalg.norm(vectors, axis=1).min() > 0


def test_angular_accumulation_is_twice_differentiable():
    """The featurizer's hand-written backward (outer product + index_add) against
    autograd's numerical checks; training on forces differentiates it twice."""
    from aniserve.aev import _OuterIndexAdd

    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.rand(7, 2, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([0, 2, 2, 1, 0, 3, 2])
    out = _OuterIndexAdd.apply(a, b, index, 4)
    expected = torch.zeros(4, 6, dtype=torch.float64).index_add_(
        0, index, (a[:, :, None] * b[:, None, :]).reshape(7, 6)
    )
    assert torch.equal(out, expected)
    assert torch.autograd.gradcheck(lambda x, y: _OuterIndexAdd.apply(x, y, index, 4), (a, b))
    assert torch.autograd.gradgradcheck(lambda x, y: _OuterIndexAdd.apply(x, y, index, 4), (a, b))


def test_angular_terms_derivatives_written_out_are_exact():
    """The angular terms' hand-derived first derivative against finite differences and
    against autograd of the plain composition; second derivatives (training on forces)
    too, with both inputs or one of them differentiable."""
    from aniserve.aev import _angular_terms, _AngularConstants, _AngularTerms

    g = torch.Generator().manual_seed(1)
    shf_z = torch.tensor([[0.2, 1.0, 2.5]], dtype=torch.float64)
    k = _AngularConstants(
        torch.cos(shf_z), torch.sin(shf_z), torch.tensor([[0.9, 1.6]], dtype=torch.float64), eta_a=8.0, zeta=32.0
    )

    def pair_terms(n):
        unit = torch.nn.functional.normalize(torch.randn(n, 3, dtype=torch.float64, generator=g), dim=1)
        distance = 0.8 + 2.5 * torch.rand(n, 1, dtype=torch.float64, generator=g)
        return torch.cat([unit, distance, 0.5 * torch.cos(distance * math.pi / 3.5) + 0.5], 1).requires_grad_(True)

    a, b = pair_terms(12), pair_terms(12)
    index = torch.randint(0, 5, (12,), generator=g)

    def terms(x, y):
        return _AngularTerms.apply(x, y, index, 5, k)

    assert torch.equal(terms(a, b), _angular_terms(a, b, index, 5, k))
    weights = torch.randn(5, 6, dtype=torch.float64, generator=g)
    written = torch.autograd.grad((terms(a, b) * weights).sum(), (a, b))
    chained = torch.autograd.grad((_angular_terms(a, b, index, 5, k) * weights).sum(), (a, b))
    for w, c in zip(written, chained):
        torch.testing.assert_close(w, c, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(terms, (a, b))
    assert torch.autograd.gradgradcheck(terms, (a, b))
    assert torch.autograd.gradgradcheck(lambda x: terms(x, b.detach()), (a,))


def test_featurizer_modes_agree(monkeypatch):
    """Three ways to the same AEVs and forces: eval mode on the CPU takes the compiled
    kernel; without it, the tensor version with the written-out angular derivative;
    training mode, autograd's chain (which force training differentiates again)."""
    model = cached_model("ani-1ccx", "float64")
    x = torch.tensor(ETHANOL_POSITIONS, dtype=torch.float64, requires_grad=True)
    species = model.species_indices(torch.tensor(ETHANOL_NUMBERS))
    pairs = find_pairs(x, model.cutoff)
    results = []
    for training, compiled in ((False, "on"), (False, "off"), (True, "on")):
        kernels.use("compiled" if compiled == "on" else "tensor")
        model.featurizer.train(training)
        try:
            features = model.featurizer(species, pairs.center, pairs.neighbor, x[pairs.neighbor] - x[pairs.center])
            weights = torch.linspace(-1, 1, features.numel(), dtype=torch.float64).reshape(features.shape)
            results.append((features, *torch.autograd.grad((features * weights).sum(), x)))
        finally:
            model.featurizer.train(False)
    assert "_AEVKernel" in results[0][0].grad_fn.name() and "_AEVKernel" not in results[1][0].grad_fn.name()
    for features, forces in results[1:]:
        torch.testing.assert_close(features, results[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(forces, results[0][1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("periodic", [False, True])
def test_evaluation_in_blocks_equals_one_pass(periodic):
    """Large systems are evaluated a block of center atoms at a time; forcing tiny
    blocks must reproduce energies, forces, strain and per-member results, batched too."""
    model = cached_model("ani-1ccx", "float64")
    numbers, positions, cell = water_box()
    batch_numbers = np.stack([numbers, numbers])
    batch_positions = np.stack([positions, positions + np.random.default_rng(0).normal(0, 0.05, positions.shape)])
    cells = np.stack([cell, cell * 1.02]) if periodic else None
    whole = model.evaluate(batch_numbers, batch_positions, cells, member_forces=True)
    try:
        model.block_pairs = 700  # about 12 blocks per water box
        blocked = model.evaluate(batch_numbers, batch_positions, cells, member_forces=True)
    finally:
        del model.block_pairs
    np.testing.assert_allclose(blocked.energy, whole.energy, atol=1e-9, rtol=0)
    np.testing.assert_allclose(blocked.forces, whole.forces, atol=1e-9, rtol=0)
    np.testing.assert_allclose(blocked.member_energies, whole.member_energies, atol=1e-9, rtol=0)
    np.testing.assert_allclose(blocked.member_forces, whole.member_forces, atol=1e-9, rtol=0)
    if periodic:
        np.testing.assert_allclose(blocked.strain_derivative, whole.strain_derivative, atol=1e-9, rtol=0)
        np.testing.assert_allclose(blocked.member_strain_derivatives, whole.member_strain_derivatives, atol=1e-9)


def test_padding_between_atoms_is_skipped_in_periodic_batches(ani1ccx):
    """0 marks padding wherever it stands; the periodic (per-structure) pair search must
    index the same real atoms as the flattened batch."""
    numbers, positions, cell = water_box()
    padded_numbers = np.insert(numbers, 5, 0)[None]
    padded_positions = np.insert(positions, 5, [50.0, 50.0, 50.0], axis=0)[None]
    got = ani1ccx.evaluate(padded_numbers, padded_positions, cell[None])
    want = ani1ccx.evaluate(numbers, positions, cell)
    assert abs(got.energy[0] - want.energy) < 1e-9
    np.testing.assert_allclose(np.delete(got.forces[0], 5, axis=0), want.forces, atol=1e-9)


def test_absent_species_columns_are_skipped_exactly():
    """Features of species a structure lacks are zero whatever the geometry, so the
    potential drops them and their first-layer weights; the results must equal a pass
    over every column, for molecules, batches mixing species, and blocked boxes."""
    model = cached_model("ani-1ccx", "float64")
    featurizer = model.featurizer
    species = model.species_indices(torch.tensor(ETHANOL_NUMBERS))  # C, O, H: no N
    pairs = find_pairs(torch.tensor(ETHANOL_POSITIONS, dtype=torch.float64), model.cutoff)
    x = torch.tensor(ETHANOL_POSITIONS, dtype=torch.float64)
    features = featurizer(species, pairs.center, pairs.neighbor, x[pairs.neighbor] - x[pairs.center])
    columns = featurizer.nonzero_columns(tuple(torch.unique(species).tolist()))
    dropped = torch.ones(features.shape[1], dtype=torch.bool)
    dropped[columns] = False
    assert int(dropped.sum()) == 16 + 4 * 32  # N's radial block and the 4 angular pairs with N
    assert torch.all(features[:, dropped] == 0)
    assert featurizer.nonzero_columns((0, 1, 2, 3)) is None
    assert featurizer.nonzero_columns((2, 0)) is featurizer.nonzero_columns((0, 2))

    numbers, positions, cell = water_box()
    cases = [
        (ETHANOL_NUMBERS, ETHANOL_POSITIONS, None, {}),
        (
            np.array([[6, 1, 1, 1, 1, 0], [7, 1, 1, 1, 0, 0]]),
            np.random.default_rng(1).normal(0, 1.2, (2, 6, 3)),
            None,
            {},
        ),
        (numbers, positions, cell, {"block_pairs": 700}),
        (np.stack([numbers, numbers]), np.stack([positions, positions + 0.05]), None, {"block_pairs": 700}),
    ]
    for numbers, positions, cell, options in cases:
        for key, value in options.items():
            setattr(model, key, value)
        try:
            skipped = model.evaluate(numbers, positions, cell, member_forces=True)
            featurizer.nonzero_columns = lambda present: None  # every column, every weight
            full = model.evaluate(numbers, positions, cell, member_forces=True)
        finally:
            del featurizer.nonzero_columns
            for key in options:
                delattr(model, key)
        np.testing.assert_allclose(skipped.energy, full.energy, atol=1e-10, rtol=0)
        np.testing.assert_allclose(skipped.member_forces, full.member_forces, atol=1e-10, rtol=0)
        if cell is not None:
            np.testing.assert_allclose(skipped.strain_derivative, full.strain_derivative, atol=1e-10, rtol=0)
