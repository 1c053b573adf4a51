"""How models are scored against reference data, in one place: the test set, errors of
energies relative to each molecule's mean (conformer errors), per-element energy
offsets fitted by least squares, and means over seeds.  Training (model selection,
self-energy fits) and every benchmark use these.

Conformer errors are of energies relative to each molecule's mean:
(E_i − ⟨E⟩_mol) − (E_i^ref − ⟨E^ref⟩_mol), so they are blind to each molecule's energy
zero.  kcal/mol and kcal/mol/Å out, Hartree in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from aniserve.units import HARTREE_IN_KCAL_PER_MOL

#: The levels of theory of the shipped data (data/README.md), as ANI-layout keys.
LOW_ENERGY, LOW_FORCES = "wb97x_631gd.energy", "wb97x_631gd.forces"
HIGH_ENERGY, HIGH_FORCES = "ccsd(t)_ccpvdz.energy", "ccsd(t)_ccpvdz.forces"


# ----------------------------------------------------------------- relative errors
def relative_errors(errors: np.ndarray, molecules: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
    """Each molecule's errors minus their mean, for molecules with at least two
    conformations (one conformation has no relative energy)."""
    names = np.asarray(molecules)
    return {str(m): errors[names == m] - errors[names == m].mean() for m in np.unique(names) if (names == m).sum() > 1}


def conformer_rmse(errors: np.ndarray, molecules: Sequence[str] | np.ndarray) -> float:
    """RMSE of errors relative to each molecule's mean error (NaN when no molecule has
    two conformations)."""
    parts = list(relative_errors(errors, molecules).values())
    return float(np.sqrt(np.mean(np.concatenate(parts) ** 2))) if parts else math.nan


# ----------------------------------------------------------------- element offsets
def fit_offsets(
    counts: np.ndarray, residuals: np.ndarray, what: str = "per-element energy"
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares per-element energies c with counts @ c ≈ residuals.

    counts: (M, E) atoms of each element per conformation; residuals: (M,).  Returns
    (c, present): elements that occur nowhere get 0 and present False.  ValueError
    when there is nothing to fit or the fit is not finite, naming ``what`` was fitted."""
    counts, residuals = np.asarray(counts, dtype=float), np.asarray(residuals, dtype=float)
    if not len(residuals):
        raise ValueError(f"no conformation has the energy target; cannot make the {what} fit")
    present = np.asarray(counts.any(0))
    solution = np.zeros(counts.shape[1])
    solution[present] = np.linalg.lstsq(counts[:, present], residuals, rcond=None)[0]
    if not np.isfinite(solution).all():
        raise ValueError(f"the {what} fit is not finite; check the data's energies")
    return solution, present


def element_offsets(train_path, test: TestSet, base: Callable | None = None) -> np.ndarray:
    """Per-element offsets (E_high − E_base ≈ Σ n_e c_e) fitted on the training files'
    high-level conformations, evaluated for each test conformation.  E_base is the low
    level, or ``base(numbers, positions)`` (Hartree) when given."""
    import h5py

    from aniserve.training.data import data_paths

    rows, y, elements = [], [], sorted({int(z) for n in test.numbers for z in n})
    files = [h5py.File(path, "r") for path in data_paths(train_path)]
    try:
        groups = [g for f in files for g in f.values()]
        elements = sorted(set(elements) | {int(z) for g in groups for z in g["atomic_numbers"][()]})
        for g in groups:
            if HIGH_ENERGY not in g:
                continue
            numbers = g["atomic_numbers"][()]
            known = np.isfinite(g[HIGH_ENERGY][()])
            if base is None:
                known &= np.isfinite(g[LOW_ENERGY][()])
            counts = [np.sum(numbers == z) for z in elements]
            for c in np.nonzero(known)[0]:
                rows.append(counts)
                reference = g[LOW_ENERGY][c] if base is None else base(numbers, g["coordinates"][c])
                y.append(g[HIGH_ENERGY][c] - reference)
    finally:
        for f in files:
            f.close()
    coef, _ = fit_offsets(np.array(rows, float), np.array(y))
    return np.array([sum(coef[elements.index(int(z))] for z in n) for n in test.numbers])


# ----------------------------------------------------------------- the test set
@dataclasses.dataclass
class TestSet:
    """High-level test conformations with their DFT values, in a fixed order; forces
    NaN where not computed (CCSD(T) forces exist for some conformations only)."""

    numbers: list[np.ndarray]
    positions: list[np.ndarray]
    molecule: np.ndarray
    high: np.ndarray
    low: np.ndarray
    low_forces: list[np.ndarray]
    high_forces: list[np.ndarray]


def read_test_set(path, high_energy: str = HIGH_ENERGY, high_forces: str = HIGH_FORCES) -> TestSet:
    """The test conformations of ``path`` that have the high level (by default
    CCSD(T)/cc-pVDZ; ``bench active``'s MD pool names its teacher's keys)."""
    import h5py

    out = TestSet([], [], np.array([]), np.array([]), np.array([]), [], [])
    molecule, high, low = [], [], []
    with h5py.File(path, "r") as f:
        for name in sorted(f):
            g = f[name]
            if high_energy not in g:  # a group without the high level has nothing to test
                continue
            keep = np.nonzero(np.isfinite(g[high_energy][()]))[0]
            names = [m.decode() for m in g["molecule"][keep]] if "molecule" in g else [name] * len(keep)
            for row, c in enumerate(keep):
                out.numbers.append(g["atomic_numbers"][()])
                out.positions.append(g["coordinates"][c])
                molecule.append(names[row])
                high.append(g[high_energy][c])
                low.append(g[LOW_ENERGY][c] if LOW_ENERGY in g else np.nan)
                missing = np.full((len(g["atomic_numbers"]), 3), np.nan)
                out.low_forces.append(g[LOW_FORCES][c] if LOW_FORCES in g else missing)
                out.high_forces.append(g[high_forces][c] if high_forces in g else missing)
    out.molecule, out.high, out.low = np.array(molecule), np.array(high), np.array(low)
    if not len(out.high):
        raise ValueError(f"{path}: no conformation has {high_energy}")
    return out


