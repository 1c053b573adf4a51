"""``aniserve drive`` against servers that misbehave on purpose: a server that never
reads, one that keeps the others waiting while it reconnects, a POSDATA that declares
ten million atoms, and shared-memory segments that shrink, belong to someone else or
change size with a new INIT.  Each ends with a documented exit status and one line
naming the problem, within the timeouts, never a signal or a wedged process."""

import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest
from conftest import ETHANOL_POSITIONS, ROOT

from aniserve import protocol
from aniserve.units import BOHR_IN_ANGSTROM

STRUCTURE = ROOT / "examples" / "molecules" / "ethanol.xyz"
DRIVE = [
    sys.executable,
    "-m",
    "aniserve",
    "drive",
    "--structure",
    str(STRUCTURE),
    "--dtype",
    "float64",
    "--connect-timeout",
    "30",
    "--threads",
    "1",
]


class Server:
    """A listening UNIX or INET socket playing i-PI's side from scripted bytes."""

    def __init__(self, kind="unix"):
        self.kind = kind
        if kind == "inet":
            self.listener = socket.socket(socket.AF_INET)
            self.listener.bind(("127.0.0.1", 0))
            self.address = ["--inet", f"127.0.0.1:{self.listener.getsockname()[1]}"]
        else:
            self.name = f"ani{uuid.uuid4().hex[:8]}"
            self.path = f"/tmp/ipi_{self.name}"
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(self.path)
            self.address = ["--shm" if kind == "shm" else "--unix", self.name]
        self.listener.listen(4)
        self.listener.settimeout(30)

    def start(self, *args):
        self.driver = subprocess.Popen(DRIVE + self.address + list(args), cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()
        return self

    def accept(self, batch_size=1):
        return self.accept_all(1, batch_size)[0]

    def accept_all(self, count, batch_size=1):
        """``count`` connections, each greeted (the driver opens the next one only once
        the last has had its first STATUS), then given INIT."""
        conns = []
        for _ in range(count):
            conn, _ = self.listener.accept()
            conn.settimeout(30)
            conn.sendall(protocol.header("STATUS"))
            assert conn.recv(12) == protocol.header("NEEDINIT")
            conns.append(conn)
        for conn in conns:
            conn.sendall(protocol.encode_init(0, f"batch_size:{batch_size}" if batch_size > 1 else ""))
            conn.sendall(protocol.header("STATUS"))
            assert conn.recv(12) == protocol.header("READY")
        return conns

    def finish(self, timeout=60):
        try:
            code = self.driver.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            raise AssertionError(
                f"the driver was still running after {timeout} s:\n{self.driver.stderr.read()}"
            ) from None
        self.listener.close()
        if self.kind != "inet":
            os.unlink(self.path)
        return code, self.driver.stderr.read(), time.monotonic() - self.started


def posdata():
    return protocol.encode_posdata(np.eye(3)[None] * 40, np.array(ETHANOL_POSITIONS)[None] / BOHR_IN_ANGSTROM)


def ask_forces(conn, batch_size=1):
    conn.sendall(posdata() + protocol.header("GETFORCE"))
    buffer = b""
    while (decoded := protocol.decode_forceready(buffer, batch_size)) is None:
        chunk = conn.recv(65536)
        assert chunk, "driver closed the connection"
        buffer += chunk
    return decoded[0]


def flood_without_reading(conn, seconds=1.0):
    """STATUS after STATUS, never reading a reply, until the driver stops taking them
    (whole messages: a partly sent block is finished before the next)."""
    conn.setblocking(False)
    end = time.monotonic() + seconds
    pending = memoryview(b"")
    while time.monotonic() < end:
        if not pending:
            pending = memoryview(protocol.header("STATUS") * 4096)
        try:
            pending = pending[conn.send(pending) :]
        except BlockingIOError:
            time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unix", "inet"])
def test_a_server_that_never_reads_ends_its_connection_within_the_timeout(kind):
    """Before: blocked in sendall for ever, whatever --timeout said."""
    server = Server(kind).start("--timeout", "2", "--idle-timeout", "2")
    conn = server.accept()
    flood_without_reading(conn)
    code, log, _ = server.finish()
    conn.close()
    assert code == 2, log
    # ended by --timeout (2 s), by its own message; finish() gives up on a wedged driver
    assert "has not read our reply" in log and "for 2 s" in log and "Traceback" not in log


@pytest.mark.slow
def test_a_server_that_never_reads_does_not_starve_the_other_connection():
    """Two connections: one floods and never reads; the other gets its five steps
    answered meanwhile, and ends cleanly.  The wedged one is dropped (exit 2 at the end)."""
    server = Server().start("--connections", "2", "--timeout", "3")
    wedged, healthy = server.accept_all(2)
    flood_without_reading(wedged, seconds=0.5)
    healthy.settimeout(10)
    for _ in range(5):
        energies, _forces, _virials, _extras = ask_forces(healthy)
        assert np.isfinite(energies[0])
    healthy.sendall(protocol.header("EXIT"))
    code, log, _ = server.finish()
    wedged.close()
    healthy.close()
    assert code == 2 and "has not read our reply" in log and "sent EXIT" in log, log


@pytest.mark.slow
def test_a_reconnecting_server_does_not_hold_up_the_others():
    """One of two connections drops and its server comes back without greeting for
    several seconds; the other is answered meanwhile (before: every connection waited
    up to --timeout for that handshake)."""
    server = Server().start("--connections", "2", "--timeout", "20", "--reconnect-timeout", "20")
    leaving, staying = server.accept_all(2)
    leaving.close()
    time.sleep(0.5)  # the driver reconnects at once: the listener's backlog takes it
    staying.settimeout(5)
    for _ in range(3):
        assert np.isfinite(ask_forces(staying)[0][0])
    late = server.accept()  # greets only now
    assert np.isfinite(ask_forces(late)[0][0])
    for conn in (late, staying):
        conn.sendall(protocol.header("EXIT"))
    code, log, _ = server.finish()
    assert code == 0, log


@pytest.mark.slow
def test_the_log_has_one_line_per_address_and_a_summary():
    """Before: a "connected" and a "sent EXIT" line per connection, and no summary."""
    server = Server().start("--connections", "3", "--timeout", "10")
    conns = server.accept_all(3)
    for conn in conns:
        for _ in range(2):
            assert np.isfinite(ask_forces(conn)[0][0])
    for conn in conns:
        conn.sendall(protocol.header("EXIT"))
    code, log, _ = server.finish()
    assert code == 0, log
    lines = log.strip().splitlines()
    assert sum("connected to" in line for line in lines) == 1 and "(3 connections)" in log
    assert sum("sent EXIT" in line for line in lines) == 1 and "sent EXIT on 3 connections" in log
    summary = next(line for line in lines if line.startswith("aniserve drive: served "))
    words = summary.split()  # aniserve drive: served N structures in M steps over …
    served, steps = int(words[3]), int(words[6])
    assert served == 6 and 2 <= steps <= 6 and "ms of evaluation a step" in summary


@pytest.mark.slow
def test_ten_million_atoms_declared_are_refused_before_the_payload():
    """The atom count is checked against the structure as soon as it is read: nothing
    waits for (or buffers) 240 MB of positions that are never sent."""
    server = Server().start("--timeout", "20")
    conn = server.accept()
    conn.sendall(protocol.header("POSDATA") + np.eye(3).tobytes() * 2 + struct.pack("<i", 10_000_000))
    code, log, _ = server.finish()
    conn.close()
    assert code == 3 and "the server sent 10000000 atoms, the structure file has 9" in log, log
    # refused on the count: waiting for the payload would have ended as an incomplete message
    assert "incomplete message" not in log


def test_the_atom_count_is_checked_as_soon_as_it_is_read():
    header_only = protocol.header("POSDATA") + np.eye(3).tobytes() * 2 + struct.pack("<i", 10_000_000)
    with pytest.raises(protocol.AtomCountMismatch, match="sent 10000000 atoms, the structure file has 9"):
        protocol.decode(header_only, protocol.Mode(natoms=9))
    batched = protocol.header("POSDATA") + struct.pack("<i", 8)
    with pytest.raises(protocol.AtomCountMismatch):
        protocol.decode(batched, protocol.Mode(batch_size=2, natoms=9))
    assert protocol.decode(header_only, protocol.Mode()) is None  # no count known: wait for the rest


# ------------------------------------------------------------------ shared memory
class Segments:
    """i-PI's six segments for B structures of N atoms (float64, i-PI's layout)."""

    def __init__(self, batch_size, natoms=9):
        prefix = f"anitest_{uuid.uuid4().hex[:8]}_"
        shapes = protocol.shm_shapes(batch_size, natoms)
        self.shm = {
            kind: shared_memory.SharedMemory(create=True, name=prefix + kind, size=8 * int(np.prod(shapes[kind])))
            for kind in protocol.SHM_KINDS
        }
        self.views = {kind: np.ndarray(shapes[kind], dtype=np.float64, buffer=s.buf) for kind, s in self.shm.items()}

    def posdata(self, structures, first=False):
        for b, positions in enumerate(structures):
            self.views["pos"][b] = np.asarray(positions).ravel() / BOHR_IN_ANGSTROM
            self.views["h"][b] = np.eye(3) * 40
            self.views["ih"][b] = np.eye(3) / 40
        message = protocol.header("POSDATA") + struct.pack("<i", 9)
        if first:
            for kind in protocol.SHM_KINDS:
                name = self.shm[kind].name.encode()
                message += struct.pack("<i", len(name)) + name
        return message

    def close(self):
        for kind in list(self.views):
            del self.views[kind]
        for segment in self.shm.values():
            segment.close()
            try:
                segment.unlink()
            except FileNotFoundError:
                pass


def shm_step(conn, segments, structures, first=False):
    """One step; the extras strings of the FORCEREADY (its arrays are in the segments)."""
    conn.sendall(segments.posdata(structures, first) + protocol.header("GETFORCE"))
    buffer = b""
    while True:
        buffer += conn.recv(65536)
        if len(buffer) >= 12:
            assert buffer.startswith(protocol.header("FORCEREADY")), buffer[:12]
            offset, extras = 12, []
            while len(extras) < len(structures) and offset + 4 <= len(buffer):
                length = struct.unpack_from("<i", buffer, offset)[0]
                if offset + 4 + length > len(buffer):
                    break
                extras.append(buffer[offset + 4 : offset + 4 + length])
                offset += 4 + length
            if len(extras) == len(structures):
                return extras


@pytest.mark.slow
def test_shared_memory_shrunk_between_steps_is_exit_2_not_sigbus():
    segments = Segments(1)
    server = Server("shm").start("--timeout", "5")
    try:
        conn = server.accept()
        assert len(shm_step(conn, segments, [ETHANOL_POSITIONS], first=True)) == 1
        assert np.isfinite(segments.views["pot"][0]) and segments.views["pot"][0] < -150
        os.truncate(f"/dev/shm/{segments.shm['pos'].name.lstrip('/')}", 8)  # our own view of it is not touched again
        conn.sendall(protocol.header("POSDATA") + struct.pack("<i", 9) + protocol.header("GETFORCE"))
        code, log, _ = server.finish()
        conn.close()
    finally:
        segments.views.clear()
        segments.close()
    assert code == 2, (code, log)  # a signal would be negative
    assert "holds 8 bytes, too few" in log and "Traceback" not in log


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda path: os.chmod(path, 0o666), "is writable by other users"),
        (lambda path: os.chown(path, 65534, 65534), "belongs to user 65534"),
    ],
)
def test_shared_memory_that_others_could_plant_is_refused(damage, message):
    """A segment that another user owns or could write is never opened for writing forces."""
    if os.geteuid() != 0 and "chown" in message:
        pytest.skip("changing a file's owner needs root")
    segments = Segments(1)
    damage(f"/dev/shm/{segments.shm['force'].name.lstrip('/')}")
    server = Server("shm").start("--timeout", "5")
    try:
        conn = server.accept()
        conn.sendall(segments.posdata([ETHANOL_POSITIONS], first=True) + protocol.header("GETFORCE"))
        code, log, _ = server.finish()
        conn.close()
    finally:
        segments.views.clear()
        segments.close()
    assert code == 2 and message in log and "refused" in log, log


@pytest.mark.slow
def test_shared_memory_after_a_new_init_with_a_larger_batch():
    """A re-INIT from batch size 1 to 2 reads and answers two structures (before: one
    result where two were expected, no error)."""
    segments = Segments(2)
    server = Server("shm").start("--timeout", "5")
    try:
        conn = server.accept(batch_size=1)
        assert len(shm_step(conn, segments, [ETHANOL_POSITIONS], first=True)) == 1
        one = float(segments.views["pot"][0])
        conn.sendall(protocol.encode_init(0, "batch_size:2"))
        shifted = np.array(ETHANOL_POSITIONS) * 1.02
        segments.views["pot"][:] = 0.0
        assert len(shm_step(conn, segments, [ETHANOL_POSITIONS, shifted])) == 2
        energies = segments.views["pot"].copy()
        conn.sendall(protocol.header("EXIT"))
        code, log, _ = server.finish()
        conn.close()
    finally:
        segments.views.clear()
        segments.close()
    assert code == 0, log
    assert energies[0] == pytest.approx(one, abs=1e-9) and energies[1] < -150 and energies[1] != energies[0]
