"""Clients a chemist may still have: ASE 3.22.1's SocketIOCalculator (it takes no JSON
extras: ``--extras none``) and i-PI 3.0 (which needs numpy < 2), each in its own
environment.  ``.ci/run`` builds that environment and points ANISERVE_OLD_CLIENTS at its
Python; without it these tests skip, saying so (and fail under CI)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, ROOT, cached_model, ethanol_xyz, ipi_input

from aniserve import ANICalculator
from aniserve.embedded import DEFAULT_MODEL

OLD = os.environ.get("ANISERVE_OLD_CLIENTS", "")
pytestmark = [pytest.mark.old_clients]

ASE_CLIENT = """
import json, sys
import ase
from ase import Atoms
from ase.calculators.socketio import SocketIOCalculator
atoms = Atoms(numbers={numbers}, positions={positions})
out = []
with SocketIOCalculator(unixsocket=sys.argv[1]) as calc:
    atoms.calc = calc
    for step in range(3):
        atoms.positions[0, 0] += 0.01
        out.append([atoms.get_potential_energy(), atoms.get_forces().tolist()])
print(json.dumps({{"ase": ase.__version__, "results": out}}))
"""


def drive(tmp_path, name, *args):
    structure = tmp_path / "ethanol.xyz"
    structure.write_text(ethanol_xyz())
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aniserve",
            "drive",
            "--model",
            DEFAULT_MODEL,
            "--dtype",
            "float64",
            "--structure",
            str(structure),
            "--unix",
            name,
            *args,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_ase_3_22_with_extras_none_matches_in_process(tmp_path):
    name = f"ani{uuid.uuid4().hex[:8]}"
    driver = drive(tmp_path, name, "--extras", "none", "--reconnect-timeout", "0")  # ASE closes without EXIT
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(ASE_CLIENT.format(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)))
    client = subprocess.run([OLD, str(script), name], capture_output=True, text=True, timeout=300)
    assert driver.wait(timeout=60) == 0, driver.stderr.read()
    assert client.returncode == 0, client.stderr
    report = json.loads(client.stdout)
    assert report["ase"] == "3.22.1"
    from ase import Atoms

    atoms = Atoms(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)
    atoms.calc = ANICalculator(cached_model(DEFAULT_MODEL, "float64"))
    for energy, forces in report["results"]:
        atoms.positions[0, 0] += 0.01
        assert abs(atoms.get_potential_energy() - energy) < 1e-8
        np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-8, rtol=0)


@pytest.mark.slow
def test_ipi_3_0_with_numpy_1_runs_a_pimd(tmp_path):
    name = f"ani{uuid.uuid4().hex[:8]}"
    (tmp_path / "input.xml").write_text(ipi_input(name, "ethanol.xyz", steps=5))
    (tmp_path / "ethanol.xyz").write_text(ethanol_xyz())
    version = subprocess.run(
        [OLD, "-c", "import importlib.metadata as m, numpy; print(m.version('ipi'), numpy.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert version[0].startswith("3.0") and version[1].startswith("1.")
    server = subprocess.Popen(
        [str(pathlib.Path(OLD).parent / "i-pi"), "input.xml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    driver = drive(tmp_path, name)
    out = server.communicate(timeout=300)[0].decode()
    assert server.returncode == 0, out
    try:
        code = driver.wait(timeout=60)
    finally:
        driver.kill()
    assert code == 0, driver.stderr.read() + out
    data = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert len(data) == 6, out
    potential = cached_model(DEFAULT_MODEL, "float64").evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS).energy
    assert abs(data[0, 1] - potential) < 1e-6  # step 0: both beads at the initial geometry
