"""The compiled serving step (aniserve/kernels/step.cpp): ``evaluate`` without an
autograd graph gives what the autograd path and the tensor operations give, in every
layout a server meets (molecule, periodic box, padded batch, blocks of a large system,
a Δ model), keeps up with changed weights, and refuses what it is handed out of range."""

import numpy as np
import pytest
import torch
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, cached_model

from aniserve import kernels
from aniserve.bench.speed import water_box

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def cases():
    """(label, numbers, positions, cell): a molecule, a periodic box, a padded batch of
    two periodic structures, and a batch of molecules."""
    numbers, positions, cell = water_box(3)
    ethanol = np.array(ETHANOL_POSITIONS)
    padded = np.zeros((2, len(numbers)), dtype=int)
    padded[0], padded[1, :-3] = numbers, numbers[:-3]
    batch_positions = np.stack([positions, positions + 0.05])
    return [
        ("ethanol", ETHANOL_NUMBERS, ethanol, None),
        ("water box", numbers, positions, cell),
        ("padded periodic batch", padded, batch_positions, np.stack([cell, cell * 1.01])),
        ("molecules", np.stack([ETHANOL_NUMBERS] * 3), np.stack([ethanol, ethanol + 0.1, ethanol[::-1].copy()]), None),
    ]


def autograd_path(model, monkeypatch):
    """The same model evaluated with the compiled AEV and network kernels but autograd
    between them (the path before the step, still the one for member forces)."""
    monkeypatch.setattr(model, "_step_plan", lambda present: None)


def evaluate_both(model, numbers, positions, cell, monkeypatch):
    step = model.evaluate(numbers, positions, cell)
    assert model.__dict__["_step_plans"], "the compiled step did not run"
    with monkeypatch.context() as m:
        autograd_path(model, m)
        reference = model.evaluate(numbers, positions, cell)
    return step, reference


@pytest.mark.parametrize("name", ["ani-1ccx", "aniserve-1x-ccsdt"])
def test_step_equals_the_autograd_path_in_float64(name, monkeypatch):
    model = cached_model(name, "float64")
    for label, numbers, positions, cell in cases():
        step, reference = evaluate_both(model, numbers, positions, cell, monkeypatch)
        np.testing.assert_allclose(step.energy, reference.energy, rtol=0, atol=1e-9, err_msg=label)
        np.testing.assert_allclose(step.member_energies, reference.member_energies, rtol=0, atol=1e-9, err_msg=label)
        np.testing.assert_allclose(step.energy_std, reference.energy_std, rtol=0, atol=1e-9, err_msg=label)
        np.testing.assert_allclose(step.forces, reference.forces, rtol=0, atol=1e-10, err_msg=label)
        if cell is not None:
            np.testing.assert_allclose(step.strain_derivative, reference.strain_derivative, atol=1e-9, err_msg=label)


@pytest.mark.parametrize("name", ["ani-1ccx", "aniserve-1x-ccsdt"])
def test_step_float32_forces_equal_the_tensor_path(name, monkeypatch):
    """The issue's bar: float32 forces of the compiled step within 1e-5 (relative to the
    largest force) of the tensor operations' in float32, energies within float32's
    rounding of a sum of atomic energies."""
    model = cached_model(name, "float32")
    for label, numbers, positions, cell in cases():
        step = model.evaluate(numbers, positions, cell)
        with kernels.using("tensor"):
            tensor = model.evaluate(numbers, positions, cell)
        scale = np.abs(tensor.forces).max()
        assert np.abs(step.forces - tensor.forces).max() <= 1e-5 * scale, label
        atoms = np.count_nonzero(np.asarray(numbers))
        np.testing.assert_allclose(step.energy, tensor.energy, rtol=0, atol=2e-6 * atoms, err_msg=label)


