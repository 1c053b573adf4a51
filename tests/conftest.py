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


def pytest_addoption(parser):
    parser.addoption("--fuzz-sequences", type=int, default=1000,
                     help="sequences the driver fuzz test plays (a longer campaign: e.g. 20000)")
    parser.addoption("--fuzz-files", type=int, default=300,
                     help="crafted files the file-reader fuzz test loads (a longer campaign: e.g. 5000)")


def pytest_configure(config):
    config.addinivalue_line("markers", "weights: needs the official ANI weights and TorchANI references")
    config.addinivalue_line("markers", "slow: training, real i-PI/ASE processes, fuzzing; left out by -m 'not slow'")
    config.addinivalue_line("markers", "old_clients: needs the old ASE/i-PI environment that .ci/run builds")
    if not HAVE_WEIGHTS and os.environ.get("ANISERVE_REQUIRE_WEIGHTS") == "1":
        raise pytest.UsageError(f"{MISSING_WEIGHTS} (ANISERVE_REQUIRE_WEIGHTS=1: CI must not skip these tests)")
    if not os.path.exists(OLD_CLIENTS) and os.environ.get("ANISERVE_REQUIRE_OLD_CLIENTS") == "1":
        raise pytest.UsageError(f"{MISSING_OLD_CLIENTS} (ANISERVE_REQUIRE_OLD_CLIENTS=1: CI must not skip them)")


OLD_CLIENTS = os.environ.get("ANISERVE_OLD_CLIENTS", "")
MISSING_OLD_CLIENTS = ("no environment with the old clients (ASE 3.22.1, i-PI 3.0, numpy < 2): .ci/run builds one; "
                       "or make a venv with them and set ANISERVE_OLD_CLIENTS=/path/to/its/bin/python")


def pytest_collection_modifyitems(config, items):
    for marker, present, reason in (("weights", HAVE_WEIGHTS, MISSING_WEIGHTS),
                                    ("old_clients", os.path.exists(OLD_CLIENTS), MISSING_OLD_CLIENTS)):
        if present:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_kernel_backend():
    """Tests switch the kernel backend (kernels.use); each starts from the default."""
    from aniserve import kernels

    previous = kernels.backend()
    yield
    kernels.use(previous)


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


def ethanol_xyz(box: float | None = 30.0) -> str:
    """Ethanol as xyz text; with ``box``, the comment line i-PI reads its cell from."""
    symbols = {1: "H", 6: "C", 8: "O"}
    comment = (f"# CELL(abcABC): {box} {box} {box} 90.0 90.0 90.0 positions{{angstrom}} cell{{angstrom}}"
               if box else "")
    return f"9\n{comment}\n" + "".join(f"{symbols[z]} {x} {y} {w}\n"
                                      for z, (x, y, w) in zip(ETHANOL_NUMBERS, ETHANOL_POSITIONS))


IPI_INPUT = """<simulation verbosity='low'>
  <output prefix='sim'><properties stride='1' filename='out'> [step, potential] </properties></output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name='ani' mode='unix' pbc='false'><address>{name}</address><latency>1e-3</latency></ffsocket>
  <system>
    <initialize nbeads='2'><file mode='xyz' units='angstrom'>{xyz}</file>
      <cell mode='abc' units='angstrom'> [30.0, 30.0, 30.0] </cell>
      <velocities mode='thermal' units='kelvin'>300</velocities></initialize>
    <forces><force forcefield='ani'/></forces>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
    <motion mode='dynamics'><dynamics mode='nve'><timestep units='femtosecond'>0.25</timestep></dynamics></motion>
  </system>
</simulation>
"""


def ipi_input(name: str, xyz: str, steps: int = 1_000_000, seed: int = 31415) -> str:
    """A 2-bead NVE i-PI input on UNIX socket ``name``, readable by i-PI 3.0 and 3.3."""
    return IPI_INPUT.format(name=name, xyz=xyz, steps=steps, seed=seed)


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
