"""``aniserve bench ase``: time per ASE ``SocketIOCalculator`` call, served by ``aniserve
drive`` over a UNIX socket and over TCP (INET), beside the in-process ``ANICalculator``.

Each call moves one atom (so nothing is cached) and asks for energy and forces: the
socket round trips, the driver's evaluation and ASE's own bookkeeping.  The first calls
(connection, kernel warm-up) are left out of the mean.
"""

from __future__ import annotations

import logging
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import click

from aniserve.bench import command as common
from aniserve.bench.speed import ETHANOL

log = logging.getLogger(__name__)


def _atoms():
    from ase import Atoms

    numbers, positions = ETHANOL
    return Atoms(numbers=numbers, positions=positions)


def _time_calls(atoms, calls: int, warmup: int) -> list[float]:
    times = []
    for step in range(warmup + calls):
        atoms.positions[0, 0] += 1e-4 * (-1) ** step
        start = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def _served(transport: str, model: str, calls: int, warmup: int, folder: pathlib.Path) -> list[float]:
    from ase.calculators.socketio import SocketIOCalculator
    from ase.io import write

    atoms = _atoms()
    structure = folder / "ethanol.xyz"
    write(structure, atoms)
    if transport == "unix":
        name = f"bench{uuid.uuid4().hex[:8]}"
        where, server_args = ["--unix", name], {"unixsocket": name}
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        where, server_args = ["--inet", f"127.0.0.1:{port}"], {"port": port}
    driver = subprocess.Popen(
        # (--reconnect-timeout 0: ASE's calculator closes without EXIT; end then, not 10 s later)
        [sys.executable, "-m", "aniserve", "drive", "--model", model, "--structure", str(structure), *where]
        + ["--reconnect-timeout", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with SocketIOCalculator(**server_args) as calc:
            atoms.calc = calc
            times = _time_calls(atoms, calls, warmup)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    return times


def run(model: str, calls: int = 200, warmup: int = 10) -> list[dict]:
    from aniserve.calculator import ANICalculator

    rows: list[dict[str, Any]] = []
    atoms = _atoms()
    atoms.calc = ANICalculator(model)
    cases = [("in-process", _time_calls(atoms, calls, warmup))]
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("unix", "inet"):
            cases.append((f"socket-{transport}", _served(transport, model, calls, warmup, pathlib.Path(tmp))))
    for name, times in cases:
        rows.append(
            {
                "client": name,
                "calls": calls,
                "ms_per_call_mean": 1e3 * statistics.fmean(times),
                "ms_per_call_median": 1e3 * statistics.median(times),
                "ms_per_call_p90": 1e3 * sorted(times)[int(0.9 * len(times))],
            }
        )
        log.info(f"{name:12s} {rows[-1]['ms_per_call_median']:8.2f} ms per call (median)")
    unix = next(r for r in rows if r["client"] == "socket-unix")
    for r in rows:
        r["ratio_to_unix"] = r["ms_per_call_median"] / unix["ms_per_call_median"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'client':12s} {'median ms':>9s} {'mean ms':>8s} {'p90 ms':>7s} {'× UNIX':>7s}"]
    lines += [
        f"{r['client']:12s} {r['ms_per_call_median']:9.2f} {r['ms_per_call_mean']:8.2f} "
        f"{r['ms_per_call_p90']:7.2f} {r['ratio_to_unix']:7.2f}"
        for r in rows
    ]
    return "\n".join(lines)


@click.command("ase")
@common.model_option
@click.option("--calls", default=200, show_default=True, help="Timed calls per client (after 10 warm-up calls).")
@common.json_option("Write each client's figures as JSON.")
def command(model, calls, json_out):
    """ms per ASE SocketIOCalculator call of ethanol, over UNIX and INET sockets, beside in-process.

    Example: aniserve bench ase --json ase.json
    """
    rows = run(model, calls)
    common.finish({"model": model, "rows": rows}, table(rows), json_out)
