"""The journal of finished calculations and the ANI-format HDF5 file built from it.

A record is one structure with the levels computed for it::

    {"id", "molecule", "source", "index", "temperature_k", "numbers", "positions",
     "levels": {level key: {"energy", "forces" (or None), "wall_s", "attributes"}}}

The journal is a folder, ``records/ID.json``, each written to a temporary name and
renamed, so a record is whole or absent whatever kills the process.  Only the process
that schedules the work writes it (workers return records over the network), so workers
need no shared file system.  The HDF5 output is rebuilt from the journal and from what an
earlier output already held, into a temporary file that replaces the output.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from collections import Counter, defaultdict

import numpy as np

from aniserve.hdf5 import HDF5Error, atomic_numbers, check_group, conformer_groups


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        (self.path / "records").mkdir(parents=True, exist_ok=True)

    def record_path(self, record_id: str) -> pathlib.Path:
        return self.path / "records" / f"{record_id}.json"

    def records(self) -> dict[str, dict]:
        out = {}
        for path in sorted((self.path / "records").glob("*.json")):
            rec = json.loads(path.read_text())
            out[rec["id"]] = rec
        return out

    def write(self, record: dict) -> None:
        """Write a record; one already there under that id keeps its other levels."""
        final = self.record_path(record["id"])
        if final.exists():
            old = json.loads(final.read_text())
            _merge_levels(old["levels"], record["levels"])
            record = old
        tmp = final.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def write_failures(self, failures: dict[str, str]) -> pathlib.Path:
        path = self.path / "failures.json"
        path.write_text(json.dumps(failures, indent=1))
        return path

    @contextlib.contextmanager
    def exclusive(self, what: str):
        """Held by the one process that schedules work into this journal."""
        with open(self.path / "submit.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(
                    f"another process is already writing {what} (lock {self.path / 'submit.lock'}); "
                    f"wait for it, or stop it and run again"
                ) from None
            yield


def merge(records: dict[str, dict], record: dict) -> None:
    """Add ``record``; a record with the same id keeps its levels and gains the new ones
    (a level computed again with forces replaces the one without)."""
    old = records.get(record["id"])
    if old is None:
        records[record["id"]] = record
    else:
        _merge_levels(old["levels"], record["levels"])


def _merge_levels(old: dict, new: dict) -> None:
    for key, value in new.items():
        if key in old and old[key].get("forces") is not None and value.get("forces") is None:
            continue  # never lose forces to an energy-only copy of the same level
        old[key] = value


def marks(levels: dict) -> set[str]:
    """What a record's levels hold: each level key, and ``KEY.forces`` where it has forces."""
    return set(levels) | {f"{key}.forces" for key, value in levels.items() if value.get("forces") is not None}


def done_levels(journal: Journal, out: pathlib.Path) -> dict[str, set[str]]:
    """Record id → what is already computed (``marks``; journal and earlier output)."""
    done: dict[str, set[str]] = defaultdict(set)
    for rec in (*read_h5(out), *journal.records().values()):
        done[rec["id"]] |= marks(rec["levels"])
    return done


def read_h5(path: pathlib.Path) -> list[dict]:
    """Records of an ANI HDF5 file written by ``build`` (or any with ``record_id``);
    nothing when the file does not exist."""
    import h5py

    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    with h5py.File(path, "r") as f:
        groups = list(conformer_groups(f, path))
        if "levels" in f.attrs:
            levels = json.loads(f.attrs["levels"])
            if not isinstance(levels, dict):
                raise HDF5Error(f"{path}: its 'levels' attribute is not a JSON object")
        else:  # an ANI file written by something else: its levels are its energies' keys
            keys = {key.removesuffix(".energy") for _, group in groups for key in group if key.endswith(".energy")}
            levels = {key: {} for key in sorted(keys)}
        for name, group in groups:
            count, _ = check_group(
                group, path, name, [f"{key}.{field}" for key in levels for field in ("energy", "forces", "wall_s")]
            )
            for field in ("record_id", "molecule", "source", "index", "temperature_k"):
                if field in group and group[field].shape != (count,):
                    raise HDF5Error(f"{path}: {name}/{field} has shape {group[field].shape}, not ({count},)")
            numbers = atomic_numbers(group, path, name).tolist()
            ids = (
                [i.decode() for i in group["record_id"][()]]
                if "record_id" in group
                else [f"{name}~{c}" for c in range(count)]
            )
            for c, rid in enumerate(ids):
                rec = {
                    "id": rid,
                    "molecule": _text(group, "molecule", c, name),
                    "source": _text(group, "source", c, str(path)),
                    "index": int(group["index"][c]) if "index" in group else c,
                    "temperature_k": float(group["temperature_k"][c]) if "temperature_k" in group else float("nan"),
                    "numbers": numbers,
                    "positions": group["coordinates"][c].tolist(),
                    "levels": {},
                }
                for key, attrs in levels.items():
                    if f"{key}.energy" not in group:
                        continue
                    energy = float(group[f"{key}.energy"][c])
                    if np.isnan(energy):
                        continue
                    forces = group[f"{key}.forces"][c] if f"{key}.forces" in group else None
                    if forces is not None and not np.isfinite(forces).all():
                        forces = None
                    wall = float(group[f"{key}.wall_s"][c]) if f"{key}.wall_s" in group else float("nan")
                    rec["levels"][key] = {
                        "energy": energy,
                        "forces": None if forces is None else forces.tolist(),
                        "wall_s": wall,
                        "attributes": attrs,
                    }
                records.append(rec)
    return records


