"""Collecting uncertain structures while serving (query by committee, as ANI-1x was built).

An ensemble's disagreement flags structures the model has not learnt: the energy spread
per √atoms, ρ = σ_E/√N (ANI-1x: Smith et al., J. Chem. Phys. 148, 241733 (2018), which
chose ρ > 0.23 kcal/mol), and/or the largest per-atom spread of the members' forces.
Flagged structures are appended to an extended XYZ file, at most one per ``every``
evaluations of the same trajectory (slot), so a long excursion does not flood it.

A model's spread is only meaningful against its own scale: a calibrated model states the
threshold on ρ that suits it (``ANIPotential.uncertainty["collect_threshold_kcal"]``,
fitted on validation molecules: ``aniserve.training.calibration``), and a collector left
at ``MODEL_THRESHOLD`` uses it; a model stating none gets ANI-1x's 0.23.

``relative``: ρ of each structure's energy relative to its trajectory's first structure
(each member's energy minus its own energy there).  A Δ-learnt model's members disagree
on each molecule's energy zero, which absolute ρ includes (the embedded default flags
every frame of a pyridine trajectory, or none of ethanol's, by the molecule alone);
relative ρ keeps only what changes along the trajectory, judged against the threshold
the model states for it.  Absolute ρ is the one for meeting new molecules: relative ρ of
a trajectory's first structure is 0.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Hashable

import numpy as np

from aniserve.units import HARTREE_IN_KCAL_PER_MOL

#: The ANI-1x paper's threshold on σ_E/√N, kcal/mol.
ANI1X_ENERGY_STD = 0.23

#: A collector's energy threshold that the served model decides (``Collector.bind``).
MODEL_THRESHOLD = "model"


def stated_threshold(model, relative: bool = False) -> float:
    """The threshold on ρ, kcal/mol, that ``model`` states (its calibration), else ANI-1x's.

    relative: for ρ of energies relative to a start structure (``aniserve learn``), the
    model's ``collect_threshold_relative_kcal`` where it states one, else the same."""
    uncertainty = getattr(model, "uncertainty", {})
    absolute = float(uncertainty.get("collect_threshold_kcal", ANI1X_ENERGY_STD))
    return float(uncertainty.get("collect_threshold_relative_kcal", absolute)) if relative else absolute


def relative_rho(members, start, scale: float, atoms: int):
    """Calibrated spread per √atoms, kcal/mol, of the members' energies relative to their
    own energies at a start structure: members (..., k) and start (k,) in Hartree."""
    deviation = np.asarray(members, dtype=np.float64) - np.asarray(start, dtype=np.float64)
    return scale * deviation.std(-1) * HARTREE_IN_KCAL_PER_MOL / math.sqrt(atoms)


