"""IPIDriver: serve an ``Evaluator`` to i-PI or ASE servers over the i-PI socket protocol.

Transport only.  One process holds any number of connections; the loop reads whatever
has arrived, decodes it with ``aniserve.protocol``, and when structures are waiting it
hands all of them — across connections and batch slots — to the evaluator
(``aniserve.serving``) at once, which batches them.  Units change here and nowhere else
on this path, through ``aniserve.ipi_edge`` (shared with i-PI's in-process PES,
``aniserve.ipi_pes``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import selectors
import socket
import time

import numpy as np

from aniserve import exits, protocol
from aniserve.contracts import Servable
from aniserve.ipi_edge import EXTRAS_CHOICES, PBC_CHOICES, extras_json, results_to_ipi, structure_from_ipi
from aniserve.shm import Segment, SegmentError, peer_uid

log = logging.getLogger("aniserve.driver")

#: Exit codes of ``aniserve drive`` (the table of every command's is ``aniserve.exits``).
EXIT_OK, EXIT_PROTOCOL, EXIT_INPUT, EXIT_CONNECT = exits.OK, exits.PROTOCOL, exits.BAD_STRUCTURE, exits.NO_SERVER


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
    def unix(cls, name: str, shm: bool = False) -> Address:
        # i-PI and ASE both put UNIX sockets at /tmp/ipi_NAME; an absolute path is taken as is.
        path = name if name.startswith("/") else f"/tmp/ipi_{name}"
        return cls("shm" if shm else "unix", path)

    @classmethod
    def inet(cls, text: str) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--inet wants HOST:PORT, got {text!r}")
        return cls("inet", (host or "localhost", int(port)))

    def __str__(self) -> str:
        target = f"{self.target[0]}:{self.target[1]}" if self.kind == "inet" else self.target
        return f"{self.kind}:{target}"


class Connection:
    serials = iter(range(1 << 62))

    def __init__(self, address: Address, numbers: np.ndarray, sock: socket.socket):
        self.address, self.numbers, self.sock = address, numbers, sock
        self.serial = next(Connection.serials)
        self.mode = protocol.Mode(shm=address.kind == "shm", natoms=len(numbers))
        self.set_batch_size(1)
        self.buffer = bytearray()
        self.outgoing = bytearray()  # reply bytes the server has not taken yet
        self.send_since: float | None = None
        self.initialised = False
        # idle → pending (structures received) → computed (reply ready); "handshake" before
        # a reconnected server's first STATUS
        self.state = "idle"
        self.deadline = 0.0  # of the handshake, when it comes from a reconnection
        self.reconnection: _Reconnect | None = None  # the one this connection came from
        self.structures: protocol.PosData | None = None
        self.reply = b""
        self.shm_results: dict[str, np.ndarray] | None = None
        self.segments: dict[str, Segment] = {}
        self.partial_since: float | None = None
        self.last_heard = time.monotonic()
        self.exited = False
        self.events = 0  # what the driver's selector waits for on this socket

    def set_batch_size(self, batch_size: int) -> None:
        """Structures per POSDATA (INIT's batch_size); each has its own evaluator slot,
        keyed in ``keys`` (the slot keeps that structure's neighbour list)."""
        self.mode = dataclasses.replace(self.mode, batch_size=batch_size)
        self.keys = [(str(self.address), self.serial, b) for b in range(batch_size)]

    def send(self, data: bytes | memoryview) -> None:
        """Send without ever blocking: what the server does not take now waits in
        ``outgoing`` (the loop flushes it, and gives up after --timeout)."""
        if not self.outgoing:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except (BrokenPipeError, ConnectionResetError) as error:
                raise ServerGone(str(error)) from None
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self.send_since = time.monotonic()
        self.outgoing += data

    def flush(self) -> None:
        """Send what waits in ``outgoing``, as much as the server takes."""
        try:
            sent = self.sock.send(self.outgoing)
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError) as error:
            raise ServerGone(str(error)) from None
        del self.outgoing[:sent]
        if not self.outgoing:
            self.send_since = None

    def received(self) -> bytes | None:
        """Read what has arrived (b"" when the server closed the connection, None when
        nothing had after all)."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return None
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
        self.segments = {}


@dataclasses.dataclass
class _Reconnect:
    """A connection whose server went away, waiting (without blocking the others) for
    a server to come back at its address until ``deadline``."""

    address: Address
    numbers: np.ndarray
    deadline: float
    truncated: str | None  # the half message it left, if any
    next_try: float = 0.0


def _attempt(address: Address, timeout: float) -> socket.socket:
    """One connection attempt (OSError when nothing listens there)."""
    if isinstance(address.target, tuple):  # inet: (host, port)
        sock = socket.create_connection(address.target, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Nagle costs ~80 ms a step
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.target)
        except OSError:
            sock.close()
            raise
    sock.settimeout(None)
    return sock


def try_connect(address: Address) -> socket.socket | None:
    """One short connection attempt; None when nothing listens there yet."""
    try:
        return _attempt(address, timeout=1)
    except OSError:
        return None


def connect(address: Address, timeout: float) -> socket.socket:
    """Connect, retrying while the server is not up yet, for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            return _attempt(address, timeout=5)
        except OSError as error:
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"could not connect to {address} within {timeout:g} s ({error})", EXIT_CONNECT
                ) from None
            if not announced:
                stale = isinstance(error, ConnectionRefusedError) and address.kind != "inet"
                log.info(
                    "waiting for a server at %s …%s",
                    address,
                    f" ({address.target} exists but nothing listens on it: a server that was killed leaves "
                    f"its socket file, and the next one must remove it first: rm {address.target})"
                    if stale
                    else "",
                )
                announced = True
            time.sleep(0.2)


