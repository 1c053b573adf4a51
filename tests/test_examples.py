"""The ASE socket example runs as written, and cannot hang when the driver cannot start."""

import os
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT

EXAMPLE = [sys.executable, str(ROOT / "examples" / "ase-socket" / "run.py")]


@pytest.mark.slow
def test_ase_example_optimises_with_the_default_model(tmp_path):
    run = subprocess.run(EXAMPLE, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    final = run.stdout.strip().splitlines()[-1]
    assert "final energy" in final and float(final.split("max |F|")[1].split()[0]) < 0.01
    assert not list(tmp_path.iterdir())  # nothing written where it was run


@pytest.mark.slow
def test_ase_example_stops_with_the_drivers_message_when_it_cannot_start(tmp_path):
    run = subprocess.run(
        EXAMPLE + ["--model", "nosuchmodel"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode == 1
    assert "unknown model 'nosuchmodel'" in run.stderr and "stopped: Subprocess terminated" in run.stderr


IPI_EXAMPLE = ["bash", str(ROOT / "examples" / "ipi-pimd-water" / "run.sh")]


def _source_tree_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "examples"], cwd=ROOT, capture_output=True, text=True
    ).stdout


def _ipi_processes(under: pathlib.Path) -> int:
    """i-PI processes running in a folder under ``under`` (the example's scratch folders),
    so that another test's i-PI on the other worker is not counted."""
    pids = subprocess.run(["pgrep", "-f", "i-pi input.xml"], capture_output=True, text=True).stdout.split()
    count = 0
    for pid in pids:
        try:
            cwd = pathlib.Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:  # (ended meanwhile)
            continue
        count += cwd.is_relative_to(under)
    return count


@pytest.mark.slow
def test_ipi_example_runs_in_a_scratch_folder_and_prints_units(tmp_path):
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    before = _source_tree_status()
    run = subprocess.run(IPI_EXAMPLE, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert "potential/Ha" in lines[1] and len(lines) == 6
    assert [int(line.split()[0]) for line in lines[2:5]] == [18, 19, 20]
    work = pathlib.Path(lines[-1].split("output in ")[1])
    assert work.parent == tmp_path and (work / "water.out").exists()
    assert _source_tree_status() == before  # nothing written into the source tree


@pytest.mark.slow
def test_ipi_example_stops_ipi_when_the_driver_fails(tmp_path):
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    before = _ipi_processes(tmp_path)
    run = subprocess.run(
        IPI_EXAMPLE + ["nosuchmodel"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert run.returncode != 0 and "unknown model 'nosuchmodel'" in run.stderr
    assert _ipi_processes(tmp_path) == before
