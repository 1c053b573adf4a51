"""Shared fixtures.  Official weights and references come from the shared folder that
``.ci/run`` points ANISERVE_SHARED at (default: ../shared beside the checkout, the
project's shared folder with the official ANI model zoo).  Test modules that need them
are marked ``weights``: without the folder they skip with one reason, so a plain clone
runs everything else; ANISERVE_REQUIRE_WEIGHTS=1 (set by .ci/run) makes a missing folder
an error instead, so CI never skips them."""

import functools
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ANISERVE_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("ANISERVE_MODEL_DIR", str(SHARED / "ani-model-zoo"))


HAVE_WEIGHTS = (SHARED / "ani-model-zoo").is_dir()
MISSING_WEIGHTS = (f"official ANI weights not found ({SHARED / 'ani-model-zoo'}): put the project's shared folder "
                   f"beside the checkout as ../shared, or set ANISERVE_SHARED=/path/to/shared")


def pytest_configure(config):
    config.addinivalue_line("markers", "weights: needs the official ANI weights and TorchANI references")
    if not HAVE_WEIGHTS and os.environ.get("ANISERVE_REQUIRE_WEIGHTS") == "1":
        raise pytest.UsageError(f"{MISSING_WEIGHTS} (ANISERVE_REQUIRE_WEIGHTS=1: CI must not skip these tests)")


def pytest_collection_modifyitems(config, items):
    if HAVE_WEIGHTS:
        return
    skip = pytest.mark.skip(reason=MISSING_WEIGHTS)
    for item in items:
        if "weights" in item.keywords:
            item.add_marker(skip)


@functools.lru_cache(maxsize=None)
def reference():
    return json.loads((SHARED / "reference" / "ani_reference.json").read_text())


@functools.lru_cache(maxsize=None)
def cached_model(name, dtype):
    import aniserve

    return aniserve.load_model(name, dtype=dtype)


@pytest.fixture
def ani1ccx():
    return cached_model("ani-1ccx", "float64")


ETHANOL_NUMBERS = [6, 6, 8, 1, 1, 1, 1, 1, 1]
ETHANOL_POSITIONS = [[-0.9233, 0.0609, 0.0534], [0.5089, -0.4270, -0.0510], [1.3841, 0.6509, 0.1935],
                     [-1.6032, -0.7930, -0.0236], [-1.1404, 0.6054, 0.9761], [-1.1287, 0.7369, -0.7813],
                     [0.7264, -0.8873, -1.0212], [0.6614, -1.1906, 0.7186], [2.2747, 0.3176, 0.0937]]


def perturbed_molecules(names, conformations, rng, noise):
    """(formula, name, numbers, positions (C, N, 3)) for ASE's g2 molecules, atoms in
    decreasing atomic number (the shipped data's order), Gaussian noise in Å."""
    import numpy as np
    from ase.build import molecule

    for name in names:
        atoms = molecule(name)
        order = np.argsort(-atoms.numbers, kind="stable")
        positions = atoms.positions[order][None] + rng.normal(0, noise, (conformations, len(atoms), 3))
        yield atoms.get_chemical_formula(), name, atoms.numbers[order], positions
