"""The embedded default model: resolves by name with no model folder and no network,
and serves under ``aniserve drive`` exactly as in-process."""

import os
import subprocess
import sys

import numpy as np

from aniserve.embedded import DEFAULT_MODEL
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, ROOT


def test_loads_offline_by_name_without_the_model_zoo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ANISERVE_MODEL_DIR"}
    env.update(ANISERVE_CACHE=str(tmp_path), ANISERVE_MODEL_ZOO_URL="http://127.0.0.1:9/unreachable.zip")
    out = subprocess.run([sys.executable, "-m", "aniserve", "eval", str(ROOT / "examples/molecules/ethanol.xyz")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    energy = float(out.stdout.split("E =")[1].split("Ha")[0])
    assert -155.0 < energy < -154.0  # ethanol near CCSD(T)/cc-pVDZ (about -154.5 Ha)


def test_serves_under_drive_like_in_process():
    from ase import Atoms

    from aniserve import ANICalculator, load_model
    from aniserve.testing import drive_with_ase

    model = load_model(DEFAULT_MODEL, dtype="float64")
    assert model.elements == ["H", "C", "N", "O"] and model.ensemble_size == 4
    atoms = Atoms(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)
    local = ANICalculator(model)
    for positions, energy, forces in drive_with_ase(DEFAULT_MODEL, atoms):
        probe = atoms.copy()
        probe.positions = positions
        probe.calc = local
        assert abs(probe.get_potential_energy() - energy) < 1e-6
        np.testing.assert_allclose(probe.get_forces(), forces, atol=1e-6)