def subset(test: TestSet, keep) -> TestSet:
    """The test conformations where ``keep`` (a boolean per conformation) holds."""
    index = np.nonzero(np.asarray(keep))[0]
    pick = lambda items: [items[i] for i in index]  # noqa: E731
    return TestSet(
        pick(test.numbers),
        pick(test.positions),
        test.molecule[index],
        test.high[index],
        test.low[index],
        pick(test.low_forces),
        pick(test.high_forces),
    )


def metrics(predicted: np.ndarray, test: TestSet, forces=None, std=None) -> dict:
    """kcal/mol (forces kcal/mol/Å) errors against CCSD(T); forces against CCSD(T) where
    the test set has them (with their count, and by element), and against DFT."""
    error = (predicted - test.high) * HARTREE_IN_KCAL_PER_MOL
    relative = relative_errors(error, test.molecule)
    conf = np.concatenate(list(relative.values())) if relative else np.zeros(0)
    out = {
        "conformer_rmse_kcal": float(np.sqrt(np.mean(conf**2))) if len(conf) else float("nan"),
        "conformer_mae_kcal": float(np.mean(np.abs(conf))) if len(conf) else float("nan"),
        "total_rmse_kcal": float(np.sqrt(np.mean(error**2))),
        "test_conformations": int(len(error)),
        "test_molecules": int(len(np.unique(test.molecule))),
        "conformer_rmse_by_molecule": {m: float(np.sqrt(np.mean(r**2))) for m, r in relative.items()},
    }
    if forces is not None:
        diff = np.concatenate([(f - r).ravel() for f, r in zip(forces, test.low_forces)])
        diff = diff[np.isfinite(diff)]
        if len(diff):
            out["force_rmse_vs_dft_kcal_per_a"] = float(np.sqrt(np.mean(diff**2)) * HARTREE_IN_KCAL_PER_MOL)
        out.update(cc_force_errors(forces, test))
    if std is not None:
        out["mean_ensemble_std_kcal"] = float(np.mean(std) * HARTREE_IN_KCAL_PER_MOL)
    return out


def cc_force_errors(forces, test: TestSet) -> dict:
    """Force RMSE against CCSD(T) over the test conformations that have CCSD(T) forces,
    overall and by element (kcal/mol/Å), and how many conformations that is."""
    from aniserve.elements import symbol

    have = [i for i, ref in enumerate(test.high_forces) if np.isfinite(ref).all()]
    if not have:
        return {}
    diff = np.concatenate([forces[i] - test.high_forces[i] for i in have]) * HARTREE_IN_KCAL_PER_MOL
    numbers = np.concatenate([test.numbers[i] for i in have])
    molecule = np.concatenate([[test.molecule[i]] * len(test.numbers[i]) for i in have])
    return {
        "force_rmse_vs_cc_kcal_per_a": float(np.sqrt(np.mean(diff**2))),
        "cc_force_conformations": len(have),
        "force_rmse_vs_cc_by_element": {
            symbol(int(z)): float(np.sqrt(np.mean(diff[numbers == z] ** 2))) for z in np.unique(numbers)
        },
        "force_rmse_vs_cc_by_molecule": {
            str(m): float(np.sqrt(np.mean(diff[molecule == m] ** 2))) for m in np.unique(molecule)
        },
    }


def predict_test(model, test: TestSet):
    """The model's energies (Hartree), forces and ensemble spreads on every test conformation."""
    energies, forces, std = [], [], []
    for numbers, positions in zip(test.numbers, test.positions):
        result = model.evaluate(numbers, positions)
        energies.append(float(result.energy))
        forces.append(result.forces)
        std.append(float(result.energy_std))
    return np.array(energies), forces, np.array(std)


def score(model, test: TestSet) -> dict:
    energies, forces, std = predict_test(model, test)
    return metrics(energies, test, forces, std)


def score_with_offsets(model, train_path, test: TestSet) -> dict:
    """A fixed model's test errors after per-element offsets to the high level (fitted on
    the training set's high-level points), and its reaction-energy errors."""
    from aniserve.bench import reactions

    energies, forces, std = predict_test(model, test)
    offsets = element_offsets(train_path, test, lambda n, x: float(model.evaluate(n, x).energy))
    return {**metrics(energies + offsets, test, forces, std), "reactions": reactions.score(model)}


# ----------------------------------------------------------------- over seeds
def seed_mean(runs: list[dict]) -> dict:
    """Mean and spread (population std, ``*_std``) over seeds of every scalar figure
    (``*_kcal``, ``*_kcal_per_a``), and how many seeds."""
    keys = [k for k in runs[0] if k.endswith(("_kcal", "_kcal_per_a")) and isinstance(runs[0][k], float)]
    out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out.update({f"{k}_std": float(np.std([r[k] for r in runs])) for k in keys})
    out["seeds"] = len(runs)
    return out
