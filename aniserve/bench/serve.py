"""``aniserve bench serve``: one ``aniserve drive`` process serving N connections.

A minimal i-PI-protocol server (``aniserve.protocol``'s server half, one select loop)
holds N connections to a single driver process and, on each, sends ethanol positions as
fast as the replies come back (POSDATA + STATUS, then GETFORCE, as i-PI does).  The
driver gathers whatever is waiting into one batched evaluation.  Beside it, the same N
structures evaluated in-process by one ``Evaluator`` call: the share of time outside
the model is 1 − driver/in-process.  The server is Python too and runs on the same
cores, so at large N part of that share is the benchmark's own server.  With repeats,
each figure is a median over back-to-back pairs of runs.
"""

from __future__ import annotations

import logging
import pathlib
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Hashable
from statistics import median

import click
import numpy as np

from aniserve import protocol
from aniserve.bench import command as common
from aniserve.bench.speed import ETHANOL
from aniserve.driver import RECV_BYTES
from aniserve.units import BOHR_IN_ANGSTROM

log = logging.getLogger(__name__)


def _variants(count: int = 16, seed: int = 0) -> list[bytes]:
    """POSDATA messages of slightly displaced ethanols (Bohr), cycled through."""
    numbers, positions = ETHANOL
    rng = np.random.default_rng(seed)
    cell = np.zeros((1, 3, 3))
    return [
        protocol.encode_posdata(
            cell, (np.array(positions) + rng.normal(0, 0.01, (len(numbers), 3)))[None] / BOHR_IN_ANGSTROM
        )
        for _ in range(count)
    ]


class _Client:
    def __init__(self, sock: socket.socket, bead: int):
        self.sock, self.bead, self.buffer, self.state, self.sent = sock, bead, bytearray(), "needinit", 0


def _driver_rate(model: str, connections: int, seconds: float, folder: pathlib.Path) -> dict:
    numbers, positions = ETHANOL
    symbols = {1: "H", 6: "C", 8: "O"}
    structure = folder / "ethanol.xyz"
    structure.write_text(
        f"{len(numbers)}\n\n" + "".join(f"{symbols[z]} {x} {y} {w}\n" for z, (x, y, w) in zip(numbers, positions))
    )
    path = str(folder / f"serve{connections}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(connections)
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aniserve",
            "drive",
            "--model",
            model,
            "--structure",
            str(structure),
            "--unix",
            path,
            "--connections",
            str(connections),
            "--reconnect-timeout",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    messages = _variants()
    selector = selectors.DefaultSelector()
    clients: list[_Client] = []
    done, start, deadline = 0, None, None
    try:
        listener.settimeout(120)
        # The driver answers each connection's first STATUS before opening the next one,
        # and reads INIT only once all are open: the handshake goes in those two rounds.
        while len(clients) < connections:
            sock, _ = listener.accept()
            client = _Client(sock, len(clients))
            sock.sendall(protocol.header("STATUS"))
            _expect(client, protocol.header("NEEDINIT"))
            clients.append(client)
        for client in clients:
            client.sock.sendall(protocol.encode_init(client.bead, "") + protocol.header("STATUS"))
        for client in clients:
            _expect(client, protocol.header("READY"))
        for client in clients:
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_READ, client)
            client.sock.sendall(messages[0] + protocol.header("STATUS"))
            client.state = "havedata"
        warmup_until = time.perf_counter() + min(2.0, seconds)
        while deadline is None or time.perf_counter() < deadline:
            for key, _ in selector.select(timeout=10):
                client = key.data
                data = client.sock.recv(RECV_BYTES)
                if not data:
                    raise RuntimeError(
                        f"the driver closed a connection: {driver.stderr.read()[-2000:] if driver.stderr else ''}"
                    )
                client.buffer += data
                while _step(client, messages):
                    if start is not None:
                        done += 1
            now = time.perf_counter()
            if start is None and now >= warmup_until:
                start, deadline = now, now + seconds
        assert start is not None  # the loop ends only after the deadline, set with start
        elapsed = time.perf_counter() - start
        for client in clients:
            client.sock.setblocking(True)
            client.sock.sendall(protocol.header("EXIT"))
    finally:
        for client in clients:
            client.sock.close()
        listener.close()
        pathlib.Path(path).unlink(missing_ok=True)
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
    return {"evaluations": done, "seconds": elapsed}


def _expect(client: _Client, wanted: bytes) -> None:
    """Blocking read of one 12-byte status reply."""
    got = b""
    while len(got) < protocol.HEADER_LENGTH:
        chunk = client.sock.recv(protocol.HEADER_LENGTH - len(got))
        if not chunk:
            raise RuntimeError("the driver closed a connection during the handshake")
        got += chunk
    if got != wanted:
        raise RuntimeError(f"expected {wanted!r}, got {got!r}")


