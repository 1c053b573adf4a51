"""The serving core: structures in, energies, forces and virials out, batched.

Both the i-PI driver (transport only) and the ASE calculator (an adapter) hand their
structures to one ``Evaluator``.  It owns what serving needs beyond the potential
itself: a neighbour list with a skin per structure slot (a bead, an ASE run), padding
and batching of slots into at most two forward passes (molecules and periodic cells),
the symmetrised virial, per-member results when asked for, and collection of uncertain
structures.  Units are the potential's: Å in, Hartree and Hartree/Å out; each edge
converts its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import cast

import numpy as np
import torch

from aniserve.contracts import Result, Structure
from aniserve.neighbors import NeighborList


class Evaluator:
    """Evaluate structure slots with ``potential`` (an ANIPotential): the
    ``aniserve.contracts.Servable`` the driver and the ASE calculator use.

    skin: Å added to each slot's neighbour-list cutoff; a list is reused until an atom
    has moved skin/2.  members: also return per-member forces and virials (k extra
    gradient passes).  collector: an ``aniserve.collect.Collector`` shown every result.
    """

    def __init__(self, potential, skin: float = 1.0, members: bool = False, collector=None):
        self.potential, self.skin, self.members, self.collector = potential, skin, members, collector
        if collector is not None:
            collector.bind(potential)
        self._lists: dict[Hashable, NeighborList] = {}

    @property
    def model_name(self) -> str:
        return str(self.potential.description.get("name", ""))

    def check_elements(self, numbers) -> None:
        """Raise ValueError now for elements the model lacks (before any server waits)."""
        for z in {int(z) for z in np.asarray(numbers).ravel()}:
            self.potential.species_indices(np.array([z]))

    def _member_forces(self, structure: Structure) -> np.ndarray:
        return self.potential.evaluate(
            structure.numbers, structure.positions, structure.cell, member_forces=True
        ).member_forces

    def neighbor_list(self, key: Hashable) -> NeighborList | None:
        """The neighbour list a slot keeps (None before its first evaluation)."""
        return self._lists.get(key)

    def forget(self, key: Hashable) -> None:
        """Drop what a slot keeps: its neighbour list and, for the collector, its
        trajectory (its connection is gone, or a new INIT starts another run)."""
        self._lists.pop(key, None)
        if self.collector is not None:
            self.collector.forget(key)

    def evaluate(self, slots: Sequence[tuple[Hashable, Structure]]) -> list[Result]:
        """Results in the order of ``slots`` ((key, structure) pairs; the key names the
        slot's neighbour list and, for collection, its trajectory)."""
        results: list[Result | None] = [None] * len(slots)
        need_members = self.members or (self.collector is not None and self.collector.needs_member_forces)
        for periodic in (False, True):
            group = [i for i, (_, s) in enumerate(slots) if (s.cell is not None) == periodic]
            if not group:
                continue
            for i in group:
                if len(slots[i][1].numbers) == 0:
                    raise ValueError(f"structure {slots[i][0]!r} has no atoms")
            n_max = max(len(slots[i][1].numbers) for i in group)
            numbers = np.zeros((len(group), n_max), dtype=np.int64)
            positions = np.zeros((len(group), n_max, 3))
            cells = np.zeros((len(group), 3, 3))
            pairs = []
            for row, i in enumerate(group):
                key, s = slots[i]
                n = len(s.numbers)
                numbers[row, :n], positions[row, :n] = s.numbers, s.positions
                if periodic:
                    cells[row] = s.cell
                lists = self._lists.get(key)
                if lists is None:
                    lists = self._lists[key] = NeighborList(self.potential.cutoff, self.skin)
                pairs.append(
                    lists.pairs(
                        torch.from_numpy(positions[row, :n]), torch.from_numpy(cells[row]) if periodic else None
                    )
                )
            out = self.potential.evaluate(
                numbers, positions, cells if periodic else None, member_forces=need_members, pairs=pairs
            )
            for row, i in enumerate(group):
                n = len(slots[i][1].numbers)
                results[i] = Result(
                    energy=float(out.energy[row]),
                    forces=out.forces[row, :n],
                    virial=-symmetric(out.strain_derivative[row]) if periodic else np.zeros((3, 3)),
                    energy_std=float(out.energy_std[row]),
                    member_energies=out.member_energies[row],
                    member_forces=out.member_forces[row, :, :n] if need_members else None,
                    member_virials=(
                        np.stack([-symmetric(s) for s in out.member_strain_derivatives[row]])
                        if need_members and periodic
                        else None
                    ),
                )
        if self.collector is not None:
            for (key, structure), result in zip(slots, results):
                self.collector.consider(
                    key, structure, result, self.model_name, member_forces=lambda s=structure: self._member_forces(s)
                )
        return cast(list[Result], results)  # every slot is filled above


def symmetric(matrix: np.ndarray) -> np.ndarray:
    """The symmetric part: the strain derivative of a rotation-invariant energy is
    symmetric up to rounding, and i-PI's barostats and ASE's stress expect it so."""
    return 0.5 * (matrix + matrix.T)
