"""Seeded fuzzing of ``aniserve drive``: a fake i-PI server plays random, mostly hostile
message sequences to one driver process per sequence, and each outcome is recorded.

Run as a script for a longer campaign:
    python tests/fuzz_driver.py --sequences 20000 --seed 7 --json fuzz.json
``tests/test_fuzz.py`` runs 1,000 sequences.

One harness process loads the model once and forks a driver per sequence (the fork sees
``load_model`` return the loaded model), so a sequence costs milliseconds instead of a
Python start-up.  The harness never evaluates anything itself before forking, so the
children's thread pools start fresh.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback

HEADER = {n: n.ljust(12).encode() for n in ("STATUS", "INIT", "POSDATA", "GETFORCE", "EXIT", "FORCEREADY", "READY")}
BOHR = 1 / 0.52917721067
ETHANOL = [
    [-0.9233, 0.0609, 0.0534],
    [0.5089, -0.4270, -0.0510],
    [1.3841, 0.6509, 0.1935],
    [-1.6032, -0.7930, -0.0236],
    [-1.1404, 0.6054, 0.9761],
    [-1.1287, 0.7369, -0.7813],
    [0.7264, -0.8873, -1.0212],
    [0.6614, -1.1906, 0.7186],
    [2.2747, 0.3176, 0.0937],
]
#: Driver options: short timeouts keep every sequence bounded.
TIMEOUT, IDLE, RECONNECT = 0.3, 0.4, 0.1
#: Exit statuses ``aniserve drive`` can meet here (README, "Exit status"; aniserve.exits).
DOCUMENTED = {0, 2, 3, 4}


def _f64(values) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def _cell(rng: random.Random) -> list[float]:
    """An i-PI h (lattice vectors as columns), flattened row-major, in Bohr."""
    kind = rng.choice(
        ["zero", "box", "box", "singular", "needle", "flat", "tiny", "inf", "nan", "huge", "skew", "negative"]
    )
    a = 20 * BOHR
    cells = {
        "zero": [0.0] * 9,
        "box": [a, 0, 0, 0, a, 0, 0, 0, a],
        "singular": [a, a, 0, 0, 0, 0, 0, 0, a],
        "needle": [a * 10, 0, 0, 0, 0.01, 0, 0, 0, 0.01],
        "flat": [a, 0, 0, 0, a, 0, 0, 0, 1e-6],
        "tiny": [0.05, 0, 0, 0, 0.05, 0, 0, 0, 0.05],
        "inf": [float("inf"), 0, 0, 0, a, 0, 0, 0, a],
        "nan": [float("nan")] * 9,
        "huge": [1e12, 0, 0, 0, 1e12, 0, 0, 0, 1e12],
        "skew": [a, 0.99 * a, 0, 0, 0.01, 0, 0, 0, a],
        "negative": [-a, 0, 0, 0, a, 0, 0, 0, a],
    }
    return cells[kind]


def _positions(rng: random.Random, natoms: int) -> list[float]:
    kind = rng.choice(["ethanol", "ethanol", "ethanol", "nan", "inf", "coincident", "far", "random", "integers"])
    base = [c * BOHR for atom in ETHANOL for c in atom]
    base = (base * (natoms // 9 + 1))[: 3 * natoms]
    if not base:
        return base
    if kind == "nan":
        base[rng.randrange(len(base))] = float("nan")
    elif kind == "inf":
        base[rng.randrange(len(base))] = float("-inf")
    elif kind == "coincident" and natoms > 1:
        base[3:6] = base[0:3]
    elif kind == "far":
        base = [x + 1e8 for x in base]
    elif kind == "random":
        base = [rng.uniform(-1e3, 1e3) for _ in base]
    elif kind == "integers":
        base = [float(int(x)) for x in base]
    return base


def _posdata(rng: random.Random, batch: int) -> bytes:
    natoms = rng.choice([9] * 8 + [3, 0, -1, 1 << 30])
    real = max(0, min(natoms, 64))
    if batch == 1:
        return (
            HEADER["POSDATA"]
            + _f64(_cell(rng))
            + _f64([0.0] * 9)
            + struct.pack("<i", natoms)
            + _f64(_positions(rng, real))
        )
    cells = b"".join(_f64(_cell(rng)) + _f64([0.0] * 9) for _ in range(batch))
    return (
        HEADER["POSDATA"]
        + struct.pack("<i", natoms)
        + cells
        + b"".join(_f64(_positions(rng, real)) for _ in range(batch))
    )


def _init(rng: random.Random) -> bytes:
    kind = rng.choice(["plain", "plain", "batch", "badbatch", "utf8", "hugelen", "neglen", "bigbatch"])
    text = {
        "plain": b"",
        "batch": b"batch_size:2",
        "badbatch": b"batch_size:x",
        "utf8": b"\xff\xfe\x00bad",
        "bigbatch": b"batch_size:100000",
        "hugelen": b"",
        "neglen": b"",
    }[kind]
    length = {"hugelen": 0x7FFFFFFF, "neglen": -5}.get(kind, len(text))
    return HEADER["INIT"] + struct.pack("<ii", rng.randrange(-3, 4), length) + text


def _shm_posdata(rng: random.Random) -> bytes:
    names = [
        rng.choice(
            [b"..", b"../../etc/passwd", b"\xff\xfe", b"nosuchsegment_aniserve", b"a/b", b"x" * 300, b"", b"\x00"]
        )
        for _ in range(6)
    ]
    return HEADER["POSDATA"] + struct.pack("<i", 9) + b"".join(struct.pack("<i", len(n)) + n for n in names)


def sequence(rng: random.Random, shm: bool) -> list[tuple]:
    """A list of steps: ('send', bytes), ('pause', s), ('read',) and an ending:
    ('close',), ('quiet',) or ('half-close',)."""
    steps = []
    batch = 1
    if rng.random() < 0.9:
        steps.append(("send", HEADER["STATUS"]))
    for _ in range(rng.randrange(1, 7)):
        choice = rng.choices(
            [
                "status",
                "init",
                "posdata",
                "getforce",
                "exit",
                "random",
                "flood",
                "header",
                "truncate",
                "pause",
                "valid-step",
            ],
            weights=[3, 3, 5, 3, 1, 1, 1, 1, 2, 1, 4],
        )[0]
        if choice == "status":
            steps.append(("send", HEADER["STATUS"]))
        elif choice == "init":
            message = _init(rng)
            if b"batch_size:2" in message:
                batch = 2
            steps.append(("send", message))
        elif choice == "posdata":
            steps.append(("send", _shm_posdata(rng) if shm and rng.random() < 0.7 else _posdata(rng, batch)))
        elif choice == "getforce":
            steps.append(("send", HEADER["GETFORCE"]))
        elif choice == "exit":
            steps.append(("send", HEADER["EXIT"]))
        elif choice == "random":
            steps.append(("send", rng.randbytes(rng.randrange(1, 64))))
        elif choice == "flood":
            steps.append(("send", HEADER["STATUS"] * 1000))
        elif choice == "header":
            steps.append(("send", rng.choice([HEADER["FORCEREADY"], HEADER["READY"], b"status      ", b"POSDATA"])))
        elif choice == "truncate":
            message = _posdata(rng, batch)
            steps.append(("send", message[: rng.randrange(1, len(message))]))
        elif choice == "pause":
            steps.append(("pause", rng.choice([0.01, 0.1])))
        else:  # a well-formed step, as i-PI would send it
            steps += normal_sequence()[:8]
        if rng.random() < 0.3:
            steps.append(("read",))
    steps.append(rng.choices([("close",), ("quiet",), ("half-close",)], weights=[6, 2, 1])[0])
    return steps


def shm_segment_sequence(rng: random.Random) -> list[tuple]:
    """Steps against real shared-memory segments (sized for two structures of 9 atoms)
    that the server damages between steps: shrunk, made writable by others, unlinked,
    or left alone; INIT may change the batch size.  ('shm-posdata',) sends a POSDATA
    naming them the first time; ('shm-damage', how) damages one."""
    init = [HEADER["INIT"] + struct.pack("<ii", 0, 0), HEADER["INIT"] + struct.pack("<ii", 0, 12) + b"batch_size:2"]
    steps = [("send", HEADER["STATUS"]), ("send", rng.choice(init)), ("send", HEADER["STATUS"])]
    for _ in range(rng.randrange(1, 5)):
        steps += [("shm-posdata",), ("send", HEADER["GETFORCE"]), ("read",)]
        what = rng.choice(["shrink", "shrink", "chmod", "unlink", "none", "none", "reinit"])
        steps.append(("send", rng.choice(init)) if what == "reinit" else ("shm-damage", what))
    steps.append(rng.choice([("send", HEADER["EXIT"]), ("pause", 0.01)]))
    steps.append(("close",))
    return steps


def backpressure_sequence(rng: random.Random) -> list[tuple]:
    """A server that never reads: ('noread',) stops the harness draining our replies."""
    steps = [("noread",), ("send", HEADER["STATUS"])]
    if rng.random() < 0.5:
        steps += [("send", HEADER["INIT"] + struct.pack("<ii", 0, 0)), ("send", HEADER["STATUS"])]
    steps += [("send", HEADER["STATUS"] * 4096)] * rng.randrange(1, 40)
    steps.append(rng.choice([("quiet",), ("close",)]))
    return steps


def normal_sequence() -> list[tuple]:
    valid = [
        ("send", HEADER["STATUS"]),
        ("send", HEADER["INIT"] + struct.pack("<ii", 0, 0)),
        ("send", HEADER["STATUS"]),
        (
            "send",
            HEADER["POSDATA"]
            + _f64([0.0] * 18)
            + struct.pack("<i", 9)
            + _f64([c * BOHR for atom in ETHANOL for c in atom]),
        ),
        ("read",),
        ("send", HEADER["STATUS"]),
        ("send", HEADER["GETFORCE"]),
        ("read",),
    ]
    return valid * 3 + [("send", HEADER["EXIT"]), ("close",)]


class Harness:
    def __init__(self, model: str, folder: str):
        import ase.io  # noqa: F401  (imported once here, not in every child)
        import torch

        import aniserve.cli  # noqa: F401
        import aniserve.driver  # noqa: F401
        import aniserve.models
        from aniserve import kernels

        torch.set_num_threads(1)
        kernels.library()  # compiled (or loaded) once
        self.potential = aniserve.models.load_model(model, dtype="float32")
        aniserve.models.load_model = lambda *args, **kwargs: self.potential
        self.folder = folder
        self.structure = os.path.join(folder, "ethanol.xyz")
        with open(self.structure, "w") as f:
            f.write("9\n\n" + "".join(f"{e} {x} {y} {z}\n" for e, (x, y, z) in zip("CCOHHHHHH", ETHANOL)))

    def run(self, steps: list[tuple], shm: bool, case: int) -> dict:
        segments = _Segments(case) if any(step[0] == "shm-posdata" for step in steps) else None
        try:
            return self._run(steps, shm, case, segments)
        finally:
            if segments is not None:
                segments.remove()

    def _run(self, steps: list[tuple], shm: bool, case: int, segments) -> dict:
        path = os.path.join(self.folder, f"s{case}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(5)
        read_end, write_end = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the driver
            listener.close()
            os.close(read_end)
            os.dup2(write_end, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            code = 70
            try:
                from aniserve import cli

                cli.main.main(
                    args=[
                        "drive",
                        "--structure",
                        self.structure,
                        "--shm" if shm else "--unix",
                        path,
                        "--timeout",
                        str(TIMEOUT),
                        "--idle-timeout",
                        str(IDLE),
                        "--reconnect-timeout",
                        str(RECONNECT),
                        "--connect-timeout",
                        "3",
                    ],
                    prog_name="aniserve",
                    standalone_mode=True,
                )
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        stderr = io.BytesIO()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            conn = None
        listener.close()
        os.unlink(path)  # a reconnect finds no server
        ending = "close"
        reads = ("noread",) not in steps
        if conn is not None:
            conn.setblocking(False)
            for step in steps:
                if step[0] == "send":
                    if not _send(conn, step[1], reads):
                        break
                elif step[0] == "shm-posdata":
                    if not _send(conn, segments.posdata(), reads):
                        break
                elif step[0] == "shm-damage":
                    segments.damage(step[1], random.Random(case))
                elif step[0] == "pause":
                    time.sleep(step[1])
                elif step[0] == "read":
                    if reads:
                        _drain(conn, 0.05)
                elif step[0] != "noread":
                    ending = step[0]
            if reads:
                _drain(conn, 0.0)
            if ending == "half-close":
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            elif ending == "close":
                conn.close()
        deadline = time.monotonic() + TIMEOUT + IDLE + RECONNECT + 10
        status = usage = None
        while time.monotonic() < deadline:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if reads and conn is not None and conn.fileno() >= 0:
                _drain(conn, 0.0)
            _read_pipe(read_end, stderr)
            time.sleep(0.002)
        hung = status is None or usage is None
        if hung:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
        _read_pipe(read_end, stderr, until_eof=True)
        os.close(read_end)
        if conn is not None and conn.fileno() >= 0:
            conn.close()
        text = stderr.getvalue().decode(errors="replace")
        return {
            "case": case,
            "exit": os.waitstatus_to_exitcode(status),
            "hung": hung,
            "seconds": round(time.monotonic() - start, 3),
            "maxrss_mb": usage.ru_maxrss / 1024,
            "traceback": "Traceback" in text,
            "stderr": text[-400:],
        }


def _send(conn: socket.socket, data: bytes, reads: bool = True) -> bool:
    """Send (reading replies meanwhile unless ``reads`` is False); False when the
    driver stopped taking bytes for 2 s or went away."""
    view, deadline = memoryview(data), time.monotonic() + 2
    while view and time.monotonic() < deadline:
        try:
            sent = conn.send(view)
            view = view[sent:]
        except BlockingIOError:
            if reads:
                _drain(conn, 0.01)
            else:
                time.sleep(0.01)
        except OSError:
            return False
    return not view


class _Segments:
    """Six shared-memory segments laid out as i-PI's for 2 structures of ethanol."""

    KINDS = ("pos", "h", "ih", "pot", "force", "vir")

    def __init__(self, case: int):
        from multiprocessing import shared_memory

        sizes = {"pos": 2 * 27, "h": 18, "ih": 18, "pot": 2, "force": 2 * 27, "vir": 18}
        prefix = f"anifuzz_{os.getpid()}_{case}_"
        self.shm = {k: shared_memory.SharedMemory(create=True, name=prefix + k, size=8 * sizes[k]) for k in self.KINDS}
        positions = [c * BOHR for atom in ETHANOL for c in atom]
        self.shm["pos"].buf[: 8 * 54] = _f64(positions * 2)
        self.shm["h"].buf[: 8 * 18] = _f64([40.0, 0, 0, 0, 40.0, 0, 0, 0, 40.0] * 2)
        self.named = False

    def posdata(self) -> bytes:
        message = HEADER["POSDATA"] + struct.pack("<i", 9)
        if not self.named:
            self.named = True
            for k in self.KINDS:
                name = self.shm[k].name.encode()
                message += struct.pack("<i", len(name)) + name
        return message

    def damage(self, how: str, rng: random.Random) -> None:
        kind = rng.choice(self.KINDS)
        path = f"/dev/shm/{self.shm[kind].name.lstrip('/')}"
        try:
            if how == "shrink":
                os.truncate(path, rng.choice([0, 8, 100]))
            elif how == "chmod":
                os.chmod(path, 0o666)
            elif how == "unlink":
                self.shm[kind].unlink()
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        for segment in self.shm.values():
            segment.close()
            try:
                segment.unlink()
            except FileNotFoundError:
                pass


