"""The command line, run as a user runs it."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def run(*args):
    return subprocess.run([sys.executable, "-m", "aniserve", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_eval_prints_energy_in_hartree_and_ev():
    out = run("eval", "examples/molecules/ethanol.xyz", "--model", "ani-1ccx")
    assert out.returncode == 0, out.stderr
    assert "C2H6O" in out.stdout and " Ha = " in out.stdout and " eV" in out.stdout


@pytest.mark.slow
def test_models_lists_the_official_models():
    out = run("models")
    assert out.returncode == 0, out.stderr
    for name in ("ani-1x", "ani-1ccx", "ani-2x"):
        assert name in out.stdout
    assert "H-C-N-O-S-F-Cl" in out.stdout
    # each model's calibration: the embedded default states both thresholds it was fitted
    from aniserve.embedded import DEFAULT_MODEL
    from aniserve.modelfile import read_description
    from aniserve.models import resolve

    u = read_description(resolve(DEFAULT_MODEL))["uncertainty"]
    default = next(line for line in out.stdout.splitlines() if line.startswith(DEFAULT_MODEL + " "))
    shown = f"spread ×{u['energy_std_scale']:.2f}, collects ρ > {u['collect_threshold_kcal']:.2f} (relative > "
    assert shown + f"{u['collect_threshold_relative_kcal']:.2f})" in default


@pytest.mark.slow
def test_plugins_json_lists_builtins():
    out = run("plugins", "--json")
    rows = json.loads(out.stdout)
    assert {"kind": "featurizer", "name": "ani-aev"}.items() <= next(r for r in rows if r["name"] == "ani-aev").items()
    assert all(set(r) == {"kind", "name", "plugin", "version", "description"} for r in rows)


@pytest.mark.slow
def test_eval_reports_unknown_element_cleanly(tmp_path):
    path = tmp_path / "sih4.xyz"
    path.write_text("5\n\nSi 0 0 0\nH 0.9 0.9 0.9\nH -0.9 -0.9 0.9\nH -0.9 0.9 -0.9\nH 0.9 -0.9 -0.9\n")
    out = run("eval", str(path), "--model", "ani-1ccx")
    assert out.returncode != 0 and "Si" in out.stderr and "Traceback" not in out.stderr
