"""``aniserve bench ipi``: wall time per i-PI step of 8-bead path-integral NVT of ethanol.

Clients compared on the same i-PI input: i-PI's own Python driver with its harmonic
potential (the cost of i-PI and the socket round trips alone), i-PI alone (``<ffdirect>``
with zero forces, in i-PI's process: its own step, the floor for any client), aniserve
with one connection (i-PI sends the 8 beads one by one), aniserve with one batched
connection (``<batch_size>8``: all beads in one message and one forward pass), aniserve
holding 8 connections (beads in flight together, gathered into one forward pass) and
aniserve inside i-PI (``aniserve.ipi_pes`` under ``<ffdirect>``, the 8 beads in one call).
Each setting runs twice, for ``short`` and ``long`` steps; the per-step time is
(t_long − t_short) / (long − short), which removes start-up and connection time.  With
``repeats``, the whole set runs again, and the summary gives medians and ranges.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from statistics import median

import click

from aniserve.bench import command as common
from aniserve.bench.speed import ETHANOL
from aniserve.driver import Address

log = logging.getLogger(__name__)

INPUT = """<simulation verbosity='low'>
  <output prefix='bench'><properties stride='1000' filename='out'> [step, potential] </properties></output>
  <total_steps>{steps}</total_steps>
  <prng><seed>12345</seed></prng>
  {forcefield}
  <system>
    <initialize nbeads='8'><file mode='xyz'>ethanol.xyz</file>
      <velocities mode='thermal' units='kelvin'>300</velocities></initialize>
    <forces><force forcefield='ff'/></forces>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
    <motion mode='dynamics'><dynamics mode='nvt'><timestep units='femtosecond'>0.25</timestep>
      <thermostat mode='pile_l'><tau units='femtosecond'>100</tau></thermostat></dynamics></motion>
  </system>
