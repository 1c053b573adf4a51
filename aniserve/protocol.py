"""The i-PI socket protocol, client side, as pure functions over bytes.

No sockets here: ``decode`` takes the bytes received so far and returns one message and
how many bytes it used, or ``None`` if the buffer does not yet hold a whole message;
``encode_*`` build replies.  Layouts follow i-PI 3.3 (``ipi/interfaces/sockets.py``):
12-byte space-padded upper-case headers, native little-endian int32 and float64, Bohr and
Hartree.  Three variants of POSDATA/FORCEREADY exist, chosen per connection:

- single:   POSDATA  h(9) h⁻¹(9) natoms positions(3N);
            FORCEREADY energy natoms forces(3N) virial(9) len extras
- batched (``batch_size:B`` in the INIT string):
            POSDATA  natoms B×(h(9) h⁻¹(9)) B×positions(3N);
            FORCEREADY B×energy natoms B×forces(3N) B×virial(9) B×(len extras)
- shm:      POSDATA  natoms [first time: 6 × (len name)]; arrays live in shared memory;
            FORCEREADY B×(len extras)

Sizes read from the wire are untrusted: every one is bounded before anything is
allocated from it.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

HEADER_LENGTH = 12
#: Bounds on sizes read from the wire, so a corrupt or hostile peer cannot make us
#: allocate gigabytes: 10M atoms is 240 MB of positions.
MAX_ATOMS = 10_000_000
MAX_BATCH = 65_536
MAX_STRING = 1 << 20
SHM_KINDS = ("pos", "h", "ih", "pot", "force", "vir")

_HEADERS = {
    name: name.ljust(HEADER_LENGTH).encode()
    for name in ("STATUS", "INIT", "POSDATA", "GETFORCE", "FORCEREADY", "READY", "NEEDINIT", "HAVEDATA", "EXIT")
}
_NAMES = {v: k for k, v in _HEADERS.items()}


class ProtocolError(ValueError):
    """The peer sent something that is not valid i-PI protocol."""


class AtomCountMismatch(ProtocolError):
    """A POSDATA announced another atom count than the connection's system has: raised
    as soon as the count is read, before its payload is waited for or buffered."""

    def __init__(self, sent: int, expected: int):
        super().__init__(f"the server sent {sent} atoms, the structure file has {expected}")
        self.sent, self.expected = sent, expected


@dataclasses.dataclass(frozen=True)
class Mode:
    """What this connection speaks: batch size (1 = unbatched) and shared memory; and,
    when known, the atom count every POSDATA must carry."""

    batch_size: int = 1
    shm: bool = False
    shm_attached: bool = False
    natoms: int | None = None


@dataclasses.dataclass(frozen=True)
class Status:
    pass


@dataclasses.dataclass(frozen=True)
class GetForce:
    pass


@dataclasses.dataclass(frozen=True)
class Exit:
    pass


@dataclasses.dataclass
class Init:
    bead: int
    parameters: str
    batch_size: int


@dataclasses.dataclass
class PosData:
    """Structures in Bohr: cells (B, 3, 3) with lattice vectors as columns (i-PI's h),
    positions (B, N, 3)."""

    cells: np.ndarray
    positions: np.ndarray


@dataclasses.dataclass
class ShmPosData:
    natoms: int
    segment_names: dict[str, str] | None  # only on the first POSDATA of a connection


# The messages without a body, one shared instance each (they carry nothing to mutate).
_BARE = {_HEADERS["STATUS"]: Status(), _HEADERS["GETFORCE"]: GetForce(), _HEADERS["EXIT"]: Exit()}


def header(name: str) -> bytes:
    return _HEADERS[name]


def encode_status(state: str) -> bytes:
    if state not in ("READY", "NEEDINIT", "HAVEDATA"):
        raise ValueError(f"not a status reply: {state}")
    return _HEADERS[state]


def parse_batch_size(parameters: str) -> int:
    """The ``batch_size:B`` token i-PI appends to the INIT string (1 when absent)."""
    batch = 1
    for token in parameters.replace(",", " ").split():
        key, sep, value = token.partition(":")
        if sep and key.strip() == "batch_size":
            try:
                batch = int(value)
            except ValueError:
                raise ProtocolError(f"INIT: batch_size {value!r} is not an integer") from None
    if not 1 <= batch <= MAX_BATCH:
        raise ProtocolError(f"INIT: batch_size {batch} outside 1..{MAX_BATCH}")
    return batch


class _Reader:
    """Reads fixed-size fields from a buffer in place; a field that runs past the end
    of the buffer raises ``_Incomplete`` (``decode`` then answers None: need more
    bytes).  Each array is copied out once, so the buffer may be trimmed afterwards."""

    def __init__(self, buffer, start: int):
        self.buffer, self.offset = buffer, start

    def skip(self, nbytes: int) -> int:
        """Step over ``nbytes``; returns where they start."""
        start = self.offset
        if start + nbytes > len(self.buffer):
            raise _Incomplete
        self.offset = start + nbytes
        return start

    def take(self, nbytes: int) -> bytes:
        start = self.skip(nbytes)
        return bytes(self.buffer[start : start + nbytes])

    def int32(self) -> int:
        return _INT32.unpack_from(self.buffer, self.skip(4))[0]

    def float64s(self, count: int) -> np.ndarray:
        return np.frombuffer(self.buffer, dtype="<f8", count=count, offset=self.skip(8 * count)).copy()


_INT32 = struct.Struct("<i")


class _Incomplete(Exception):
    pass


def _bounded(value: int, low: int, high: int, what: str) -> int:
    if not low <= value <= high:
        raise ProtocolError(f"{what} {value} outside {low}..{high}")
    return value


def _text(raw, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8 text: {bytes(raw[:40])!r}") from None


def is_plain_name(name: str) -> bool:
    """A POSIX shared-memory name: an optional leading '/', then letters, digits, '_',
    '-' and '.' only, and not '.' or '..' (no path may be smuggled in)."""
    bare = name[1:] if name.startswith("/") else name
    return bool(bare) and bare not in (".", "..") and all(c.isascii() and (c.isalnum() or c in "_-.") for c in bare)


def _segment_name(raw) -> str:
    name = _text(raw, "shared-memory segment name")
    if not is_plain_name(name):
        raise ProtocolError(f"shared-memory segment name {name!r} is not a plain name (letters, digits, '_', '-', '.')")
    return name


def decode(buffer, mode: Mode):
    """One message from the start of ``buffer``: ``(message, bytes used)`` or ``None``."""
    if len(buffer) < HEADER_LENGTH:
        return None
    raw = bytes(buffer[:HEADER_LENGTH])
    bare = _BARE.get(raw)
    if bare is not None:  # STATUS, GETFORCE, EXIT: the header is the whole message
        return bare, HEADER_LENGTH
    name = _NAMES.get(raw)
    if name is None:
        raise ProtocolError(f"unknown message header {raw!r}")
    reader = _Reader(buffer, HEADER_LENGTH)
    try:
        if name == "POSDATA":
            message = _decode_posdata(reader, mode)
        elif name == "INIT":
            bead = reader.int32()
            length = _bounded(reader.int32(), 0, MAX_STRING, "INIT string length")
            parameters = _text(reader.take(length), "INIT string").rstrip("\x00")
            message = Init(bead, parameters, parse_batch_size(parameters))
        else:
            raise ProtocolError(f"a driver never receives {name}")
    except _Incomplete:
        return None
    return message, reader.offset


def _atom_count(reader: _Reader, mode: Mode, high: int) -> int:
    natoms = _bounded(reader.int32(), 1, high, "POSDATA atom count")
    if mode.natoms is not None and natoms != mode.natoms:
        raise AtomCountMismatch(natoms, mode.natoms)
    return natoms


def _decode_posdata(reader: _Reader, mode: Mode):
    b = mode.batch_size
    if mode.shm:
        natoms = _atom_count(reader, mode, MAX_ATOMS)
        names = None
        if not mode.shm_attached:
            names = {}
            for kind in SHM_KINDS:
                length = _bounded(reader.int32(), 1, 255, "shared-memory segment name length")
                names[kind] = _segment_name(reader.take(length))
        return ShmPosData(natoms, names)
    if b == 1:
        cell = reader.float64s(9).reshape(1, 3, 3)
        reader.float64s(9)  # inverse cell: legacy, recomputed where needed
        natoms = _atom_count(reader, mode, MAX_ATOMS)
        positions = reader.float64s(3 * natoms).reshape(1, natoms, 3)
        return PosData(cell, positions)
    natoms = _atom_count(reader, mode, MAX_ATOMS // b)
    cells = reader.float64s(18 * b).reshape(b, 2, 3, 3)[:, 0]
    positions = reader.float64s(3 * natoms * b).reshape(b, natoms, 3)
    return PosData(cells, positions)


def shm_shapes(batch_size: int, natoms: int) -> dict[str, tuple[int, ...]]:
    """The float64 array each shared-memory segment holds, by kind (i-PI's layout:
    positions and forces flat per structure, cells and virials 3×3, i-PI's h with the
    lattice vectors as columns, Bohr and Hartree)."""
    b, n = batch_size, natoms
    return {"pos": (b, 3 * n), "h": (b, 3, 3), "ih": (b, 3, 3), "pot": (b,), "force": (b, 3 * n), "vir": (b, 3, 3)}


def shm_posdata(arrays: dict[str, np.ndarray], natoms: int) -> PosData:
    """The structures a shared-memory POSDATA announced, from the ``pos`` and ``h``
    segments' arrays (``shm_shapes``)."""
    b = arrays["h"].shape[0]
    return PosData(arrays["h"], arrays["pos"].reshape(b, natoms, 3))


def shm_forceready(energies, forces, virials) -> dict[str, np.ndarray]:
    """What goes to the segments, each from its start, before the FORCEREADY message
    (which then carries only the extras): energies (B,), forces (B, N, 3)
    Hartree/Bohr, virials (B, 3, 3), in i-PI's layout."""
    b = len(energies)
    return {
        "pot": np.asarray(energies, dtype="<f8"),
        "force": np.asarray(forces, dtype="<f8").reshape(b, -1),
        "vir": np.asarray(virials, dtype="<f8").reshape(b, 3, 3),
    }


def encode_forceready(energies, forces, virials, extras: list[str], mode: Mode) -> bytes:
    """FORCEREADY for B structures: energies (B,) Hartree, forces (B, N, 3) Hartree/Bohr,
    virials (B, 3, 3) Hartree, one extras string each.  In shm mode the arrays go to
    shared memory (the caller writes them) and only the extras travel here.  (The
    unbatched layout is the batched one with B = 1.)"""
    energies = np.asarray(energies, dtype="<f8").reshape(-1)
    b = len(energies)
    tail = b"".join(_INT32.pack(len(e)) + e for e in (text.encode() for text in extras))
    if mode.shm:
        return _HEADERS["FORCEREADY"] + tail
    forces = np.asarray(forces, dtype="<f8").reshape(b, -1, 3)
    virials = np.asarray(virials, dtype="<f8").reshape(b, 3, 3)
    return b"".join(
        (
            _HEADERS["FORCEREADY"],
            energies.tobytes(),
            _INT32.pack(forces.shape[1]),
            forces.tobytes(),
            virials.tobytes(),
            tail,
        )
    )


# ----------------------------------------------------------------- server side
# The server's half, used by tests and by `aniserve bench` to talk to a driver
# without i-PI.


def encode_init(bead: int, parameters: str) -> bytes:
    data = parameters.encode()
    return _HEADERS["INIT"] + struct.pack("<ii", bead, len(data)) + data


def encode_posdata(cells, positions, batch_size: int = 1) -> bytes:
    cells = np.asarray(cells, dtype="<f8").reshape(-1, 3, 3)
    positions = np.asarray(positions, dtype="<f8").reshape(len(cells), -1, 3)
    natoms = struct.pack("<i", positions.shape[1])
    inverse = np.linalg.pinv(cells)
    if batch_size == 1:
        return _HEADERS["POSDATA"] + cells[0].tobytes() + inverse[0].tobytes() + natoms + positions[0].tobytes()
    blocks = b"".join(c.tobytes() + i.tobytes() for c, i in zip(cells, inverse))
    return _HEADERS["POSDATA"] + natoms + blocks + positions.tobytes()


def decode_forceready(buffer, batch_size: int = 1):
    """(energies (B,), forces (B, N, 3), virials (B, 3, 3), extras) or None if incomplete."""
    length = forceready_length(buffer, batch_size)  # checks the header and every size
    if length is None:
        return None
    reader = _Reader(buffer, HEADER_LENGTH)
    energies = reader.float64s(batch_size)
    natoms = reader.int32()
    forces = reader.float64s(3 * natoms * batch_size).reshape(batch_size, natoms, 3)
    virials = reader.float64s(9 * batch_size).reshape(batch_size, 3, 3)
    extras = [reader.take(reader.int32()).decode() for _ in range(batch_size)]
    return (energies, forces, virials, extras), length


def forceready_length(buffer, batch_size: int = 1) -> int | None:
    """How many bytes the FORCEREADY at the start of ``buffer`` takes, or None if it is
    incomplete; every size in it is bounded.  Enough for a server that only counts
    replies (``aniserve bench serve``)."""
    if len(buffer) < HEADER_LENGTH:
        return None
    if bytes(buffer[:HEADER_LENGTH]) != _HEADERS["FORCEREADY"]:
        raise ProtocolError(f"expected FORCEREADY, got {bytes(buffer[:HEADER_LENGTH])!r}")
    reader = _Reader(buffer, HEADER_LENGTH)
    try:
        reader.skip(8 * batch_size)
        natoms = _bounded(reader.int32(), 1, MAX_ATOMS, "FORCEREADY atom count")
        reader.skip(8 * (3 * natoms + 9) * batch_size)
        for _ in range(batch_size):
            reader.skip(_bounded(reader.int32(), 0, MAX_STRING, "extras length"))
    except _Incomplete:
        return None
    return reader.offset