def _text(group, field, c, default):
    return group[field][c].decode() if field in group else default


def formula(numbers) -> str:
    """Hill formula: C, then H, then the rest alphabetically."""
    from aniserve.elements import symbol

    counts = Counter(symbol(int(z)) for z in numbers)
    order = ["C", "H"] + sorted(s for s in counts if s not in ("C", "H"))
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order if s in counts)


def build(journal: Journal, out: pathlib.Path, sampling_note: str | None = None) -> int:
    """Write every record (earlier output + journal) into the ANI HDF5 ``out``,
    atomically; returns how many records it holds."""
    import h5py

    out = pathlib.Path(out)
    records: dict[str, dict] = {}
    for rec in (*read_h5(out), *journal.records().values()):
        merge(records, rec)
    if not records:
        return 0
    if sampling_note is None and out.exists():  # (labelling an existing file keeps how it was sampled)
        with h5py.File(out, "r") as f:
            sampling_note = f.attrs.get("sampling")
    levels: dict[str, dict] = {}
    for rec in records.values():
        for key, value in rec["levels"].items():
            levels.setdefault(key, value["attributes"])
    groups = defaultdict(list)
    for rec in sorted(records.values(), key=lambda r: (r["molecule"], r["index"], r["id"])):
        # Atoms are stored in decreasing atomic number, so isomers share a group.
        groups[formula(rec["numbers"])].append(rec)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["levels"] = json.dumps(levels)
        f.attrs["units"] = "coordinates Å, energies Hartree, forces Hartree/Å, wall times s"
        if sampling_note:
            f.attrs["sampling"] = sampling_note
        for name, recs in sorted(groups.items()):
            g = f.create_group(name)
            g["atomic_numbers"] = np.array(recs[0]["numbers"], dtype=np.int64)
            g["coordinates"] = np.array([r["positions"] for r in recs])
            for field, key in (("record_id", "id"), ("molecule", "molecule"), ("source", "source")):
                g[field] = np.array([r[key] for r in recs], dtype="S")
            g["index"] = np.array([r["index"] for r in recs])
            g["temperature_k"] = np.array([r["temperature_k"] for r in recs], dtype=float)
            n = len(recs[0]["numbers"])
            for key in levels:
                got = [r["levels"].get(key) for r in recs]
                g[f"{key}.energy"] = np.array([v["energy"] if v else np.nan for v in got])
                g[f"{key}.wall_s"] = np.array([v["wall_s"] if v else np.nan for v in got])
                if any(v and v["forces"] is not None for v in got):
                    g[f"{key}.forces"] = np.array(
                        [v["forces"] if v and v["forces"] is not None else np.full((n, 3), np.nan) for v in got]
                    )
    os.replace(tmp, out)
    return len(records)


def write_records(records: list[dict], out: pathlib.Path) -> None:
    """An ANI HDF5 file holding exactly ``records`` (replacing ``out``), by ``build``."""
    import tempfile

    out = pathlib.Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        journal = Journal(tmp)
        for r in records:
            journal.write(r)
        if out.exists():
            out.unlink()
        build(journal, out)
