"""Calibrating an ensemble's spread on validation molecules.

The members' population standard deviation σ is an uncertainty in the ensemble's own
units: a Δ-learnt model's members disagree on each molecule's energy zero far more than
the official ANI-1x's do (issue #32), so σ alone neither reads as an error bar nor suits
ANI-1x's collection threshold.  Two numbers, fitted on conformations held out of
training and stored in the model file (``uncertainty``), fix both uses:

- ``energy_std_scale`` s: ``energy_std`` = s·σ, with s chosen so that on the validation
  conformations the root mean square of s·σ equals that of the ensemble mean's error
  against the reference energies (spread ≈ error, in the mean);
- ``collect_threshold_kcal``: the threshold on ρ = s·σ/√N (kcal/mol) that flags
  ``FLAG_FRACTION`` of the validation conformations, so structures like those the model
  was validated on are rarely collected and ones it has not learnt are;
- ``collect_threshold_relative_kcal``: the same for ρ of energies *relative to a start
  structure* (each member's energy minus its own energy there), as ``aniserve learn``
  scores its MD frames: each validation conformation relative to its molecule's lowest-
  energy one.  The members' disagreement on a molecule's energy zero cancels in it, so
  the absolute threshold, which includes that disagreement, is the wrong yardstick for
  it: a Δ-learnt model whose members disagree on the zero by kcal/mol would never
  collect a frame.
"""

from __future__ import annotations

import math

import numpy as np

from aniserve.potential import ANIPotential
from aniserve.training.data import ANIData
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

#: The share of validation conformations the stated collection threshold flags.
FLAG_FRACTION = 0.05


def spread_and_error(model: ANIPotential, data: ANIData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(σ, error, atoms) over ``data``'s conformations with an energy: the members' raw
    population std and the ensemble mean's error, kcal/mol, and each one's atom count."""
    return _spread_and_error(_evaluations(model, data))


def _spread_and_error(evaluations) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    members, reference, atoms, _ = evaluations
    return members.std(1), members.mean(1) - reference, atoms


def _relative(members, reference, atoms, molecules) -> tuple[np.ndarray, np.ndarray]:
    """(σ_rel, atoms): the members' raw population std of each conformation's energy
    relative to its molecule's lowest-energy conformation (that one left out; molecules
    with one conformation give nothing)."""
    spread, counts = [], []
    for molecule in np.unique(molecules):
        index = np.nonzero(molecules == molecule)[0]
        start = index[np.argmin(reference[index])]
        others = index[index != start]
        spread.append((members[others] - members[start]).std(1))
        counts.append(atoms[others])
    if not spread:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(spread), np.concatenate(counts)


def _evaluations(model: ANIPotential, data: ANIData):
    """Over ``data``'s conformations with an energy: the members' energies (n, k) and the
    reference energies (n,), kcal/mol; atom counts; molecule names."""
    members, reference, atoms, molecules = [], [], [], []
    for batch in data.batches(64):
        real = batch.numbers > 0
        result = model.evaluate(batch.numbers.numpy(), batch.positions.numpy())
        keep = np.isfinite(batch.energy.numpy())
        members.append(np.atleast_2d(result.member_energies)[keep] * HARTREE_IN_KCAL_PER_MOL)
        reference.append(batch.energy.numpy()[keep] * HARTREE_IN_KCAL_PER_MOL)
        atoms.append(real.sum(1).numpy()[keep])
        molecules.append(np.array(batch.molecule, dtype=object)[keep])
    if not members:
        return np.zeros((0, 1)), np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    return np.concatenate(members), np.concatenate(reference), np.concatenate(atoms), np.concatenate(molecules)


def calibrate(model: ANIPotential, data: ANIData, where: str = "") -> dict:
    """Fit the spread's scale and the collection thresholds on ``data`` (validation
    molecules, never the training ones), set them on ``model`` and return them."""
    evaluations = _evaluations(model, data)
    spread, error, atoms = _spread_and_error(evaluations)
    if len(spread) < 2 or not np.any(spread > 0):
        raise ValueError(
            f"calibrating needs at least two validation conformations with an energy, on which the members "
            f"differ; there {'is' if len(spread) == 1 else 'are'} {len(spread)}"
        )
    scale = math.sqrt(float(np.mean(error**2)) / float(np.mean(spread**2)))
    rho = scale * spread / np.sqrt(atoms)
    uncertainty = {
        "energy_std_scale": scale,
        "collect_threshold_kcal": float(np.quantile(rho, 1 - FLAG_FRACTION)),
        "fitted_on": where or f"{len(spread)} validation conformations",
        "validation_conformations": len(spread),
        "validation_error_rmse_kcal": float(np.sqrt(np.mean(error**2))),
        "validation_raw_spread_rms_kcal": float(np.sqrt(np.mean(spread**2))),
    }
    relative, counts = _relative(*evaluations)
    rho_relative = scale * relative / np.sqrt(counts)
    if len(rho_relative) >= 2 and np.any(rho_relative > 0):
        uncertainty["collect_threshold_relative_kcal"] = float(np.quantile(rho_relative, 1 - FLAG_FRACTION))
    model.uncertainty = uncertainty
    return uncertainty