</simulation>
"""


#: Every client, in the order each repeat runs them (the harmonic driver first).
CLIENTS = (
    "harmonic",
    "ipi-alone",
    "aniserve-1-connection",
    "aniserve-batched",
    "aniserve-8-connections",
    "aniserve-in-ipi",
)

#: Clients that run inside i-PI (``<ffdirect>``): no socket, no second process.
IN_IPI = {
    # i-PI's own step with zero forces: what no force provider can go below.
    "ipi-alone": "<pes>dummy</pes>",
    # aniserve.ipi_pes, the 8 beads in one call.
    "aniserve-in-ipi": "<pes>custom</pes><pes_path>{pes}</pes_path>"
    "<parameters>{{template: ethanol.xyz, model: {model}, pbc: no}}</parameters><batch_size>8</batch_size>",
}


def _forcefield(kind: str, address: str, latency: float, model: str) -> str:
    if kind in IN_IPI:
        from aniserve import ipi_pes

        pes = IN_IPI[kind].format(pes=pathlib.Path(ipi_pes.__file__).resolve(), model=model)
        return f"<ffdirect name='ff' pbc='false'><latency>{latency}</latency>{pes}</ffdirect>"
    batch = "<batch_size>8</batch_size>" if kind == "aniserve-batched" else ""
    return (
        f"<ffsocket name='ff' mode='unix' pbc='false'><address>{address}</address>"
        f"<latency>{latency}</latency>{batch}</ffsocket>"
    )


def _script(name: str) -> str:
    """An i-PI console script: beside this Python (a venv), else on PATH."""
    local = pathlib.Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found: bench ipi runs i-PI itself; install it with pip install 'aniserve[ipi]'"
        )
    return found


def _client(kind: str, address: str, model: str, structure: pathlib.Path) -> list[str]:
    if kind == "harmonic":
        return [_script("i-pi-py_driver"), "-u", "-a", address, "-m", "harmonic", "-o", "1.0"]
    connections = "8" if kind == "aniserve-8-connections" else "1"
    return [
        sys.executable,
        "-m",
        "aniserve",
        "drive",
        "--model",
        model,
        "--structure",
        str(structure),
        "--unix",
        address,
        "--connections",
        connections,
        "--pbc",
        "no",  # a molecule in a box, as docs/serving.md runs it
    ]


def _run_once(kind: str, steps: int, model: str, folder: pathlib.Path, latency: float) -> float:
    address = f"bench{uuid.uuid4().hex[:8]}"
    (folder / "input.xml").write_text(INPUT.format(steps=steps, forcefield=_forcefield(kind, address, latency, model)))
    ipi = _script("i-pi")
    start = time.perf_counter()
    server = subprocess.Popen(
        [ipi, "input.xml"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if kind in IN_IPI:
        _, errors = server.communicate()  # (read while it runs: a full pipe would stall i-PI)
        elapsed = time.perf_counter() - start
        if server.returncode != 0:
            raise RuntimeError(f"i-PI failed ({kind}): {errors[-2000:]}")
        return elapsed
    # Start the client once i-PI's socket exists (i-PI's own driver gives up at once if
    # it does not); the difference of two runs cancels the wait.
    socket_path = pathlib.Path(str(Address.unix(address).target))  # i-PI's naming, as the driver knows it
    deadline = time.monotonic() + 120
    while not socket_path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"i-PI did not open its socket ({kind}): {_tail(server)}")
        time.sleep(0.05)
    client = subprocess.Popen(
        _client(kind, address, model, folder / "ethanol.xyz"),
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while server.poll() is None:
            if client.poll() not in (None, 0):
                raise RuntimeError(f"{kind} client exited with {client.returncode}: {_tail(client)}")
            time.sleep(0.05)
        code = server.returncode
        elapsed = time.perf_counter() - start
        client.wait(timeout=60)
    finally:
        for process in (server, client):
            if process.poll() is None:
                process.kill()
    if code != 0:
        raise RuntimeError(f"i-PI failed ({kind}): {_tail(server)}")
    return elapsed


def run(
    model: str,
    short: int = 20,
    long: int = 120,
    kinds=CLIENTS,
    latencies=(1e-3, 1e-4),
    repeats: int = 1,
) -> list[dict]:
    """Rows per (repeat, socket latency, client); i-PI's default <latency> is 1e-3 s.

    Each repeat measures every client once, the harmonic driver first, so a ratio
    compares runs minutes apart rather than the whole benchmark apart: on a shared
    machine the harmonic driver's own figure moves by half between repeats.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        numbers, positions = ETHANOL
        symbols = {1: "H", 6: "C", 8: "O"}
        (folder / "ethanol.xyz").write_text(
            f"{len(numbers)}\n# CELL(abcABC): 30 30 30 90 90 90 positions{{angstrom}} cell{{angstrom}}\n"
            + "".join(f"{symbols[z]} {x:.6f} {y:.6f} {w:.6f}\n" for z, (x, y, w) in zip(numbers, positions))
        )
        for repeat in range(repeats):
            in_process = in_process_ms(model)
            log.info(f"repeat {repeat + 1}/{repeats} in-process evaluation of the 8 beads {in_process:.2f} ms")
            for latency in latencies:
                for kind in kinds:
                    t_short = _run_once(kind, short, model, folder, latency)
                    t_long = _run_once(kind, long, model, folder, latency)
                    per_step = (t_long - t_short) / (long - short)
                    rows.append(
                        {
                            "client": kind,
                            "latency_s": latency,
                            "repeat": repeat,
                            "ms_per_step": per_step * 1e3,
                            "beads": 8,
                            "steps": [short, long],
                            "wall_s": [t_short, t_long],
                            "in_process_ms": in_process,
                        }
                    )
                    log.info(
                        f"repeat {repeat + 1}/{repeats} latency {latency:g} s {kind:24s} "
                        f"{per_step * 1e3:8.2f} ms per step",
                    )
    for r in rows:

        def of(client: str, r=r) -> float | None:
            """That client's ms per step in r's repeat and latency."""
            return next(
                (
                    b["ms_per_step"]
                    for b in rows
                    if b["client"] == client and b["latency_s"] == r["latency_s"] and b["repeat"] == r["repeat"]
                ),
                None,
            )

        base, alone = of("harmonic"), of("ipi-alone")
        if base:
            r["ratio_to_harmonic"] = r["ms_per_step"] / base
            if r["client"] not in ("harmonic", "ipi-alone"):
                # What the client adds to i-PI's step with its harmonic driver (i-PI's own
                # work and socket round trips), against what the same 8 beads cost
                # evaluated in-process: 1 would be a driver with no cost of its own.
                r["over_harmonic_ms"] = r["ms_per_step"] - base
                r["over_harmonic_to_in_process"] = r["over_harmonic_ms"] / r["in_process_ms"]
        if alone and r["client"] not in ("harmonic", "ipi-alone"):
            # The same against i-PI's own step with no forces at all (no sockets either).
            r["over_ipi_alone_ms"] = r["ms_per_step"] - alone
            r["over_ipi_alone_to_in_process"] = r["over_ipi_alone_ms"] / r["in_process_ms"]
    return rows


def in_process_ms(model: str, calls: int = 200) -> float:
    """Median ms of one in-process evaluation (energy and forces) of 8 ethanol beads in
    one batch, float32 as the driver serves them, with this process's threads."""
    import numpy as np

    from aniserve.models import load_model

    potential = load_model(model, dtype="float32")
    numbers, positions = ETHANOL
    rng = np.random.default_rng(0)
    beads = np.asarray(positions)[None] + rng.normal(scale=0.02, size=(8, len(numbers), 3))
    batch = np.tile(np.asarray(numbers), (8, 1))
    times = []
    for i in range(calls + 10):
        start = time.perf_counter()
        potential.evaluate(batch, beads)
        if i >= 10:
            times.append(time.perf_counter() - start)
    return median(times) * 1e3


