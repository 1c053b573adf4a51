"""IPIDriver: serve an ``Evaluator`` to i-PI or ASE servers over the i-PI socket protocol.

Transport only.  One process holds any number of connections; the loop reads whatever
has arrived, decodes it with ``aniserve.protocol``, and when structures are waiting it
hands all of them — across connections and batch slots — to the evaluator
(``aniserve.serving``) at once, which batches them.  Units change here and nowhere else
on this path: Bohr → Å and i-PI's cell columns → rows on the way in, Hartree/Å →
Hartree/Bohr on the way out (energies and virials are Hartree on both sides).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import selectors
import socket
import time

import numpy as np

from aniserve import protocol
from aniserve.serving import Structure
from aniserve.units import BOHR_IN_ANGSTROM

log = logging.getLogger("aniserve.driver")

#: Exit codes of ``aniserve drive``.
EXIT_OK, EXIT_PROTOCOL, EXIT_INPUT, EXIT_CONNECT = 0, 2, 3, 4


#: Bytes asked of each recv.  Python allocates the full size before every read, and a
#: megabyte cost ~18 µs a call against ~3 µs for 64 KiB (measured); larger messages
#: simply take several reads.
RECV_BYTES = 1 << 16


class DriverError(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class ServerGone(ConnectionError):
    """The server went away while we were replying (i-PI or ASE killed): the
    connection is lost, not a protocol error."""


@dataclasses.dataclass(frozen=True)
class Address:
    kind: str  # 'unix', 'inet' or 'shm' (a UNIX socket plus shared memory)
    target: str | tuple[str, int]

    @classmethod
    def unix(cls, name: str, shm: bool = False) -> "Address":
        # i-PI and ASE both put UNIX sockets at /tmp/ipi_NAME; an absolute path is taken as is.
        path = name if name.startswith("/") else f"/tmp/ipi_{name}"
        return cls("shm" if shm else "unix", path)

    @classmethod
    def inet(cls, text: str) -> "Address":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--inet wants HOST:PORT, got {text!r}")
        return cls("inet", (host or "localhost", int(port)))

    def __str__(self) -> str:
        return f"{self.kind}:{self.target if self.kind != 'inet' else '%s:%d' % self.target}"


class Connection:
    serials = iter(range(1 << 62))

    def __init__(self, address: Address, numbers: np.ndarray, sock: socket.socket):
        self.address, self.numbers, self.sock = address, numbers, sock
        self.serial = next(Connection.serials)
        self.mode = protocol.Mode(shm=address.kind == "shm")
        self.set_batch_size(1)
        self.buffer = bytearray()
        self.initialised = False
        self.state = "idle"  # idle → pending (structures received) → computed (reply ready)
        self.structures: protocol.PosData | None = None
        self.reply = b""
        self.shm_results = None
        self.segments = {}
        self.views = {}
        self.partial_since = None
        self.last_heard = time.monotonic()
        self.exited = False

    def set_batch_size(self, batch_size: int) -> None:
        """Structures per POSDATA (INIT's batch_size); each has its own evaluator slot,
        keyed in ``keys`` (the slot keeps that structure's neighbour list)."""
        self.mode = dataclasses.replace(self.mode, batch_size=batch_size)
        self.keys = [(str(self.address), self.serial, b) for b in range(batch_size)]

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise ServerGone(str(error)) from None

    def received(self) -> bytes:
        """Read what has arrived (b"" when the server closed the connection)."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except ConnectionError:
            return b""
        if data:
            self.last_heard = time.monotonic()
        if data and self.address.kind == "inet" and hasattr(socket, "TCP_QUICKACK"):
            # Linux re-enables delayed ACKs after each receive; ASE writes POSDATA in
            # several small pieces, and a delayed ACK held them ~40 ms a step (measured).
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    def close(self, fatal: bool = False) -> None:
        """Close; after a fatal error read what is pending and half-close first, so
        i-PI sees a clean end of stream and reassigns the bead instead of hanging."""
        try:
            if fatal:
                self.sock.setblocking(False)
                try:
                    while self.sock.recv(65536):
                        pass
                except (BlockingIOError, OSError):
                    pass
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
        for segment in self.segments.values():
            segment.close()
        self.segments, self.views = {}, {}


def connect(address: Address, timeout: float) -> socket.socket:
    """Connect, retrying while the server is not up yet, for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            if address.kind == "inet":
                sock = socket.create_connection(address.target, timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Nagle costs ~80 ms a step
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(5)
                sock.connect(address.target)
            sock.settimeout(None)
            return sock
        except (ConnectionRefusedError, FileNotFoundError, socket.timeout, OSError) as error:
            if time.monotonic() >= deadline:
                raise DriverError(f"could not connect to {address} within {timeout:g} s ({error})",
                                  EXIT_CONNECT) from None
            if not announced:
                stale = isinstance(error, ConnectionRefusedError) and address.kind != "inet"
                log.info("waiting for a server at %s …%s", address,
                         f" ({address.target} exists but nothing listens on it: a server that was killed leaves "
                         f"its socket file, and the next one must remove it first: rm {address.target})"
                         if stale else "")
                announced = True
            time.sleep(0.2)


class IPIDriver:
    """Serve ``evaluator`` (an ``aniserve.serving.Evaluator``) to the servers at ``addresses``.

    numbers: atomic numbers of each connection's system (the protocol never sends
    them), one array per address.  pbc: 'auto' (periodic when the cell sent is
    non-singular), 'yes' or 'no'.  extras: what FORCEREADY's extras string carries:
    'std' (JSON with the ensemble's energy std), 'committee' (also per-member
    energies, forces and virials for i-PI's committee force field; the evaluator must
    have been made with members=True) or 'none' (an empty string, for clients that
    cannot take JSON, such as ASE ≤ 3.22).
    """

    def __init__(self, evaluator, addresses: list[Address], numbers: list[np.ndarray], *, connections: int = 1,
                 pbc: str = "auto", extras: str = "std", connect_timeout: float = 60.0,
                 message_timeout: float = 60.0, idle_timeout: float = 0.0, reconnect_timeout: float = 10.0,
                 gather_s: float = 0.002):
        if pbc not in ("auto", "yes", "no"):
            raise ValueError(f"pbc must be auto, yes or no, got {pbc!r}")
        if extras not in ("committee", "std", "none"):
            raise ValueError(f"extras must be committee, std or none, got {extras!r}")
        if extras == "committee" and not evaluator.members:
            raise ValueError("extras='committee' needs an evaluator made with members=True")
        self.evaluator = evaluator
        self.targets = [(a, np.asarray(n)) for a, n in zip(addresses, numbers) for _ in range(connections)]
        self.pbc, self.extras = pbc, extras
        self.connect_timeout, self.message_timeout = connect_timeout, message_timeout
        self.idle_timeout, self.reconnect_timeout, self.gather_s = idle_timeout, reconnect_timeout, gather_s
        self.connections: list[Connection] = []
        self._selector: selectors.BaseSelector | None = None
        for _, n in self.targets:
            evaluator.check_elements(n)  # unsupported element: fail before connecting

    # ------------------------------------------------------------ connections
    def _open(self, address: Address, numbers: np.ndarray, timeout: float) -> Connection:
        """Connect and finish the handshake (answer the first STATUS) before the next
        connection is opened: i-PI serves one pending client at a time.  A reset during
        the handshake (a server shutting down) counts as no server yet."""
        deadline = time.monotonic() + timeout
        while True:
            conn = Connection(address, numbers, connect(address, max(deadline - time.monotonic(), 0)))
            conn.sock.settimeout(self.message_timeout)
            try:
                while not conn.buffer.startswith(protocol.header("STATUS")):
                    data = conn.sock.recv(65536)
                    if not data:
                        raise ConnectionResetError("closed during the handshake")
                    conn.buffer += data
                    if len(conn.buffer) >= protocol.HEADER_LENGTH and not conn.buffer.startswith(
                            protocol.header("STATUS")):
                        raise DriverError(f"{address}: expected STATUS first, got {bytes(conn.buffer[:12])!r}",
                                          EXIT_PROTOCOL)
                break
            except socket.timeout:
                raise DriverError(f"{address}: no STATUS within {self.message_timeout:g} s", EXIT_PROTOCOL) from None
            except ConnectionError as error:
                conn.close()
                if time.monotonic() >= deadline:
                    raise DriverError(f"{address}: {error}", EXIT_CONNECT) from None
                time.sleep(0.2)
        conn.sock.settimeout(None)
        try:
            self._process(conn)
        except ServerGone:
            conn.close()
            raise DriverError(f"{address}: closed the connection during the handshake", EXIT_CONNECT) from None
        log.info("connected to %s", address)
        return conn

    def run(self) -> int:
        self._selector = selectors.DefaultSelector()
        try:
            for address, numbers in self.targets:
                self._add(self._open(address, numbers, self.connect_timeout))
            self._loop()
            return EXIT_OK
        except DriverError as error:
            log.error("%s", error)
            for conn in self.connections:
                conn.close(fatal=True)
            return error.code
        finally:
            for conn in self.connections:
                if conn.sock.fileno() >= 0:
                    conn.close()
            self._selector.close()

    def _add(self, conn: Connection) -> None:
        if conn.exited:  # EXIT came with the handshake
            conn.close()
        else:
            self.connections.append(conn)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _loop(self) -> None:
        first_pending = None
        while self.connections:
            pending = [c for c in self.connections if c.state == "pending"]
            if pending:
                first_pending = first_pending or time.monotonic()
                waited = time.monotonic() - first_pending
                if len(pending) == len(self.connections) or waited >= self.gather_s:
                    self._compute(pending)
                    first_pending = None
                    for conn in pending:
                        self._handle(conn)
                    continue
                timeout = self.gather_s - waited
            else:
                timeout = min(1.0, self.idle_timeout or 1.0, self.message_timeout)
            for key, _ in self._selector.select(timeout):
                conn = key.data
                data = conn.received()
                if not data:
                    self._lost(conn)
                    continue
                conn.buffer += data
                self._handle(conn)
            now = time.monotonic()
            for conn in self.connections:
                if conn.partial_since is not None and now - conn.partial_since > self.message_timeout:
                    raise DriverError(f"{conn.address}: incomplete message ({len(conn.buffer)} bytes, starting "
                                      f"{bytes(conn.buffer[:12])!r}) for {self.message_timeout:g} s", EXIT_PROTOCOL)
                if (self.idle_timeout and conn.state != "pending"
                        and now - conn.last_heard > self.idle_timeout):
                    raise DriverError(f"{conn.address}: silent for {self.idle_timeout:g} s (--idle-timeout); "
                                      f"giving up on it", EXIT_PROTOCOL)

    def _handle(self, conn: Connection) -> None:
        """Process a connection's messages; a server gone mid-reply is a lost connection."""
        try:
            self._process(conn)
        except ServerGone:
            conn.buffer.clear()  # whatever it sent last will not be answered
            self._lost(conn)
            return
        if conn.exited:
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        self._selector.unregister(conn.sock)
        conn.close()
        self.connections.remove(conn)
        self._forget(conn)

    def _lost(self, conn: Connection) -> None:
        """The server closed the connection: wait for a server to come back at the same
        address (i-PI restarted), or stop.  A server killed while sending leaves half a
        message: it is named and dropped, and is an error only if no server comes back."""
        truncated = (f"{conn.address} closed the connection in the middle of a message ({len(conn.buffer)} "
                     f"bytes of {bytes(conn.buffer[:12]).strip()!r} received)") if conn.buffer else None
        if truncated:
            log.warning("%s; dropped", truncated)
        self._drop(conn)
        log.info("%s closed the connection; waiting up to %g s for it to come back", conn.address,
                 self.reconnect_timeout)
        try:
            self._add(self._open(conn.address, conn.numbers, self.reconnect_timeout))
        except DriverError as error:
            if truncated:
                raise DriverError(f"{truncated}, and no server came back ({error})", EXIT_PROTOCOL) from None
            log.info("no server at %s; that connection is done", conn.address)

    # --------------------------------------------------------------- messages
    def _process(self, conn: Connection) -> None:
        """Handle buffered messages until the buffer runs dry or we wait on results."""
        while True:
            try:
                decoded = protocol.decode(conn.buffer, conn.mode) if conn.buffer else None
            except protocol.ProtocolError as error:
                raise DriverError(f"{conn.address}: {error}", EXIT_PROTOCOL) from None
            if decoded is None:
                conn.partial_since = (conn.partial_since or time.monotonic()) if conn.buffer else None
                return
            message, used = decoded
            if isinstance(message, (protocol.Status, protocol.GetForce)) and conn.state == "pending":
                return  # answered once the structures are computed
            del conn.buffer[:used]
            conn.partial_since = None
            if isinstance(message, protocol.Status):
                state = {"computed": "HAVEDATA"}.get(conn.state, "READY" if conn.initialised else "NEEDINIT")
                conn.send(protocol.encode_status(state))
            elif isinstance(message, protocol.Init):
                if conn.state != "idle":
                    raise DriverError(f"{conn.address}: INIT while a step is under way", EXIT_PROTOCOL)
                self._forget(conn)  # a new INIT starts afresh: no neighbour list outlives it
                conn.set_batch_size(message.batch_size)
                conn.initialised = True
            elif isinstance(message, (protocol.PosData, protocol.ShmPosData)):
                if not conn.initialised:
                    raise DriverError(f"{conn.address}: POSDATA before INIT", EXIT_PROTOCOL)
                if conn.state != "idle":
                    raise DriverError(f"{conn.address}: POSDATA before the previous forces were collected",
                                      EXIT_PROTOCOL)
                if isinstance(message, protocol.ShmPosData):
                    message = self._read_shm(conn, message)
                if len(message.positions[0]) != len(conn.numbers):
                    raise DriverError(f"{conn.address}: the server sent {len(message.positions[0])} atoms, "
                                      f"the structure file has {len(conn.numbers)}", EXIT_INPUT)
                conn.structures, conn.state = message, "pending"
            elif isinstance(message, protocol.GetForce):
                if conn.state != "computed":
                    raise DriverError(f"{conn.address}: GETFORCE without positions", EXIT_PROTOCOL)
                if conn.mode.shm:
                    protocol.shm_write_forceready(conn.views, *conn.shm_results)
                conn.send(conn.reply)
                conn.state, conn.reply = "idle", b""
            elif isinstance(message, protocol.Exit):
                log.info("%s sent EXIT", conn.address)
                conn.exited = True
                return

    def _read_shm(self, conn: Connection, message: protocol.ShmPosData) -> protocol.PosData:
        from multiprocessing import resource_tracker, shared_memory

        if message.segment_names is not None:
            shapes = protocol.shm_shapes(conn.mode.batch_size, message.natoms)
            for kind, name in message.segment_names.items():
                try:
                    segment = shared_memory.SharedMemory(name=name)
                except FileNotFoundError:
                    raise DriverError(f"{conn.address}: shared-memory segment {name!r} does not exist",
                                      EXIT_PROTOCOL) from None
                except (OSError, ValueError) as error:  # no permission, an empty segment, …
                    raise DriverError(f"{conn.address}: cannot open shared-memory segment {name!r} ({error})",
                                      EXIT_PROTOCOL) from None
                # i-PI owns the segments: stop our resource tracker from unlinking them.
                resource_tracker.unregister(segment._name, "shared_memory")
                if segment.size < 8 * int(np.prod(shapes[kind])):
                    raise DriverError(f"{conn.address}: segment {name!r} holds {segment.size} bytes, too few "
                                      f"for {shapes[kind]} float64", EXIT_PROTOCOL)
                conn.segments[kind] = segment
                conn.views[kind] = np.ndarray(shapes[kind], dtype=np.float64, buffer=segment.buf)
            conn.mode = dataclasses.replace(conn.mode, shm_attached=True)
        if not conn.views:
            raise DriverError(f"{conn.address}: shared-memory POSDATA before the segments were named", EXIT_PROTOCOL)
        if conn.views["pos"].shape[1] != 3 * message.natoms:
            raise DriverError(f"{conn.address}: shared-memory POSDATA of {message.natoms} atoms, the segments "
                              f"hold {conn.views['pos'].shape[1] // 3}", EXIT_PROTOCOL)
        return protocol.shm_read_posdata(conn.views, message.natoms)

    # ---------------------------------------------------------------- compute
    def _periodic(self, cell_h: np.ndarray) -> bool:
        # Plain floats: for one 3 × 3 cell per structure, numpy's calls cost ~40 µs each
        # (a 64-connection batch noticed them).
        flat = cell_h.ravel().tolist()
        if not all(map(math.isfinite, flat)):  # whatever --pbc says: never read as "no cell"
            raise ValueError("the cell contains NaN or infinite values")
        if self.pbc != "auto":
            return self.pbc == "yes"
        a0, a1, a2, b0, b1, b2, c0, c1, c2 = flat
        return abs(a0 * (b1 * c2 - b2 * c1) - a1 * (b0 * c2 - b2 * c0) + a2 * (b0 * c1 - b1 * c0)) > 1e-6

    def _forget(self, conn: Connection) -> None:
        for key in conn.keys:
            self.evaluator.forget(key)

    def _compute(self, pending: list[Connection]) -> None:
        """Evaluate every waiting structure in one call to the evaluator."""
        slots = []
        try:
            for conn in pending:
                positions = conn.structures.positions * BOHR_IN_ANGSTROM
                for key, h, r in zip(conn.keys, conn.structures.cells, positions):
                    cell = h.T * BOHR_IN_ANGSTROM if self._periodic(h) else None  # i-PI's h: vectors as columns
                    slots.append((key, Structure(conn.numbers, r, cell)))
            results = self.evaluator.evaluate(slots)
        except ValueError as error:
            raise DriverError(f"cannot evaluate the structure sent by {pending[0].address}: {error}",
                              EXIT_INPUT) from None
        start = 0
        for conn in pending:
            done = results[start:start + len(conn.structures.positions)]
            start += len(done)
            energies = np.array([r.energy for r in done])
            forces = np.array([r.forces for r in done]) * BOHR_IN_ANGSTROM
            virials = np.array([r.virial for r in done])
            conn.reply = protocol.encode_forceready(energies, forces, virials, [self._extras(r) for r in done],
                                                    conn.mode)
            conn.shm_results = (energies, forces, virials) if conn.mode.shm else None
            conn.state, conn.structures = "computed", None

    def _extras(self, result) -> str:
        if self.extras == "none":
            return ""
        extra = {"energy_std": result.energy_std}
        if self.extras == "committee":
            k = len(result.member_energies)
            extra["committee_pot"] = result.member_energies.tolist()
            extra["committee_force"] = (result.member_forces * BOHR_IN_ANGSTROM).reshape(k, -1).tolist()
            extra["committee_virial"] = (result.member_virials.reshape(k, 9).tolist()
                                         if result.member_virials is not None else [[0.0] * 9] * k)
        return json.dumps(extra)
