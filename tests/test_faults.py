"""Servers that die: i-PI and an ASE SocketIOCalculator killed with SIGKILL mid-run,
again and again.  The driver must treat each as "server gone": serve the restarted
server within its reconnect window, and exit 0 (never a traceback or a broken pipe)
when none comes back, or 2 when the last one died half way through a message."""

import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, ROOT, ethanol_xyz, ipi_input

from aniserve.embedded import DEFAULT_MODEL

IPI = [str(pathlib.Path(sys.executable).parent / "i-pi")]
ASE_SERVER = """
import sys
from ase import Atoms
from ase.calculators.socketio import SocketIOCalculator
atoms = Atoms(numbers={numbers}, positions={positions})
with SocketIOCalculator(unixsocket=sys.argv[1]) as calc:
    atoms.calc = calc
    for step in range(1000000):
        atoms.positions[0, 0] += 1e-4 * (-1) ** step
        energy = atoms.get_potential_energy()
        print(step, energy, flush=True)
"""


def wait_for(predicate, timeout: float, what: str, driver):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    driver.kill()  # its log says why it did not serve
    raise AssertionError(f"timed out waiting for {what}; the driver's log:\n{driver.stderr.read()}")


def start_driver(tmp_path, name):
    (tmp_path / "init.xyz").write_text(ethanol_xyz())
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aniserve",
            "drive",
            "--model",
            DEFAULT_MODEL,
            "--structure",
            str(tmp_path / "init.xyz"),
            "--unix",
            name,
            "--reconnect-timeout",
            "30",
            "--connect-timeout",
            "60",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(driver) -> str:
    """No server comes back: exit 0 after the reconnect window.  The one exception is a
    last server killed between two writes of one message (ASE writes POSDATA in pieces):
    the half message is named, and with no server back to answer it that is exit 2, as
    test_driver_ipi's truncation tests pin down with a fake server."""
    code = driver.wait(timeout=90)
    log = driver.stderr.read()
    # (the line that names the end comes before the driver's closing summary of what it served)
    truncated = any("in the middle of a message" in line and "no server came back" in line for line in log.splitlines())
    assert code == (2 if truncated else 0), log
    assert "Traceback" not in log and "Broken pipe" not in log, log
    return log


@pytest.mark.slow
def test_ipi_killed_ten_times_mid_run(tmp_path):
    name = f"ani{uuid.uuid4().hex[:8]}"
    driver = start_driver(tmp_path, name)
    for run in range(10):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        (folder / "init.xyz").write_text(ethanol_xyz())
        (folder / "input.xml").write_text(ipi_input(name, "init.xyz", seed=run + 1))
        # A SIGKILLed i-PI leaves its socket file behind; a restart must remove it first.
        pathlib.Path(f"/tmp/ipi_{name}").unlink(missing_ok=True)
        server = subprocess.Popen(IPI + ["input.xml"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = folder / "sim.out"

        def steps():
            return sum(1 for line in out.read_text().splitlines() if not line.startswith("#")) if out.exists() else 0

        wait_for(lambda: steps() >= 5 + run, 120, f"i-PI run {run} to be served", driver)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert driver.poll() is None, f"the driver exited after i-PI run {run} was killed: {driver.stderr.read()}"
    pathlib.Path(f"/tmp/ipi_{name}").unlink(missing_ok=True)
    log = finish(driver)  # no server comes back: exit 0 after the reconnect window
    assert log.count("closed the connection; waiting") == 10


@pytest.mark.slow
def test_ase_server_killed_five_times_mid_run(tmp_path):
    name = f"ani{uuid.uuid4().hex[:8]}"
    driver = start_driver(tmp_path, name)
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(ASE_SERVER.format(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)))
    for run in range(5):
        pathlib.Path(f"/tmp/ipi_{name}").unlink(missing_ok=True)
        log = tmp_path / f"ase{run}.log"
        with open(log, "w") as stdout:
            server = subprocess.Popen([sys.executable, str(script), name], stdout=stdout, stderr=subprocess.STDOUT)
            wait_for(lambda: len(log.read_text().splitlines()) >= 20, 120, f"ASE run {run} to be served", driver)
            server.send_signal(signal.SIGKILL)
            server.wait()
        assert driver.poll() is None, f"the driver exited after ASE run {run} was killed: {driver.stderr.read()}"
    pathlib.Path(f"/tmp/ipi_{name}").unlink(missing_ok=True)
    finish(driver)
