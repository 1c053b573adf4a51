"""Reaction energies of the HC7/11 and ISOL6 sets (see README.md beside this file).

A reaction energy is Σ coefficient · E(structure) over its terms, electronic energies at
the sets' fixed geometries.  A model is scored on the reactions whose elements it covers.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from aniserve.elements import NUMBERS
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

FOLDER = pathlib.Path(__file__).parent


def read_sets() -> dict[str, list[dict]]:
    """{set name: [{name, terms {stem: coefficient}, reference, wb97x}]} (kcal/mol)."""
    return json.loads((FOLDER / "reactions.json").read_text())["sets"]


def _structure(set_name: str, stem: str):
    import ase.io

    return ase.io.read(FOLDER / set_name / f"{stem}.xyz")


def score(model) -> dict[str, dict]:
    """Per set: MAE and RMSE (kcal/mol) of the model's reaction energies against the
    references, over the reactions it can evaluate, and how many those were."""
    out = {}
    for set_name, reactions in read_sets().items():
        errors = []
        for reaction in reactions:
            structures = {stem: _structure(set_name, stem) for stem in reaction["terms"]}
            numbers = {int(z) for atoms in structures.values() for z in atoms.numbers}
            if not numbers <= {NUMBERS[e] for e in model.elements}:
                continue
            energy = sum(
                c * float(model.evaluate(structures[s].numbers, structures[s].positions).energy)
                for s, c in reaction["terms"].items()
            )
            errors.append(energy * HARTREE_IN_KCAL_PER_MOL - reaction["reference"])
        if errors:
            values = np.array(errors)
            out[set_name] = {
                "mae_kcal": float(np.abs(values).mean()),
                "rmse_kcal": float(np.sqrt((values**2).mean())),
                "reactions": len(errors),
            }
    return out


def dft_scores() -> dict[str, dict]:
    """The ωB97X values given beside the references, scored the same way."""
    out = {}
    for set_name, reactions in read_sets().items():
        errors = np.array([r["wb97x"] - r["reference"] for r in reactions])
        out[set_name] = {
            "mae_kcal": float(np.abs(errors).mean()),
            "rmse_kcal": float(np.sqrt((errors**2).mean())),
            "reactions": len(errors),
        }
    return out
