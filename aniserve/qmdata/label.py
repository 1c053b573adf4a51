"""``aniserve data label``: given structures (any ASE-readable file, or an ANI HDF5
file whose levels are kept) as tasks at one level.

Atoms are stored in decreasing atomic number (the layout's rule, so isomers share a
formula group).  A record's id is its molecule name and a digest of its numbers and
positions, so labelling the same structure twice, from any file, computes it once.
"""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np

from aniserve.qmdata.levels import Level
from aniserve.qmdata.records import read_h5
from aniserve.qmdata.schedule import Task


def structure_id(name: str, numbers, positions) -> str:
    digest = hashlib.sha256(
        np.asarray(numbers, np.int64).tobytes() + np.round(np.asarray(positions, float), 8).tobytes()
    ).hexdigest()[:12]
    return f"{name}~{digest}"


def read_inputs(paths) -> tuple[list[dict], list[dict]]:
    """(structures, kept records): structures to label as {name, source, index, numbers,
    positions}; the HDF5 inputs' own records (their existing levels), to merge."""
    structures, kept = [], []
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if path.suffix.lower() in (".h5", ".hdf5"):
            records = read_h5(path)
            if not records:
                raise ValueError(f"{path}: no conformations in this HDF5 file")
            kept += records
            structures += [
                {
                    "id": r["id"],
                    "name": r["molecule"],
                    "source": r["source"],
                    "index": r["index"],
                    "temperature_k": r["temperature_k"],
                    "numbers": r["numbers"],
                    "positions": r["positions"],
                }
                for r in records
            ]
            continue
        structures += _ase_structures(path)
    return structures, kept


def _ase_structures(path: pathlib.Path) -> list[dict]:
    from aniserve.structures import read_structures

    frames = read_structures(path)
    out = []
    for i, atoms in enumerate(frames):
        numbers = atoms.numbers
        if not len(numbers):
            raise ValueError(f"{path}, frame {i}: no atoms")
        if not np.isfinite(atoms.positions).all():
            raise ValueError(f"{path}, frame {i}: positions are not finite")
        order = np.argsort(-numbers, kind="stable")
        name = str(atoms.info.get("molecule") or path.stem)
        out.append(
            {
                "name": name,
                "source": str(path),
                "index": i,
                "temperature_k": float("nan"),
                "numbers": numbers[order].tolist(),
                "positions": atoms.positions[order].tolist(),
            }
        )
    return out


#: ``select``'s orders: ``coverage`` (round-robin over molecules, smallest first in each
#: round) and ``cheapest`` (every chosen structure of the smallest molecules first).
ORDERS = ("coverage", "cheapest")


def select(
    structures: list[dict],
    kept: list[dict],
    having: str | None = None,
    per_molecule: int | None = None,
    order: str = "coverage",
) -> list[dict]:
    """The structures to label: only those whose input record already has level key
    ``having`` (e.g. CCSD(T) forces for the conformations with CCSD(T) energies), at
    most ``per_molecule`` of each molecule (lowest indices first).

    ``coverage`` orders them round-robin over molecules, smallest molecules first in
    each round, so that a partial run covers as many molecules as it can; ``cheapest``
    puts every structure of a smaller molecule before any of a larger one, so that a run
    cut short (a job's time limit, a machine reset) has finished as many as it could:
    CCSD(T) costs grow as about the 7th power of size, and a few large molecules can
    hold a round-robin queue for hours."""
    if order not in ORDERS:
        raise ValueError(f"the order is one of {', '.join(ORDERS)}, not {order!r}")
    if having is not None:
        with_level = {r["id"] for r in kept if having in r["levels"]}
        if not with_level:
            known = sorted({k for r in kept for k in r["levels"]})
            raise ValueError(
                f"no input record has level {having!r} (levels in the inputs: {', '.join(known) or 'none'})"
            )
        structures = [s for s in structures if s.get("id") in with_level]
    by_molecule: dict[str, list[dict]] = {}
    for s in sorted(structures, key=lambda s: (s["name"], s["index"])):
        by_molecule.setdefault(s["name"], []).append(s)
    if per_molecule is not None:
        by_molecule = {name: group[:per_molecule] for name, group in by_molecule.items()}
    groups = sorted(by_molecule.values(), key=lambda group: (_size(group[0]["numbers"]), group[0]["name"]))
    if order == "cheapest":
        return [s for group in groups for s in group]
    out = []
    for rank in range(max(map(len, groups), default=0)):
        out += [group[rank] for group in groups if rank < len(group)]
    return out


def _size(numbers) -> tuple[int, int]:
    """What a correlated calculation's cost grows with: heavy atoms, then all atoms."""
    return sum(int(z) > 1 for z in numbers), len(numbers)


def tasks(structures: list[dict], level: Level, forces: bool) -> list[Task]:
    out = []
    for s in structures:
        rid = s.get("id") or structure_id(s["name"], s["numbers"], s["positions"])
        out.append(
            Task(
                rid,
                tuple(int(z) for z in s["numbers"]),
                tuple((float(p[0]), float(p[1]), float(p[2])) for p in s["positions"]),
                (level,),
                frozenset({level.key} if forces else ()),
                s["name"],
                s["source"],
                int(s["index"]),
                float(s["temperature_k"]),
            )
        )
    return out