def _step(client: _Client, messages: list[bytes]) -> bool:
    """Advance one connection on what it has received; True when forces came back."""
    if client.state == "havedata":
        if len(client.buffer) < protocol.HEADER_LENGTH:
            return False
        if bytes(client.buffer[: protocol.HEADER_LENGTH]) != protocol.header("HAVEDATA"):
            raise RuntimeError(f"expected HAVEDATA, got {bytes(client.buffer[:12])!r}")
        del client.buffer[: protocol.HEADER_LENGTH]
        client.sock.sendall(protocol.header("GETFORCE"))
        client.state = "forces"
        return False
    length = protocol.forceready_length(client.buffer)  # only counted: not decoded
    if length is None:
        return False
    del client.buffer[:length]
    client.sent += 1
    client.sock.sendall(messages[client.sent % len(messages)] + protocol.header("STATUS"))
    client.state = "havedata"
    return True


def _in_process_rate(model: str, connections: int, seconds: float) -> dict:
    from aniserve.models import load_model
    from aniserve.serving import Evaluator, Structure

    numbers, positions = ETHANOL
    evaluator = Evaluator(load_model(model))
    rng = np.random.default_rng(0)
    variants = [np.array(positions) + rng.normal(0, 0.01, (len(numbers), 3)) for _ in range(16)]
    calls, start = 0, None
    warmup_until = time.perf_counter() + min(2.0, seconds)
    while True:
        slots: list[tuple[Hashable, Structure]] = [
            ((0, c), Structure(np.array(numbers), variants[(calls + c) % 16])) for c in range(connections)
        ]
        evaluator.evaluate(slots)
        now = time.perf_counter()
        if start is None:
            if now >= warmup_until:
                start = now
            continue
        calls += 1
        if now - start >= seconds:
            return {"evaluations": calls * connections, "seconds": now - start}


def run(model: str, connections=(1, 8, 64, 256), seconds: float = 5.0, repeats: int = 1) -> list[dict]:
    """One case per N: medians over ``repeats`` of the driver's and the in-process rates
    and of their ratio, each repeat measuring the two back to back (on a shared machine
    either alone moves by a third from one minute to the next); ``samples`` keeps every
    repeat's figures."""
    atoms = len(ETHANOL[0])
    samples: dict[int, list[dict]] = {n: [] for n in connections}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for n in connections:
                served = _driver_rate(model, n, seconds, pathlib.Path(tmp))
                local = _in_process_rate(model, n, seconds)
                driver_rate = served["evaluations"] / served["seconds"] * atoms
                local_rate = local["evaluations"] / local["seconds"] * atoms
                samples[n].append(
                    {
                        "driver_atoms_per_s": driver_rate,
                        "in_process_atoms_per_s": local_rate,
                        "driver_to_in_process": driver_rate / local_rate,
                    }
                )
                log.info(
                    f"repeat {repeat + 1}/{repeats} {n:4d} connections: driver {driver_rate:10.0f} atoms/s, "
                    f"in-process {local_rate:10.0f} atoms/s ({driver_rate / local_rate:.0%})",
                )
    cases = []
    for n in connections:
        ratios = [s["driver_to_in_process"] for s in samples[n]]
        driver = median(s["driver_atoms_per_s"] for s in samples[n])
        local = median(s["in_process_atoms_per_s"] for s in samples[n])
        cases.append(
            {
                "connections": n,
                "driver_atoms_per_s": driver,
                "driver_evaluations_per_s": driver / atoms,
                "in_process_atoms_per_s": local,
                "in_process_evaluations_per_s": local / atoms,
                "driver_to_in_process": median(ratios),
                "driver_to_in_process_range": [min(ratios), max(ratios)],
                "share_outside_model": 1 - median(ratios),
                "seconds": seconds,
                "repeats": repeats,
                "samples": samples[n],
            }
        )
    return cases


def table(cases: list[dict]) -> str:
    lines = [f"{'connections':>11s} {'driver atoms/s':>15s} {'in-process atoms/s':>19s} {'ratio':>6s} {'range':>11s}"]
    lines += [
        f"{c['connections']:11d} {c['driver_atoms_per_s']:15.0f} {c['in_process_atoms_per_s']:19.0f} "
        f"{c['driver_to_in_process']:6.2f} {c['driver_to_in_process_range'][0]:5.2f}–"
        f"{c['driver_to_in_process_range'][1]:.2f}"
        for c in cases
    ]
    if any(c["repeats"] > 1 for c in cases):
        lines.append("(medians over repeats; the ratio is the median of each repeat's ratio)")
    return "\n".join(lines)


@click.command("serve")
@common.model_option
@click.option(
    "--connections",
    default="1,8,64,256",
    show_default=True,
    help="Comma-separated numbers of connections, one driver process each time.",
)
@click.option("--seconds", default=5.0, show_default=True, help="Measured seconds per case (after 2 s warm-up).")
@click.option(
    "--repeat",
    "repeats",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Measure every case this many times (driver and in-process back to back) and report medians.",
)
@common.json_option('Write {"cases": [{"connections": N, "driver_atoms_per_s": …, "in_process_atoms_per_s": …}]}.')
def command(model, connections, seconds, repeats, json_out):
    """Atoms/s of one driver serving N connections of ethanol, against in-process batches of N.

    Example: aniserve bench serve --repeat 5 --json serve.json
    """
    cases = run(model, [int(c) for c in connections.split(",")], seconds, repeats)
    common.finish({"model": model, "cases": cases}, table(cases), json_out)