class Collector:
    """Append structures whose uncertainty exceeds a threshold to ``path`` (extended XYZ).

    energy_std: threshold on σ_E/√N, kcal/mol (None: not used; ``MODEL_THRESHOLD``: the
    served model's stated one, set by ``bind``).  force_std: threshold
    on the largest per-atom force spread, kcal/mol/Å (None: not used; when set, every
    evaluation also computes each member's forces, k extra gradient passes).  Either one
    exceeded collects.  every: at least this many evaluations between two collected
    structures of one trajectory.  relative: ρ relative to each trajectory's first
    structure (a new one starts where a trajectory's atoms change).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        energy_std: float | str | None = MODEL_THRESHOLD,
        force_std: float | None = None,
        every: int = 1,
        relative: bool = False,
    ):
        if energy_std is None and force_std is None:
            raise ValueError("collecting needs an energy-spread or a force-spread threshold (or both)")
        if isinstance(energy_std, str) and energy_std != MODEL_THRESHOLD:
            raise ValueError(f"energy_std must be a number, None or {MODEL_THRESHOLD!r}, got {energy_std!r}")
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.path = pathlib.Path(path)
        self.energy_std, self.force_std, self.every, self.relative = energy_std, force_std, every, relative
        self.scale = 1.0  # the served model's energy_std scale (``bind``), for relative ρ
        #: Per trajectory: its first structure's atomic numbers and members' energies.
        self.starts: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
        self.seen: dict[Hashable, int] = {}
        self.last: dict[Hashable, int] = {}
        self.collected = 0
        self.evaluated = 0

    def bind(self, model) -> None:
        """Take the served model's stated threshold if none was given, and its scale."""
        if self.energy_std == MODEL_THRESHOLD:
            self.energy_std = stated_threshold(model, relative=self.relative)
        self.scale = float(getattr(model, "energy_std_scale", 1.0))

    @property
    def needs_member_forces(self) -> bool:
        return self.force_std is not None

    @property
    def fraction(self) -> float:
        """Collected structures per evaluation so far."""
        return self.collected / self.evaluated if self.evaluated else 0.0

    def consider(self, key: Hashable, structure, result, model: str = "", member_forces=None) -> bool:
        """Write ``structure`` if ``result`` is uncertain enough; True if written.

        member_forces: a callable giving the members' forces (k, N, 3) for a result made
        without them, so a structure flagged by its energy spread is written with its
        force spread too, at the cost of one more evaluation of that structure only."""
        step = self.seen.get(key, 0)
        self.seen[key] = step + 1
        self.evaluated += 1
        rho = self._rho(key, structure, result)
        force_spread = None if result.member_forces is None else max_force_spread(result.member_forces)
        if self.energy_std == MODEL_THRESHOLD:  # never bound to a model: no model states one
            self.energy_std = ANI1X_ENERGY_STD
        flagged = (self.energy_std is not None and rho > float(self.energy_std)) or (
            self.force_std is not None and force_spread is not None and force_spread > self.force_std
        )
        if not flagged or (key in self.last and step - self.last[key] < self.every):
            return False
        if force_spread is None and member_forces is not None:
            force_spread = max_force_spread(member_forces())
        self.last[key] = step
        self._write(structure, result, model, key, step, rho, force_spread)
        self.collected += 1
        return True

    def forget(self, key: Hashable) -> None:
        """End a trajectory: its next structure is a new first one (relative ρ 0, step 0)."""
        for kept in (self.starts, self.seen, self.last):
            kept.pop(key, None)

    def _rho(self, key: Hashable, structure, result) -> float:
        """Calibrated energy spread per √atoms, kcal/mol: absolute, or relative to the
        trajectory's first structure."""
        numbers = np.asarray(structure.numbers)
        if not self.relative:
            return float(result.energy_std) * HARTREE_IN_KCAL_PER_MOL / math.sqrt(len(numbers))
        members = np.array(result.member_energies, dtype=np.float64)
        start = self.starts.get(key)
        if start is None or not np.array_equal(start[0], numbers):
            self.starts[key] = (numbers.copy(), members)
            return 0.0
        return float(relative_rho(members, start[1], self.scale, len(numbers)))

    def _write(self, structure, result, model, key, step, rho, force_spread) -> None:
        import ase
        import ase.io

        atoms = ase.Atoms(
            numbers=structure.numbers,
            positions=structure.positions,
            cell=structure.cell if structure.cell is not None else None,
            pbc=structure.cell is not None,
        )
        atoms.info.update(
            {
                "energy_std_kcal": result.energy_std * HARTREE_IN_KCAL_PER_MOL,
                "energy_std_per_sqrt_atom_kcal": rho,
                "rho_relative_to_first_structure": self.relative,
                "model": model or "unnamed",
                "source": str(key[0]) if isinstance(key, tuple) else str(key),
                "slot": int(key[1]) if isinstance(key, tuple) and len(key) > 1 else 0,
                "step": step,
            }
        )
        if force_spread is not None:
            atoms.info["force_std_max_kcal_per_a"] = force_spread
        # Appended and closed per structure: what was collected survives a killed run.
        ase.io.write(self.path, atoms, format="extxyz", append=True)


def max_force_spread(member_forces: np.ndarray):
    """The largest per-atom spread of the members' forces, kcal/mol/Å: for each atom the
    root mean square over members of |F_m − F̄|, then the largest over atoms.
    member_forces (k, N, 3) Hartree/Å gives a number; (B, k, N, 3) one per structure."""
    forces = np.asarray(member_forces)
    deviation = forces - forces.mean(-3, keepdims=True)
    spread = np.sqrt((deviation**2).sum(-1).mean(-2)).max(-1) * HARTREE_IN_KCAL_PER_MOL
    return float(spread) if spread.ndim == 0 else spread
