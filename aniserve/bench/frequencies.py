"""Harmonic frequencies: a model's against coupled cluster's, each at its own minimum.

A minimum is found with BFGS on the energy and its analytic gradient.  The CCSD(T)
Hessian is the central difference of analytic forces (step ``STEP`` Å; PySCF has
analytic CCSD(T) gradients, not Hessians), computed once by ``compute_reference`` and
shipped (``CC_REFERENCE``).  A model's Hessian is its exact one, by autograd: ANI's CELU
(α = 0.1) makes the second derivative jump wherever a neuron's input crosses zero, so
finite differences of an ANI model's forces move with the step (water with ANI-1x: bend
1917 cm⁻¹ analytic, 1905 at 0.005 Å, 1896 at 0.01 Å).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np

from aniserve.units import WAVENUMBER_CM1_OF_HARTREE_PER_A2_AMU

#: The shipped CCSD(T)/cc-pVDZ minima and frequencies (see ``compute_reference``).
CC_REFERENCE = pathlib.Path(__file__).resolve().parent / "cc_frequencies.json"
#: Small molecules the reference covers: a bend (water), a triple bond (HCN, the C≡N
#: stretch the correction under-learns in nitriles) and a carbonyl (formaldehyde).
MOLECULES = {
    "water": ([8, 1, 1], [[0.0, 0.0, 0.119], [0.0, 0.763, -0.477], [0.0, -0.763, -0.477]]),
    "hydrogen cyanide": ([6, 7, 1], [[0.0, 0.0, 0.0], [0.0, 0.0, 1.156], [0.0, 0.0, -1.066]]),
    "formaldehyde": ([6, 8, 1, 1], [[0.0, 0.0, -0.53], [0.0, 0.0, 0.677], [0.0, 0.937, -1.11], [0.0, -0.937, -1.11]]),
}
STEP = 0.005  # Å
#: Masses (u) of the elements the models know, as ASE's default table gives them.
MASSES = {1: 1.008, 6: 12.011, 7: 14.007, 8: 15.999}

#: energy_and_forces(numbers, positions (N, 3) Å) -> (Hartree, Hartree/Å (N, 3))
EnergyAndForces = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]


def minimise(numbers, positions, energy_and_forces: EnergyAndForces, gtol: float = 2e-5) -> np.ndarray:
    """The nearest minimum (Å), BFGS until the largest force component is below ``gtol``
    Hartree/Å."""
    from scipy.optimize import minimize

    numbers = np.asarray(numbers)

    def fun(flat):
        energy, forces = energy_and_forces(numbers, flat.reshape(-1, 3))
        return energy, -np.asarray(forces).ravel()

    found = minimize(fun, np.asarray(positions, float).ravel(), jac=True, method="BFGS", options={"gtol": gtol})
    return found.x.reshape(-1, 3)


def hessian(numbers, positions, energy_and_forces: EnergyAndForces, step: float = STEP) -> np.ndarray:
    """(3N, 3N) Hartree/Å², symmetrised central differences of the forces."""
    x = np.asarray(positions, float).ravel()
    columns = []
    for i in range(len(x)):
        shifted = []
        for sign in (1, -1):
            y = x.copy()
            y[i] += sign * step
            shifted.append(np.asarray(energy_and_forces(np.asarray(numbers), y.reshape(-1, 3))[1]).ravel())
        columns.append(-(shifted[0] - shifted[1]) / (2 * step))
    h = np.array(columns).T
    return 0.5 * (h + h.T)


def wavenumbers(numbers, positions, h: np.ndarray) -> np.ndarray:
    """Vibrational wavenumbers (cm⁻¹, ascending) of a Hessian at a minimum: the 3N − 6
    (3N − 5 for a linear molecule) largest of the mass-weighted eigenvalues."""
    masses = np.repeat([MASSES[int(z)] for z in numbers], 3)
    weighted = h / np.sqrt(np.outer(masses, masses))
    values = np.linalg.eigvalsh(weighted)
    centred = np.asarray(positions) - np.mean(positions, 0)
    linear = np.linalg.matrix_rank(centred, tol=1e-3) <= 1
    kept = np.sort(values)[(5 if linear else 6) :]
    return np.sign(kept) * np.sqrt(np.abs(kept)) * WAVENUMBER_CM1_OF_HARTREE_PER_A2_AMU


def frequencies(numbers, positions, energy_and_forces: EnergyAndForces) -> tuple[np.ndarray, np.ndarray]:
    """(minimum, wavenumbers) from a starting geometry."""
    minimum = minimise(numbers, positions, energy_and_forces)
    return minimum, wavenumbers(numbers, minimum, hessian(numbers, minimum, energy_and_forces))


def model_energy_and_forces(model) -> EnergyAndForces:
    def call(numbers, positions):
        result = model.evaluate(numbers, positions)
        return float(result.energy), np.asarray(result.forces)

    return call


def model_frequencies(model, numbers, start) -> tuple[np.ndarray, np.ndarray]:
    """(minimum, wavenumbers) of a model (float64), with its exact Hessian."""
    import torch

    minimum = minimise(numbers, start, model_energy_and_forces(model))
    h = model.hessian(torch.as_tensor(np.asarray(numbers)), torch.as_tensor(minimum)).detach().cpu().numpy()
    return minimum, wavenumbers(numbers, minimum, h)


def compute_reference(path=CC_REFERENCE, level: str = "ccsd(t)/cc-pvdz") -> dict:
    """Compute the coupled-cluster minima and frequencies (hours of CPU for all three on
    2 cores: each is some 20–40 analytic CCSD(T) gradients) and write them to ``path``."""
    import pyscf

    from aniserve.qmdata.levels import Level, compute

    chosen = Level.parse(level)

    def call(numbers, positions):
        out = compute(chosen, numbers, positions, forces=True)
        return out["energy"], out["forces"]

    molecules: dict = {}
    reference = {
        "level": level,
        "program": f"PySCF {pyscf.__version__} (frozen core, RHF reference, analytic CCSD(T) gradients)",
        "hessian": f"central differences of the analytic forces, step {STEP} Å",
        "molecules": molecules,
    }
    for name, (numbers, start) in MOLECULES.items():
        minimum, values = frequencies(np.array(numbers), np.array(start), call)
        molecules[name] = {
            "numbers": numbers,
            "minimum_angstrom": minimum.round(6).tolist(),
            "wavenumbers_cm1": values.round(2).tolist(),
        }
        pathlib.Path(path).write_text(json.dumps(reference, indent=1) + "\n")
    return reference