def _drain(conn: socket.socket, wait: float) -> None:
    try:
        readable, _, _ = select.select([conn], [], [], wait)
        while readable and conn.recv(1 << 20):
            readable, _, _ = select.select([conn], [], [], 0)
    except OSError:
        pass


def _read_pipe(fd: int, into: io.BytesIO, until_eof: bool = False) -> None:
    while True:
        readable, _, _ = select.select([fd], [], [], 1.0 if until_eof else 0)
        if not readable:
            return
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        into.write(chunk)


#: Kinds of sequence: random hostile messages, hostile shared-memory names, real
#: segments damaged between steps, and a server that never reads.
FAMILIES = ("messages", "shm-names", "shm-segments", "backpressure")


def _family_summary(outcomes: list[dict], baseline: dict) -> dict:
    return {
        "tries": len(outcomes),
        "tracebacks": sum(o["traceback"] for o in outcomes),
        "signals": sum(o["exit"] < 0 for o in outcomes),
        "hung": sum(o["hung"] for o in outcomes),
        "undocumented": sum(o["exit"] not in DOCUMENTED for o in outcomes),
        "exit_counts": dict(collections.Counter(o["exit"] for o in outcomes)),
        "max_extra_rss_mb": round(
            max((o["maxrss_mb"] for o in outcomes), default=baseline["maxrss_mb"]) - baseline["maxrss_mb"], 1
        ),
    }


