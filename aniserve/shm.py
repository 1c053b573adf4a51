"""The shared-memory segments an i-PI server names (``mode='shm'``), read and written
through their file descriptors, never mapped.

A mapped segment that its owner shrinks (``ftruncate``) between two steps kills the
reader with SIGBUS on the next access; ``pread`` of a short file just returns fewer
bytes, which is reported.  Writes never extend a segment (the server sized it), and a
segment is opened only when it is a regular file owned by this user and by the server
at the other end of the socket, and not writable by others: nobody else can plant one
for the driver to write forces into.  Segments live in ``/dev/shm`` (POSIX shared
memory on Linux, where i-PI's shared-memory mode runs).
"""

from __future__ import annotations

import os
import pathlib
import socket
import stat
import struct

import numpy as np

SHM_DIR = pathlib.Path("/dev/shm")


class SegmentError(ValueError):
    """A shared-memory segment cannot be used: missing, foreign, or the wrong size."""


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a UNIX socket (None where the
    system cannot tell)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        _pid, uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
    except OSError:
        return None
    return uid


class Segment:
    """One named segment, open for reading and writing float64 arrays at offset 0."""

    def __init__(self, name: str, owner_uid: int | None):
        self.name = name
        path = SHM_DIR / name.lstrip("/")
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise SegmentError(f"shared-memory segment {name!r} does not exist") from None
        except OSError as error:
            raise SegmentError(f"cannot open shared-memory segment {name!r} ({error.strerror})") from None
        info = os.fstat(self.fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a shared-memory file"
        elif info.st_uid != os.geteuid() or (owner_uid is not None and info.st_uid != owner_uid):
            problem = f"belongs to user {info.st_uid}, not to this driver's and its server's"
        elif info.st_mode & 0o022:
            problem = f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
        if problem:
            os.close(self.fd)
            raise SegmentError(f"shared-memory segment {name!r} {problem}; refused")

    def read(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape)`` float64 values, as an array of ``shape``."""
        nbytes = 8 * int(np.prod(shape))
        data = os.pread(self.fd, nbytes, 0)
        if len(data) < nbytes:
            raise SegmentError(
                f"shared-memory segment {self.name!r} holds {len(data)} bytes, too few for {shape} float64"
            )
        return np.frombuffer(data, dtype="<f8").reshape(shape).copy()

    def write(self, values: np.ndarray) -> None:
        """``values`` (float64) at the segment's start; the segment must already hold them."""
        data = np.ascontiguousarray(values, dtype="<f8").tobytes()
        size = os.fstat(self.fd).st_size
        if size < len(data):
            raise SegmentError(
                f"shared-memory segment {self.name!r} holds {size} bytes, too few for {len(data)} bytes of results"
            )
        os.pwrite(self.fd, data, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
