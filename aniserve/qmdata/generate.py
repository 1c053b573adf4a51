"""Resumable, multi-worker generation of ANI-format HDF5 reference data.

Work is a fixed list of jobs (molecule, conformation index), each computing one
sampled geometry at the low level and, for every ``high_every``-th conformation, at the
high level too.  Workers share a work folder:

- ``claims/JOB`` is created exclusively (O_EXCL) by the worker that takes a job; a
  claim whose process is gone (same host) is taken over, so a killed run resumes;
- ``records/JOB.json`` is written to a temporary name and renamed when the job is
  done, so a record is either whole or absent, whatever kills the worker;
- the HDF5 output is rebuilt from the records (and from what an earlier output file
  already held) into a temporary file and renamed, under a file lock.

Nothing is computed twice and the output is never half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from collections import defaultdict

import numpy as np

from aniserve.qmdata import sampling
from aniserve.qmdata.levels import Level, compute


@dataclasses.dataclass(frozen=True)
class Job:
    molecule: sampling.MoleculeSpec
    index: int
    levels: tuple[Level, ...]

    @property
    def id(self) -> str:
        return f"{self.molecule.name}~{self.index}"


def plan(specs, conformations: int, low: Level, high: Level | None, high_every: int) -> list[Job]:
    """Jobs in round-robin order over molecules, so a partial run covers all of them."""
    jobs = []
    for index in range(conformations):
        with_high = high is not None and index % high_every == 0
        for spec in specs:
            jobs.append(Job(spec, index, (low, high) if with_high else (low,)))
    return jobs


class WorkFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        (self.path / "claims").mkdir(parents=True, exist_ok=True)
        (self.path / "records").mkdir(parents=True, exist_ok=True)

    def record_path(self, job_id: str) -> pathlib.Path:
        return self.path / "records" / f"{job_id}.json"

    def done_ids(self) -> set[str]:
        return {p.stem for p in (self.path / "records").glob("*.json")}

    def claim(self, job_id: str) -> bool:
        path = self.path / "claims" / job_id
        me = f"{socket.gethostname()} {os.getpid()}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not self._stale(path):
                return False
            # Take over a dead worker's claim: rename is atomic, so only one taker wins.
            try:
                os.replace(path, f"{path}.{os.getpid()}.stale")
                os.unlink(f"{path}.{os.getpid()}.stale")
            except FileNotFoundError:
                return False
            return self.claim(job_id)
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True

    @staticmethod
    def _stale(path: pathlib.Path) -> bool:
        try:
            host, pid = path.read_text().split()
        except (FileNotFoundError, ValueError):
            return False  # being written right now
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / "claims" / job_id)

    def write_record(self, job_id: str, record: dict) -> None:
        final = self.record_path(job_id)
        tmp = final.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)

    @contextlib.contextmanager
    def lock(self):
        with open(self.path / "build.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


def run_job(job: Job, equilibrium: sampling.Equilibrium) -> dict:
    positions, temperature = sampling.sample_conformation(equilibrium, job.index)
    record = {
        "id": job.id, "molecule": job.molecule.name, "source": job.molecule.source,
        "index": job.index, "temperature_k": temperature,
        "numbers": equilibrium.numbers.tolist(), "positions": positions.tolist(), "levels": {},
    }
    for level in job.levels:
        result = compute(level, equilibrium.numbers, positions)
        record["levels"][level.key] = {
            "energy": result["energy"],
            "forces": None if result["forces"] is None else result["forces"].tolist(),
            "wall_s": result["wall_s"], "attributes": level.attributes(),
        }
    return record


def work(jobs: list[Job], folder: WorkFolder, out: pathlib.Path, build_every: int = 25,
         log=sys.stderr) -> int:
    """Compute every job not yet done or claimed; return how many this worker did."""
    done = folder.done_ids() | existing_ids(out)
    todo = [j for j in jobs if j.id not in done]
    equilibria: dict[str, sampling.Equilibrium] = {}
    mine, started = 0, time.perf_counter()
    for job in todo:
        if folder.record_path(job.id).exists() or not folder.claim(job.id):
            continue
        try:
            if job.molecule.name not in equilibria:
                equilibria[job.molecule.name] = sampling.optimise(job.molecule)
            record = run_job(job, equilibria[job.molecule.name])
            folder.write_record(job.id, record)
        finally:
            folder.release(job.id)
        mine += 1
        remaining = len(jobs) - len(folder.done_ids() | existing_ids(out))
        rate = (time.perf_counter() - started) / mine
        walls = ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in record["levels"].items())
        print(f"[{len(jobs) - remaining}/{len(jobs)}] {job.id}: {walls}; "
              f"ETA {_hms(remaining * rate)} at this worker's rate", file=log, flush=True)
        if mine % build_every == 0:
            build(folder, out)
    build(folder, out)
    return mine


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def existing_ids(out: pathlib.Path) -> set[str]:
    if not out.exists():
        return set()
    import h5py

    with h5py.File(out, "r") as f:
        return {i.decode() for g in f.values() for i in g["record_id"][()]}


def _records_from_h5(out: pathlib.Path) -> list[dict]:
    """Turn an earlier output file back into records, so rebuilding keeps them."""
    import h5py

    records = []
    with h5py.File(out, "r") as f:
        levels = json.loads(f.attrs["levels"])
        for group in f.values():
            for c, rid in enumerate(group["record_id"][()]):
                rec = {
                    "id": rid.decode(), "molecule": group["molecule"][c].decode(),
                    "source": group["source"][c].decode(), "index": int(group["index"][c]),
                    "temperature_k": float(group["temperature_k"][c]),
                    "numbers": group["atomic_numbers"][()].tolist(),
                    "positions": group["coordinates"][c].tolist(), "levels": {},
                }
                for key, attrs in levels.items():
                    energy = float(group[f"{key}.energy"][c])
                    if np.isnan(energy):
                        continue
                    forces = group[f"{key}.forces"][c].tolist() if f"{key}.forces" in group else None
                    rec["levels"][key] = {"energy": energy, "forces": forces,
                                          "wall_s": float(group[f"{key}.wall_s"][c]), "attributes": attrs}
                records.append(rec)
    return records


def formula(numbers) -> str:
    """Hill formula: C, then H, then the rest alphabetically."""
    from collections import Counter

    symbols = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F", 16: "S", 17: "Cl"}
    counts = Counter(symbols[int(z)] for z in numbers)
    order = ["C", "H"] + sorted(s for s in counts if s not in ("C", "H"))
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order if s in counts)


def build(folder: WorkFolder, out: pathlib.Path) -> None:
    """Write every finished record into the ANI-format HDF5 ``out``, atomically."""
    import h5py

    with folder.lock():
        records = {}
        if out.exists():
            records.update((r["id"], r) for r in _records_from_h5(out))
        for path in sorted((folder.path / "records").glob("*.json")):
            rec = json.loads(path.read_text())
            records[rec["id"]] = rec
        if not records:
            return
        levels = {}
        for rec in records.values():
            for key, value in rec["levels"].items():
                levels.setdefault(key, value["attributes"])
        groups = defaultdict(list)
        for rec in sorted(records.values(), key=lambda r: (r["molecule"], r["index"])):
            groups[formula(rec["numbers"])].append(rec)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["levels"] = json.dumps(levels)
            f.attrs["units"] = "coordinates Å, energies Hartree, forces Hartree/Å, wall times s"
            f.attrs["sampling"] = ("normal-mode sampling around MMFF94 minima (RDKit), "
                                   "T uniform in [50, 600] K; index 0 is the MMFF minimum")
            for name, recs in sorted(groups.items()):
                g = f.create_group(name)
                g["atomic_numbers"] = np.array(recs[0]["numbers"], dtype=np.int64)
                g["coordinates"] = np.array([r["positions"] for r in recs])
                for field in ("record_id", "molecule", "source"):
                    g[field] = np.array([r[{"record_id": "id"}.get(field, field)] for r in recs], dtype="S")
                g["index"] = np.array([r["index"] for r in recs])
                g["temperature_k"] = np.array([r["temperature_k"] for r in recs])
                n = len(recs[0]["numbers"])
                for key, attrs in levels.items():
                    got = [r["levels"].get(key) for r in recs]
                    g[f"{key}.energy"] = np.array([v["energy"] if v else np.nan for v in got])
                    g[f"{key}.wall_s"] = np.array([v["wall_s"] if v else np.nan for v in got])
                    if attrs["method"] != "ccsd(t)":
                        g[f"{key}.forces"] = np.array(
                            [v["forces"] if v else np.full((n, 3), np.nan) for v in got])
        os.replace(tmp, out)