def campaign(sequences: int, seed: int, model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="aniserve-fuzz-") as folder:
        harness = Harness(model, folder)
        baseline = harness.run(normal_sequence(), shm=False, case=-1)
        outcomes = []
        for case in range(sequences):
            rng = random.Random(seed * 1_000_003 + case)
            family = rng.choices(FAMILIES, weights=[70, 10, 12, 8])[0]
            shm = family in ("shm-names", "shm-segments")
            steps = {
                "messages": lambda: sequence(rng, False),
                "shm-names": lambda: sequence(rng, True),
                "shm-segments": lambda: shm_segment_sequence(rng),
                "backpressure": lambda: backpressure_sequence(rng),
            }[family]()
            outcome = harness.run(steps, shm, case)
            outcome["shm"], outcome["family"] = shm, family
            outcomes.append(outcome)
    return {
        "seed": seed,
        "sequences": sequences,
        "baseline": baseline,
        "outcomes": outcomes,
        "families": {f: _family_summary([o for o in outcomes if o["family"] == f], baseline) for f in FAMILIES},
        "exit_counts": dict(collections.Counter(o["exit"] for o in outcomes)),
        "tracebacks": sum(o["traceback"] for o in outcomes),
        "hung": sum(o["hung"] for o in outcomes),
        "undocumented": sum(o["exit"] not in DOCUMENTED for o in outcomes),
        "max_extra_rss_mb": max(o["maxrss_mb"] for o in outcomes) - baseline["maxrss_mb"],
        "max_seconds": max(o["seconds"] for o in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--json", default=None, help="write every outcome here")
    args = parser.parse_args()
    from aniserve.embedded import DEFAULT_MODEL

    report = campaign(args.sequences, args.seed, args.model or DEFAULT_MODEL)
    summary = {k: v for k, v in report.items() if k != "outcomes"}
    summary["baseline"] = {k: report["baseline"][k] for k in ("exit", "seconds", "maxrss_mb")}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
