"""Shared fixtures.  The official ANI weights are found as users find them: in
``$ANISERVE_MODEL_DIR`` (a copy of the ANI model zoo), else in the project's shared
folder (``$ANISERVE_SHARED``, default ../shared beside the checkout, which .ci/run
uses).  Tests that need them are marked ``weights``: without them they skip, all with
one reason printed once, so a plain clone runs everything else; ANISERVE_REQUIRE_WEIGHTS=1
(set by .ci/run) makes missing weights an error instead, so CI never skips them.  The
TorchANI reference numbers they are compared with come from the shared folder too
(``reference/ani_reference.json``), or from ``$ANISERVE_REFERENCE``; they are not
copied into the repository (tests/make_reference.py recomputes them)."""

import functools
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ANISERVE_SHARED", ROOT.parent / "shared"))
ZOO = pathlib.Path(os.environ.get("ANISERVE_MODEL_DIR") or SHARED / "ani-model-zoo")
os.environ["ANISERVE_MODEL_DIR"] = str(ZOO)
REFERENCE = pathlib.Path(os.environ.get("ANISERVE_REFERENCE") or SHARED / "reference" / "ani_reference.json")


HAVE_WEIGHTS = all((ZOO / f"{name}_8x.info").is_file() for name in ("ani-1x", "ani-1ccx", "ani-2x"))
MISSING_WEIGHTS = (
    f"official ANI weights not found in {ZOO}: set ANISERVE_MODEL_DIR to a copy of the ANI model "
    f"zoo (ani-1x_8x.info beside ani-1x_8x/, …), or put the project's shared folder beside the "
    f"checkout as ../shared (docs/testing.md)"
    if not HAVE_WEIGHTS
    else f"TorchANI reference numbers not found at {REFERENCE}: set ANISERVE_REFERENCE to the shared "
    f"folder's reference/ani_reference.json, or put the shared folder beside the checkout as ../shared"
)
HAVE_WEIGHTS = HAVE_WEIGHTS and REFERENCE.is_file()


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-sequences",
        type=int,
        default=300,
        help="sequences the driver fuzz test plays (a longer campaign: e.g. 20000)",
    )
    parser.addoption(
        "--fuzz-files",
        type=int,
        default=150,
        help="crafted files the file-reader fuzz test loads (a longer campaign: e.g. 5000)",
    )


def pytest_configure(config):
    from aniserve import log

    log.to_stderr()  # library progress on stderr, as the command line shows it
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers (-n 2) on two cores: one thread each, here and in what the tests
        # start, or both oversubscribe the cores (the gradgradcheck took 109 s, not 20).
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "weights: needs the official ANI weights and TorchANI references")
    config.addinivalue_line("markers", "slow: training, real i-PI/ASE processes, fuzzing; left out by -m 'not slow'")
    config.addinivalue_line("markers", "old_clients: needs the old ASE/i-PI environment that .ci/run builds")
    if not HAVE_WEIGHTS and os.environ.get("ANISERVE_REQUIRE_WEIGHTS") == "1":
        raise pytest.UsageError(f"{MISSING_WEIGHTS} (ANISERVE_REQUIRE_WEIGHTS=1: CI must not skip these tests)")
    if not os.path.exists(OLD_CLIENTS) and os.environ.get("ANISERVE_REQUIRE_OLD_CLIENTS") == "1":
        raise pytest.UsageError(f"{MISSING_OLD_CLIENTS} (ANISERVE_REQUIRE_OLD_CLIENTS=1: CI must not skip them)")


OLD_CLIENTS = os.environ.get("ANISERVE_OLD_CLIENTS", "")
MISSING_OLD_CLIENTS = (
    "no environment with the old clients (ASE 3.22.1, i-PI 3.0, numpy < 2): .ci/run builds one; "
    "or make a venv with them and set ANISERVE_OLD_CLIENTS=/path/to/its/bin/python"
)


def pytest_terminal_summary(terminalreporter):
    """Each skip reason once, with how many tests it covers (the summary options are
    -rfE, so pytest itself lists no skipped test one by one)."""
    from collections import Counter

    reasons = Counter(
        str(report.longrepr[2]).removeprefix("Skipped: ")
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple)
    )
    for reason, count in sorted(reasons.items()):
        terminalreporter.write_line(f"SKIPPED {count} test{'s' * (count != 1)}: {reason}")


@pytest.fixture(autouse=True)
def _needs(request):
    """Skip what needs the weights or the old clients when they are missing, from this
    one place, so that the summary prints each reason once."""
    for marker, present, reason in (
        ("weights", HAVE_WEIGHTS, MISSING_WEIGHTS),
        ("old_clients", os.path.exists(OLD_CLIENTS), MISSING_OLD_CLIENTS),
    ):
        if marker in request.keywords and not present:
            pytest.skip(reason)


@pytest.fixture(autouse=True)
def _restore_kernel_backend():
    """Tests switch the kernel backend (kernels.use); each starts from the default."""
    from aniserve import kernels

    previous = kernels.backend()
    yield
    kernels.use(previous)


@functools.cache
def reference():
    return json.loads(REFERENCE.read_text())


@functools.cache
def cached_model(name, dtype):
    import aniserve

    return aniserve.load_model(name, dtype=dtype)


@pytest.fixture
def ani1ccx():
    return cached_model("ani-1ccx", "float64")


ETHANOL_NUMBERS = [6, 6, 8, 1, 1, 1, 1, 1, 1]
ETHANOL_POSITIONS = [
    [-0.9233, 0.0609, 0.0534],
    [0.5089, -0.4270, -0.0510],
    [1.3841, 0.6509, 0.1935],
    [-1.6032, -0.7930, -0.0236],
    [-1.1404, 0.6054, 0.9761],
    [-1.1287, 0.7369, -0.7813],
    [0.7264, -0.8873, -1.0212],
    [0.6614, -1.1906, 0.7186],
    [2.2747, 0.3176, 0.0937],
]


def ethanol_xyz(box: float | None = 30.0) -> str:
    """Ethanol as xyz text; with ``box``, the comment line i-PI reads its cell from."""
    symbols = {1: "H", 6: "C", 8: "O"}
    comment = f"# CELL(abcABC): {box} {box} {box} 90.0 90.0 90.0 positions{{angstrom}} cell{{angstrom}}" if box else ""
    return f"9\n{comment}\n" + "".join(
        f"{symbols[z]} {x} {y} {w}\n" for z, (x, y, w) in zip(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    )


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