def summary(rows: list[dict]) -> list[dict]:
    """Per (latency, client): the median and range over repeats of ms per step and of the
    ratio to the harmonic driver of the same repeat."""
    out = []
    for key in dict.fromkeys((r["latency_s"], r["client"]) for r in rows):
        group = [r for r in rows if (r["latency_s"], r["client"]) == key]
        ms = [r["ms_per_step"] for r in group]
        ratios = [r["ratio_to_harmonic"] for r in group if "ratio_to_harmonic" in r]
        overheads = [r["over_harmonic_to_in_process"] for r in group if "over_harmonic_to_in_process" in r]
        over_alone = [r["over_ipi_alone_to_in_process"] for r in group if "over_ipi_alone_to_in_process" in r]
        entry = {
            "latency_s": key[0],
            "client": key[1],
            "repeats": len(group),
            "ms_per_step_median": median(ms),
            "ms_per_step_range": [min(ms), max(ms)],
        }
        if ratios:
            entry.update(ratio_median=median(ratios), ratio_range=[min(ratios), max(ratios)])
        if overheads:
            entry.update(
                over_harmonic_to_in_process_median=median(overheads),
                over_harmonic_to_in_process_range=[min(overheads), max(overheads)],
            )
        if over_alone:
            entry.update(
                over_ipi_alone_to_in_process_median=median(over_alone),
                over_ipi_alone_to_in_process_range=[min(over_alone), max(over_alone)],
            )
        out.append(entry)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        f"{'repeat':>6s} {'latency s':>9s} {'client':24s} {'ms/step':>8s} {'× harmonic':>10s} "
        f"{'over harmonic ms':>16s} {'÷ in-process':>12s} {'over i-PI alone ms':>18s} {'÷ in-process':>12s}"
    ]
    nan = float("nan")
    lines += [
        f"{r['repeat'] + 1:6d} {r['latency_s']:9g} {r['client']:24s} {r['ms_per_step']:8.2f} "
        f"{r.get('ratio_to_harmonic', nan):10.2f} {r.get('over_harmonic_ms', nan):16.2f} "
        f"{r.get('over_harmonic_to_in_process', nan):12.2f} {r.get('over_ipi_alone_ms', nan):18.2f} "
        f"{r.get('over_ipi_alone_to_in_process', nan):12.2f}"
        for r in rows
    ]
    lines.append(
        "over harmonic: the step minus i-PI's harmonic driver's step (i-PI's own work and socket round trips); "
        "over i-PI alone: minus i-PI's step with zero forces in its own process (ipi-alone); "
        "÷ in-process: that over one in-process evaluation of the same 8 beads, "
        + ", ".join(f"{ms:.2f} ms" for ms in dict.fromkeys(r["in_process_ms"] for r in rows if "in_process_ms" in r))
    )
    if len({r["repeat"] for r in rows}) > 1:
        lines += [
            "",
            f"{'latency s':>9s} {'client':24s} {'ms/step median (range)':>24s} {'× harmonic median (range)':>28s}",
        ]
        for s in summary(rows):
            ratio = (
                f"{s['ratio_median']:.2f} ({s['ratio_range'][0]:.2f}–{s['ratio_range'][1]:.2f})"
                if "ratio_median" in s
                else ""
            )
            lines.append(
                f"{s['latency_s']:9g} {s['client']:24s} "
                f"{s['ms_per_step_median']:7.2f} ({s['ms_per_step_range'][0]:.2f}–"
                f"{s['ms_per_step_range'][1]:.2f}) {ratio:>28s}"
            )
    return "\n".join(lines)


def _tail(process: subprocess.Popen) -> str:
    """The end of a process's captured stderr, for an error message."""
    return process.stderr.read()[-2000:] if process.stderr else ""


@click.command("ipi")
@common.model_option
@click.option(
    "--steps",
    default="20,220",
    show_default=True,
    help="Short and long run lengths; the per-step time is their difference over the extra steps.",
)
@click.option(
    "--repeat",
    "repeats",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Run every setting this many times (each time the harmonic driver first) and summarise "
    "medians and ranges: on a shared machine one run is one sample.",
)
@click.option(
    "--clients",
    default=",".join(CLIENTS),
    show_default=True,
    help="Which clients to time, comma-separated (ratios need harmonic; overheads over i-PI alone need ipi-alone).",
)
@common.json_option()
def command(model, steps, repeats, clients, json_out):
    """ms per i-PI step, 8-bead PIMD of ethanol: aniserve (socket, and inside i-PI) vs i-PI's
    harmonic Python driver and vs i-PI alone.

    Example: aniserve bench ipi --model ani-1ccx --repeat 4 --json ipi.json
    """
    short, long = (int(s) for s in steps.split(","))
    if not 0 < short < long:
        raise click.BadParameter("need 0 < short < long", param_hint="--steps")
    kinds = tuple(c.strip() for c in clients.split(",") if c.strip())
    unknown = [c for c in kinds if c not in CLIENTS]
    if unknown or not kinds:
        raise click.BadParameter(
            f"unknown client(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CLIENTS)}",
            param_hint="--clients",
        )
    rows = run(model, short, long, kinds=kinds, repeats=repeats)
    common.finish({"model": model, "rows": rows, "summary": summary(rows)}, table(rows), json_out)