def test_large_systems_go_through_the_step_in_blocks(monkeypatch):
    model = cached_model("ani-1ccx", "float64")
    numbers, positions, cell = water_box(4)
    whole = model.evaluate(numbers, positions, cell)
    monkeypatch.setattr(model, "block_pairs", 2_000)  # ~30 blocks
    blocked, reference = evaluate_both(model, numbers, positions, cell, monkeypatch)
    for result in (blocked, reference):
        assert abs(result.energy - whole.energy) < 1e-9
        np.testing.assert_allclose(result.forces, whole.forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(result.strain_derivative, whole.strain_derivative, rtol=0, atol=1e-9)


def test_step_follows_changed_weights():
    """A parameter changed in place (an optimiser step, load_state_dict) or a new dtype
    is seen by the next evaluation: the step's cached plan is rebuilt."""
    model = cached_model("ani-1ccx", "float64")
    model = type(model)(model.featurizer, model.networks, dict(zip(model.elements, model.self_energies.tolist())))
    model = model.to(torch.float64)
    numbers, positions = ETHANOL_NUMBERS, np.array(ETHANOL_POSITIONS)
    before = model.evaluate(numbers, positions)
    weight = next(model.networks.parameters())
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        changed = model.evaluate(numbers, positions)
        with kernels.using("tensor"):
            reference = model.evaluate(numbers, positions)
        assert abs(changed.energy - before.energy) > 1e-4
        assert abs(changed.energy - reference.energy) < 1e-9
        np.testing.assert_allclose(changed.forces, reference.forces, rtol=0, atol=1e-10)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert abs(model.evaluate(numbers, positions).energy - before.energy) < 1e-12


def fresh_copy(name="ani-1ccx"):
    """A float64 potential of its own, sharing the cached model's modules, whose self
    energies and memos a test may change."""
    model = cached_model(name, "float64")
    copy = type(model)(model.featurizer, model.networks, dict(zip(model.elements, model.self_energies.tolist())))
    return copy.to(torch.float64)


def test_self_energies_refit_in_place_are_seen():
    """Training refits the self energies in place: the next evaluation adds the new
    ones (the sum kept with a structure's layout is recomputed)."""
    model = fresh_copy()
    numbers, positions = np.array(ETHANOL_NUMBERS), np.array(ETHANOL_POSITIONS)
    before = model.evaluate(numbers, positions)
    hydrogen = model.elements.index("H")
    with torch.no_grad():
        model.self_energies[hydrogen] += 0.25
    after = model.evaluate(numbers, positions)
    assert after.energy - before.energy == pytest.approx(0.25 * ETHANOL_NUMBERS.count(1), abs=1e-10)
    np.testing.assert_allclose(after.forces, before.forces, rtol=0, atol=1e-12)


def test_numbers_are_laid_out_once_and_kept_as_given():
    """A numbers array seen before reuses its checked layout; the memo keeps its own
    copy, so changing the caller's array in place changes nothing already laid out, and
    the changed array is laid out anew."""
    model = fresh_copy()
    positions = np.array(ETHANOL_POSITIONS)
    numbers = np.array(ETHANOL_NUMBERS)
    first = model.evaluate(numbers, positions)
    assert len(model.__dict__["_layouts"]) == 1
    numbers[2], numbers[3] = 1, 8  # the O and an H swap places
    swapped = model.evaluate(numbers, positions)
    assert len(model.__dict__["_layouts"]) == 2
    with kernels.using("tensor"):  # (a list is never memoised)
        assert swapped.energy == pytest.approx(model.evaluate(list(numbers), positions).energy, abs=1e-9)
    assert abs(swapped.energy - first.energy) > 1e-3
    again = model.evaluate(np.array(ETHANOL_NUMBERS), positions)
    assert again.energy == pytest.approx(first.energy, abs=1e-12)
    np.testing.assert_allclose(again.forces, first.forces, rtol=0, atol=1e-12)


def test_a_batchs_joined_pairs_follow_its_neighbour_lists():
    """Between rebuilds a batch's pair lists are joined once; a list rebuilt for one
    structure (or another layout with the same lists) is joined anew."""
    from aniserve.neighbors import NeighborList

    model = fresh_copy()
    ethanol = np.array(ETHANOL_POSITIONS)
    numbers = np.stack([ETHANOL_NUMBERS] * 2)
    positions = np.stack([ethanol, ethanol + 0.05])
    positions[1, 2] += [12.0, 0.0, 0.0]  # the second structure's O starts out of everyone's range
    lists = [NeighborList(model.cutoff, skin=1.0) for _ in range(2)]
    rng = np.random.default_rng(1)
    for step in range(5):
        if step == 3:  # ... and comes back: its list must be rebuilt, and joined anew
            positions[1, 2] -= [12.0, 0.0, 0.0]
        positions = positions + rng.uniform(-0.05, 0.05, positions.shape)
        pairs = [lst.pairs(torch.tensor(p)) for lst, p in zip(lists, positions)]
        served = model.evaluate(numbers, positions, pairs=pairs)
        fresh = model.evaluate(numbers, positions)
        np.testing.assert_allclose(served.energy, fresh.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(served.forces, fresh.forces, rtol=0, atol=1e-10)
    assert [lst.builds for lst in lists] == [1, 2]
    # The same two lists for the batch written the other way round: joined anew.
    positions[1, 2] += [12.0, 0.0, 0.0]
    pairs = [lst.pairs(torch.tensor(p)) for lst, p in zip(lists, positions)]
    served = model.evaluate(numbers, positions, pairs=pairs)
    flipped = model.evaluate(numbers, positions[::-1].copy(), pairs=pairs[::-1])
    np.testing.assert_allclose(flipped.energy, served.energy[::-1], rtol=0, atol=1e-10)


def test_member_forces_still_come_from_autograd():
    model = cached_model("ani-1ccx", "float64")
    result = model.evaluate(ETHANOL_NUMBERS, np.array(ETHANOL_POSITIONS), member_forces=True)
    assert result.member_forces is not None
    np.testing.assert_allclose(result.member_forces.mean(axis=0), result.forces, rtol=0, atol=1e-10)


def test_step_refuses_indices_out_of_range():
    """The kernel checks what it indexes with: an index out of range is an error, never
    a read or write out of bounds."""
    model = cached_model("ani-1ccx", "float64")
    numbers, positions = ETHANOL_NUMBERS, torch.tensor(ETHANOL_POSITIONS, dtype=torch.float64)
    species = model.species_indices(torch.tensor(numbers))
    lib, plan = model._step_plan(tuple(sorted(set(species.tolist()))))
    n = len(numbers)
    center = torch.arange(n).repeat_interleave(n - 1)
    neighbor = torch.tensor([j for i in range(n) for j in range(n) if j != i])
    structure = torch.zeros(n, dtype=torch.long)

    def run(**change):
        arguments = dict(
            species=species,
            center=center,
            neighbor=neighbor,
            positions=positions,
            position_of=None,
            shift=None,
            cell=None,
            structure=structure,
            n_centers=n,
            member_energies=torch.zeros(plan.members, 1, dtype=torch.float64),
            grad_positions=torch.zeros(n, 3, dtype=torch.float64),
            strain_grad=None,
        )
        arguments.update(change)
        kernels.step(lib, plan, **arguments)
        return arguments

    done = run()
    assert done["member_energies"].abs().sum() > 0 and done["grad_positions"].abs().sum() > 0
    bad = {
        "neighbor": neighbor.clone().index_fill_(0, torch.tensor([5]), n),
        "center": center.clone().index_fill_(0, torch.tensor([0]), -1),
        "species": species.clone().index_fill_(0, torch.tensor([2]), 99),
        "structure": structure.clone().index_fill_(0, torch.tensor([1]), 1),
        "position_of": torch.full((n,), n),
    }
    for field, value in bad.items():
        with pytest.raises(ValueError, match="out of range"):
            run(**{field: value})
    unsorted = center.flip(0).contiguous()
    with pytest.raises(ValueError, match="out of range"):
        run(center=unsorted)
    for field, value in {
        "positions": positions[:3],
        "grad_positions": torch.zeros(n - 1, 3, dtype=torch.float64),
        "neighbor": neighbor[:-1],
        "species": species.to(torch.int32),
        "shift": torch.zeros(len(center), 3, dtype=torch.float64),  # a shift without a cell
    }.items():
        with pytest.raises(ValueError):
            run(**{field: value})


def test_thread_choice_takes_the_faster_and_notices_a_change():
    """Two threads while they are faster; one once the team turns slow (other processes
    took the cores), found by the periodic retry; and back."""
    from aniserve.kernels.threads import ThreadChoice

    choice = ThreadChoice(team=2, window=3, explore=10)
    cost = {2: 1.0, 1: 1.6}
    picks = []
    for call in range(200):
        if call == 60:
            cost = {2: 8.0, 1: 1.3}  # the team's barrier waits for a descheduled thread
        if call == 130:
            cost = {2: 1.0, 1: 1.6}
        threads = choice.pick()
        picks.append(threads)
        choice.record(threads, cost[threads])
    assert picks[10:60].count(2) >= 45  # the team, retrying one thread every tenth call
    assert picks[80:130].count(1) >= 45
    assert picks[150:].count(2) >= 45


def test_large_steps_always_get_every_thread(monkeypatch):
    from aniserve.kernels.threads import ALWAYS_TEAM, Threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads, seen = Threads(), []
    for _ in range(20):
        threads.run(ALWAYS_TEAM, seen.append)
    assert seen == [2] * 20 and not threads.choices
    for _ in range(20):
        threads.run(100, seen.append)
    assert set(seen[20:]) == {1, 2}  # a small step tries both