class IPIDriver:
    """Serve ``evaluator`` (an ``aniserve.contracts.Servable``, such as
    ``aniserve.serving.Evaluator``) to the servers at ``addresses``.

    numbers: atomic numbers of each connection's system (the protocol never sends
    them), one array per address.  pbc: 'auto' (periodic when the cell sent is
    non-singular), 'yes' or 'no'.  extras: what FORCEREADY's extras string carries:
    'std' (JSON with the ensemble's energy std), 'committee' (also per-member
    energies, forces and virials for i-PI's committee force field; the evaluator must
    have been made with members=True) or 'none' (an empty string, for clients that
    cannot take JSON, such as ASE ≤ 3.22).
    """

    def __init__(
        self,
        evaluator: Servable,
        addresses: list[Address],
        numbers: list[np.ndarray],
        *,
        connections: int = 1,
        pbc: str = "auto",
        extras: str = "std",
        connect_timeout: float = 60.0,
        message_timeout: float = 60.0,
        idle_timeout: float = 0.0,
        reconnect_timeout: float = 10.0,
        gather_s: float = 0.002,
    ):
        if pbc not in PBC_CHOICES:
            raise ValueError(f"pbc must be auto, yes or no, got {pbc!r}")
        if extras not in EXTRAS_CHOICES:
            raise ValueError(f"extras must be committee, std or none, got {extras!r}")
        if extras == "committee" and not evaluator.members:
            raise ValueError("extras='committee' needs an evaluator made with members=True")
        self.evaluator = evaluator
        self.targets = [(a, np.asarray(n)) for a, n in zip(addresses, numbers) for _ in range(connections)]
        self.pbc, self.extras = pbc, extras
        self.connect_timeout, self.message_timeout = connect_timeout, message_timeout
        self.idle_timeout, self.reconnect_timeout, self.gather_s = idle_timeout, reconnect_timeout, gather_s
        self.connections: list[Connection] = []
        self._selector: selectors.BaseSelector  # made by run()
        self.reconnecting: list[_Reconnect] = []
        self.status = EXIT_OK
        # For the summary at the end: evaluation calls, structures, their seconds; EXITs by address.
        self.stats = {"steps": 0, "structures": 0, "seconds": 0.0, "started": time.monotonic()}
        self.exits: collections.Counter = collections.Counter()
        for _, n in self.targets:
            evaluator.check_elements(n)  # unsupported element: fail before connecting

    # ------------------------------------------------------------ connections
    def _open(self, address: Address, numbers: np.ndarray, timeout: float) -> Connection:
        """Connect and finish the handshake (answer the first STATUS) before the next
        connection is opened: i-PI serves one pending client at a time.  A reset during
        the handshake (a server shutting down) counts as no server yet.  Used at start,
        before anything is served; reconnections go through the loop (``_reconnect``)."""
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
                        protocol.header("STATUS")
                    ):
                        raise DriverError(
                            f"{address}: expected STATUS first, got {bytes(conn.buffer[:12])!r}", EXIT_PROTOCOL
                        )
                break
            except TimeoutError:
                raise DriverError(f"{address}: no STATUS within {self.message_timeout:g} s", EXIT_PROTOCOL) from None
            except ConnectionError as error:
                conn.close()
                if time.monotonic() >= deadline:
                    raise DriverError(f"{address}: {error}", EXIT_CONNECT) from None
                time.sleep(0.2)
        conn.sock.setblocking(False)
        try:
            self._process(conn)
        except ServerGone:
            conn.close()
            raise DriverError(f"{address}: closed the connection during the handshake", EXIT_CONNECT) from None
        return conn

    def run(self) -> int:
        """Serve until every connection has ended; the exit status (``EXIT_*``): the
        first error, or EXIT_OK.  An error on one of several connections ends only that
        one.  The log has one line per address and a summary at the end."""
        self._selector = selectors.DefaultSelector()
        self.stats["started"] = time.monotonic()
        try:
            for address, numbers in self.targets:
                self._add(self._open(address, numbers, self.connect_timeout))
            for name, count in collections.Counter(str(a) for a, _ in self.targets).items():
                log.info("connected to %s%s", name, f" ({count} connections)" if count > 1 else "")
            self._loop()
            return self.status
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
            self._summarise()

    def _summarise(self) -> None:
        for address, count in self.exits.items():
            log.info("%s sent EXIT%s", address, f" on {count} connections" if count > 1 else "")
        steps, structures = self.stats["steps"], self.stats["structures"]
        if steps:
            log.info(
                "served %d structure%s in %d step%s over %.1f s: %.2f ms of evaluation a step",
                structures,
                "s" * (structures != 1),
                steps,
                "s" * (steps != 1),
                time.monotonic() - self.stats["started"],
                1000 * self.stats["seconds"] / steps,
            )

    def _add(self, conn: Connection) -> None:
        if conn.exited:  # EXIT came with the handshake
            conn.close()
            return
        self.connections.append(conn)
        conn.events = selectors.EVENT_READ
        self._selector.register(conn.sock, conn.events, conn)

    def _watch(self, conn: Connection) -> None:
        """Read from a connection, or, while a reply waits in ``outgoing``, only write to
        it: a server that does not read is not read from either (bounded memory)."""
        events = selectors.EVENT_WRITE if conn.outgoing else selectors.EVENT_READ
        if events != conn.events and conn in self.connections:
            conn.events = events
            self._selector.modify(conn.sock, events, conn)

    def _loop(self) -> None:
        first_pending = None
        while self.connections or self.reconnecting:
            self._reconnect()
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
            if self.reconnecting:
                timeout = min(timeout, 0.2)
            for key, events in self._selector.select(timeout):
                conn = key.data
                if conn not in self.connections:
                    continue  # dropped earlier in this round
                if events & selectors.EVENT_WRITE:
                    self._handle(conn, flush=True)
                    continue
                data = conn.received()
                if data is None:
                    continue
                if not data:
                    self._lost(conn)
                    continue
                conn.buffer += data
                self._handle(conn)
            self._check_timeouts()

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.state == "handshake" and now > conn.deadline:
                # connected, but no server greets: as if none had come back
                log.info("%s: no STATUS within %g s", conn.address, self.message_timeout)
                self._drop(conn, fatal=True)
                self._give_up(conn.reconnection)
            elif conn.outgoing and conn.send_since is not None and now - conn.send_since > self.message_timeout:
                self._fail(
                    conn,
                    DriverError(
                        f"{conn.address}: the server has not read our reply "
                        f"({len(conn.outgoing)} bytes waiting) for {self.message_timeout:g} s",
                        EXIT_PROTOCOL,
                    ),
                )
            elif conn.partial_since is not None and now - conn.partial_since > self.message_timeout:
                self._fail(
                    conn,
                    DriverError(
                        f"{conn.address}: incomplete message ({len(conn.buffer)} bytes, "
                        f"starting {bytes(conn.buffer[:12])!r}) for {self.message_timeout:g} s",
                        EXIT_PROTOCOL,
                    ),
                )
            elif self.idle_timeout and conn.state != "pending" and now - conn.last_heard > self.idle_timeout:
                self._fail(
                    conn,
                    DriverError(
                        f"{conn.address}: silent for {self.idle_timeout:g} s (--idle-timeout); giving up on it",
                        EXIT_PROTOCOL,
                    ),
                )

    def _handle(self, conn: Connection, flush: bool = False) -> None:
        """Send what waits and process a connection's messages; a server gone mid-reply
        is a lost connection, an error ends that connection."""
        try:
            if flush:
                conn.flush()
            self._process(conn)
        except ServerGone:
            conn.buffer.clear()  # whatever it sent last will not be answered
            self._lost(conn)
            return
        except DriverError as error:
            self._fail(conn, error)
            return
        if conn.exited:
            self._drop(conn)
        else:
            self._watch(conn)

    def _fail(self, conn: Connection, error: DriverError) -> None:
        """End one connection for an error; the driver serves the others and exits with
        the first error's status when they are done."""
        log.error("%s", error)
        self._drop(conn, fatal=True)
        if self.status == EXIT_OK:
            self.status = error.code

    def _drop(self, conn: Connection, fatal: bool = False) -> None:
        self._selector.unregister(conn.sock)
        conn.close(fatal=fatal)
        self.connections.remove(conn)
        self._forget(conn)

    def _lost(self, conn: Connection) -> None:
        """The server closed the connection: wait for a server to come back at the same
        address (i-PI restarted), or stop; the other connections are served meanwhile.
        A server killed while sending leaves half a message: it is named and dropped,
        and is an error only if no server comes back."""
        truncated = (
            (
                f"{conn.address} closed the connection in the middle of a message ({len(conn.buffer)} "
                f"bytes of {bytes(conn.buffer[:12]).strip()!r} received)"
            )
            if conn.buffer
            else None
        )
        if truncated:
            log.warning("%s; dropped", truncated)
        self._drop(conn)
        if conn.reconnection is not None and conn.state == "handshake":
            # A reset during a reconnection's handshake is still no server: the same deadline holds.
            self.reconnecting.append(conn.reconnection)
            return
        log.info(
            "%s closed the connection; waiting up to %g s for it to come back", conn.address, self.reconnect_timeout
        )
        self.reconnecting.append(
            _Reconnect(conn.address, conn.numbers, time.monotonic() + self.reconnect_timeout, truncated)
        )

    def _reconnect(self) -> None:
        """One connection attempt for each address whose server went away (due now); a
        connection made waits for its server's STATUS in the loop like any other."""
        now = time.monotonic()
        for waiting in list(self.reconnecting):
            if now < waiting.next_try:
                continue
            sock = try_connect(waiting.address)
            if sock is None:
                waiting.next_try = time.monotonic() + 0.2
                if waiting.next_try >= waiting.deadline:
                    self.reconnecting.remove(waiting)
                    self._give_up(waiting)
                continue
            self.reconnecting.remove(waiting)
            sock.setblocking(False)
            conn = Connection(waiting.address, waiting.numbers, sock)
            conn.state, conn.deadline = "handshake", max(waiting.deadline, time.monotonic() + self.message_timeout)
            conn.reconnection = waiting
            self._add(conn)

    def _give_up(self, waiting: _Reconnect | None) -> None:
        """No server came back: that connection is done; an error only if its last
        server left half a message."""
        if waiting is None:
            return
        if waiting.truncated:
            log.error("%s, and no server came back", waiting.truncated)
            if self.status == EXIT_OK:
                self.status = EXIT_PROTOCOL
        else:
            log.info("no server at %s; that connection is done", waiting.address)

    # --------------------------------------------------------------- messages
    def _process(self, conn: Connection) -> None:
        """Handle buffered messages until the buffer runs dry, we wait on results, or
        a reply waits to be sent (the next one is read only when the server takes it)."""
        while not conn.outgoing:
            if conn.state == "handshake":
                if len(conn.buffer) < protocol.HEADER_LENGTH:
                    return
                if not conn.buffer.startswith(protocol.header("STATUS")):
                    raise DriverError(
                        f"{conn.address}: expected STATUS first, got {bytes(conn.buffer[:12])!r}", EXIT_PROTOCOL
                    )
                conn.state = "idle"
                log.info("connected to %s (a server came back)", conn.address)
            try:
                decoded = protocol.decode(conn.buffer, conn.mode) if conn.buffer else None
            except protocol.AtomCountMismatch as error:
                raise DriverError(f"{conn.address}: {error}", EXIT_INPUT) from None
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
                    raise DriverError(
                        f"{conn.address}: POSDATA before the previous forces were collected", EXIT_PROTOCOL
                    )
                if isinstance(message, protocol.ShmPosData):
                    message = self._read_shm(conn, message)
                conn.structures, conn.state = message, "pending"
            elif isinstance(message, protocol.GetForce):
                if conn.state != "computed":
                    raise DriverError(f"{conn.address}: GETFORCE without positions", EXIT_PROTOCOL)
                if conn.shm_results is not None:
                    try:
                        for kind, values in conn.shm_results.items():
                            conn.segments[kind].write(values)
                    except SegmentError as error:
                        raise DriverError(f"{conn.address}: {error}", EXIT_PROTOCOL) from None
                conn.send(conn.reply)
                conn.state, conn.reply, conn.shm_results = "idle", b"", None
            elif isinstance(message, protocol.Exit):
                self.exits[str(conn.address)] += 1
                conn.exited = True
                return

    def _read_shm(self, conn: Connection, message: protocol.ShmPosData) -> protocol.PosData:
        """The structures from the segments the server named, sized for this step's
        batch (a re-INIT with another batch size reads that many) and checked against
        each segment's size as it is now."""
        if message.segment_names is not None:
            owner = peer_uid(conn.sock)
            try:
                for kind, name in message.segment_names.items():
                    conn.segments[kind] = Segment(name, owner)
            except SegmentError as error:
                raise DriverError(f"{conn.address}: {error}", EXIT_PROTOCOL) from None
            conn.mode = dataclasses.replace(conn.mode, shm_attached=True)
        if not conn.segments:
            raise DriverError(f"{conn.address}: shared-memory POSDATA before the segments were named", EXIT_PROTOCOL)
        shapes = protocol.shm_shapes(conn.mode.batch_size, message.natoms)
        try:
            arrays = {kind: conn.segments[kind].read(shapes[kind]) for kind in ("pos", "h")}
        except SegmentError as error:
            raise DriverError(f"{conn.address}: {error}", EXIT_PROTOCOL) from None
        return protocol.shm_posdata(arrays, message.natoms)

    # ---------------------------------------------------------------- compute
    def _forget(self, conn: Connection) -> None:
        for key in conn.keys:
            self.evaluator.forget(key)

    def _compute(self, pending: list[Connection]) -> None:
        """Evaluate every waiting structure in one call to the evaluator."""
        slots = []
        try:
            for conn in pending:
                assert conn.structures is not None  # pending: its POSDATA has arrived
                for key, h, r in zip(conn.keys, conn.structures.cells, conn.structures.positions):
                    slots.append((key, structure_from_ipi(conn.numbers, h, r, self.pbc)))
            started = time.perf_counter()
            results = self.evaluator.evaluate(slots)
            self.stats["seconds"] += time.perf_counter() - started
            self.stats["steps"] += 1
            self.stats["structures"] += len(slots)
        except ValueError as error:
            raise DriverError(
                f"cannot evaluate the structure sent by {pending[0].address}: {error}", EXIT_INPUT
            ) from None
        start = 0
        for conn in pending:
            assert conn.structures is not None
            done = results[start : start + len(conn.structures.positions)]
            start += len(done)
            energies, forces, virials = results_to_ipi(done)
            conn.reply = protocol.encode_forceready(
                energies, forces, virials, [extras_json(r, self.extras) for r in done], conn.mode
            )
            conn.shm_results = protocol.shm_forceready(energies, forces, virials) if conn.mode.shm else None
            conn.state, conn.structures = "computed", None
