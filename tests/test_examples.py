"""The ASE socket example runs as written, and cannot hang when the driver cannot start."""

import subprocess
import sys

from conftest import ROOT

EXAMPLE = [sys.executable, str(ROOT / "examples" / "ase-socket" / "run.py")]


def test_ase_example_optimises_with_the_default_model(tmp_path):
    run = subprocess.run(EXAMPLE, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    final = run.stdout.strip().splitlines()[-1]
    assert "final energy" in final and float(final.split("max |F|")[1].split()[0]) < 0.01
    assert not list(tmp_path.iterdir())  # nothing written where it was run


def test_ase_example_stops_with_the_drivers_message_when_it_cannot_start(tmp_path):
    run = subprocess.run(EXAMPLE + ["--model", "nosuchmodel"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 1
    assert "model 'nosuchmodel' not found" in run.stderr and "stopped: Subprocess terminated" in run.stderr
