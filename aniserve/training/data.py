"""ANI-format HDF5 data: reading, splitting by molecule, size-grouped batches.

Two layouts are read, found by walking the file for groups holding ``coordinates``:

* the ANI-1x / ANI-1ccx release: ``atomic_numbers`` (N,), ``coordinates`` (C, N, 3) and
  one dataset per property, e.g. ``wb97x_dz.energy`` (C,), ``wb97x_dz.forces`` (C, N, 3);
* TorchANI's: ``species`` (N,) as element symbols (or numbers), ``coordinates``,
  ``energies``.

Units are the files' own, Å and Hartree.  Only the index (group names, atom counts, which
conformations have targets) is held in memory; coordinates and targets are read from
the file batch by batch, so a multi-GB file trains in constant memory.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections import Counter

import numpy as np
import torch

from aniserve.elements import symbol
from aniserve.hdf5 import HDF5Error, atomic_numbers, check_group, conformer_groups


class DataError(ValueError):
    pass


@dataclasses.dataclass
class Batch:
    """Padded structures: numbers (B, N) with 0 for padding, positions (B, N, 3) Å,
    energy (B,) Hartree, forces (B, N, 3) Hartree/Å or None; NaN marks a missing target."""

    numbers: torch.Tensor
    positions: torch.Tensor
    energy: torch.Tensor
    forces: torch.Tensor | None
    group: list[str]
    conformation: list[int]
    molecule: list[str]

    def __len__(self) -> int:
        return len(self.numbers)


@dataclasses.dataclass(frozen=True)
class _Group:
    name: str
    numbers: np.ndarray
    conformations: np.ndarray  # indices with at least one finite target
    file: int = 0  # which of the data's files
    keys: tuple[str, str | None] | None = None  # (energy, forces) where not the data's own (``union``)


def data_paths(path) -> list[pathlib.Path]:
    """One data file, or several (``--data``/``--train`` given more than once), as a list."""
    return [pathlib.Path(path)] if isinstance(path, (str, pathlib.Path)) else [pathlib.Path(p) for p in path]


class ANIData:
    """Conformations of an ANI HDF5 file with an energy target and optional forces.

    Conformations lacking every requested target (NaN) are left out; one lacking only
    some is kept and that loss term is skipped for it.  Every file must hold the energy
    key; the forces key may be absent from some files (their conformations then have
    energies only: coupled-cluster forces exist for a part of the data), not from all.
    """

    def __init__(self, path, energy_key: str, forces_key: str | None = None, _groups: list[_Group] | None = None):
        """path: one file, or several (``--data`` given more than once) read as one set:
        a formula present in several files is one molecule group for splitting."""
        import h5py

        self.paths = data_paths(path)
        self.path = self.paths[0] if len(self.paths) == 1 else ", ".join(map(str, self.paths))
        self.energy_key, self.forces_key = energy_key, forces_key
        self._files = []
        for p in self.paths:
            try:
                self._files.append(h5py.File(p, "r"))
            except FileNotFoundError:
                raise DataError(f"{p}: no such file") from None
            except OSError as error:
                raise DataError(f"{p}: not a readable HDF5 file ({error})") from None
        if _groups is not None:
            self.groups = _groups
            return
        indexed = [self._index(i) for i in range(len(self.paths))]
        self.groups = [g for groups, _ in indexed for g in groups]
        if forces_key and not any(forces_key in keys for _, keys in indexed):
            raise DataError(
                f"{self.path}: no dataset named {forces_key!r}; the conformer groups hold: "
                f"{', '.join(sorted(set().union(*(keys for _, keys in indexed)))) or 'nothing'}"
            )

    def _index(self, file: int) -> tuple[list[_Group], set[str]]:
        """The file's conformer groups with a target, and the dataset names it holds."""
        groups: list[_Group] = []
        keys: set[str] = set()
        path = self.paths[file]
        try:
            found = list(conformer_groups(self._files[file], path))
            for name, group in found:
                check_group(group, path, name, [k for k in (self.energy_key, self.forces_key) if k])
        except HDF5Error as error:
            raise DataError(str(error)) from None
        for name, group in found:
            keys.update(group.keys())
            if self.energy_key not in group and (self.forces_key is None or self.forces_key not in group):
                continue
            numbers = _numbers(group, path, name)
            count = group["coordinates"].shape[0]
            _check_coordinates(group["coordinates"], path, name)
            have = np.zeros(count, bool)
            for key in (self.energy_key, self.forces_key):
                if key and key in group:
                    values = group[key][()].reshape(count, -1)
                    if np.isinf(values).any():
                        c = int(np.nonzero(np.isinf(values).any(1))[0][0])
                        raise DataError(
                            f"{path}: {name}/{key} is infinite for conformation {c} (NaN marks a missing "
                            f"value; infinity is an error)"
                        )
                    have |= np.isfinite(values).all(1)
            groups.append(_Group(name, numbers, np.nonzero(have)[0], file))
        missing = [k for k in (self.energy_key, self.forces_key) if k and k not in keys]
        if missing and (self.energy_key in missing or len(self.paths) == 1):
            raise DataError(
                f"{path}: no dataset named {', '.join(map(repr, missing))}; the conformer groups "
                f"hold: {', '.join(sorted(keys)) or 'nothing (no group has coordinates)'}"
            )
        return [g for g in groups if len(g.conformations)], keys

    # ------------------------------------------------------------------ views
    def subset(self, names) -> ANIData:
        names = set(names)
        return ANIData(
            self.paths, self.energy_key, self.forces_key, _groups=[g for g in self.groups if g.name in names]
        )

    def items(self) -> list[tuple[int, int]]:
        """Every (group index, conformation) of the set, in a fixed order."""
        return [(gi, int(c)) for gi, g in enumerate(self.groups) for c in g.conformations]

    def select(self, items) -> ANIData:
        """A view holding only these (group index, conformation) items."""
        chosen: dict[int, list[int]] = {}
        for gi, c in items:
            chosen.setdefault(gi, []).append(int(c))
        groups = [
            dataclasses.replace(self.groups[gi], conformations=np.array(sorted(cs)))
            for gi, cs in sorted(chosen.items())
        ]
        return ANIData(self.paths, self.energy_key, self.forces_key, _groups=groups)

    def union(self, other: ANIData) -> ANIData:
        """One set of this view's conformations and ``other``'s, each read from its own
        file under its own keys (a student's replayed teacher labels beside DFT labels);
        both must have forces or neither.  Files both read are opened once more, not merged."""
        if (self.forces_key is None) != (other.forces_key is None):
            raise ValueError(
                f"cannot join data of {self.energy_key!r}/{self.forces_key!r} with "
                f"{other.energy_key!r}/{other.forces_key!r}: forces on one side only"
            )
        paths = list(self.paths)
        where = []
        for path in other.paths:
            if path not in paths:
                paths.append(path)
            where.append(paths.index(path))
        own = (self.energy_key, self.forces_key)
        groups = list(self.groups)
        for g in other.groups:
            keys = g.keys or (other.energy_key, other.forces_key)
            groups.append(dataclasses.replace(g, file=where[g.file], keys=None if keys == own else keys))
        return ANIData(paths, self.energy_key, self.forces_key, _groups=groups)

    def split(self, validation: float, seed: int) -> tuple[ANIData, ANIData]:
        """(train, validation) by whole groups (molecular formulas), reproducibly.

        Data of a single formula (one molecule's trajectory, as active learning on one
        molecule collects) is split by conformation instead: there is nothing else to
        hold out."""
        names = sorted({g.name for g in self.groups})
        rng = np.random.default_rng(seed)
        if len(names) == 1:
            items = self.items()
            order = rng.permutation(len(items))
            n_val = max(1, round(validation * len(items))) if len(items) > 1 else 0
            return self.select([items[i] for i in order[n_val:]]), self.select([items[i] for i in order[:n_val]])
        rng.shuffle(names)
        n_val = max(1, round(validation * len(names)))
        return self.subset(names[n_val:]), self.subset(names[:n_val])

    def __len__(self) -> int:
        return sum(len(g.conformations) for g in self.groups)

    def element_counts(self) -> dict[str, tuple[int, int]]:
        """Element → (atoms, conformations) over the whole set."""
        atoms: Counter[str] = Counter()
        confs: Counter[str] = Counter()
        for g in self.groups:
            for z, n in Counter(g.numbers.tolist()).items():
                atoms[symbol(z)] += n * len(g.conformations)
                confs[symbol(z)] += len(g.conformations)
        return {e: (atoms[e], confs[e]) for e in atoms}

    def check_elements(self, elements) -> None:
        extra = {e: c for e, c in self.element_counts().items() if e not in set(elements)}
        if extra:
            listed = ", ".join(f"{e} ({a} atoms in {c} conformations)" for e, (a, c) in sorted(extra.items()))
            raise DataError(
                f"{self.path}: the data holds element(s) the model does not cover: {listed}; "
                f"the model covers {', '.join(elements)}"
            )

    # ----------------------------------------------------------------- batches
    def batches(self, batch_size: int, seed: int | None = None):
        """Yield Batches of up to ``batch_size`` structures of similar atom count.

        With a seed, conformations are shuffled before grouping by size and the batch
        order is shuffled; without one the order is fixed (evaluation)."""
        plan = self.plan(batch_size, seed)
        for items in plan:
            yield self.read(items)

    def plan(self, batch_size: int, seed: int | None = None) -> list[list[tuple[int, int]]]:
        """Batches as lists of (group index, conformation) — cheap, no file reads."""
        items = self.items()
        sizes = np.array([len(self.groups[gi].numbers) for gi, _ in items])
        if seed is None:
            order = np.argsort(sizes, kind="stable")
        else:
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(items))
            order = order[np.argsort(sizes[order], kind="stable")]
        chunks = [[items[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
        if seed is not None:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return chunks

    def read(self, items: list[tuple[int, int]]) -> Batch:
        n_max = max(len(self.groups[gi].numbers) for gi, _ in items)
        B = len(items)
        numbers = np.zeros((B, n_max), np.int64)
        positions = np.zeros((B, n_max, 3))
        energy = np.full(B, np.nan)
        forces = np.full((B, n_max, 3), np.nan) if self.forces_key else None
        molecule = [""] * B
        by_group: dict[int, list[tuple[int, int]]] = {}
        for row, (gi, c) in enumerate(items):
            by_group.setdefault(gi, []).append((c, row))
        for gi, entries in by_group.items():
            g = self.groups[gi]
            h5 = self._files[g.file][g.name]
            energy_key, forces_key = g.keys or (self.energy_key, self.forces_key)
            entries.sort()
            confs = [c for c, _ in entries]
            rows = [r for _, r in entries]
            n = len(g.numbers)
            numbers[rows, :n] = g.numbers
            positions[rows, :n] = h5["coordinates"][confs]
            if energy_key in h5:
                energy[rows] = h5[energy_key][confs]
            if forces is not None and forces_key in h5:
                forces[rows, :n] = h5[forces_key][confs]
            names = h5["molecule"][confs] if "molecule" in h5 else [g.name] * len(confs)
            for r, m in zip(rows, names):
                molecule[r] = m.decode() if isinstance(m, bytes) else str(m)
        return Batch(
            torch.from_numpy(numbers),
            torch.from_numpy(positions),
            torch.from_numpy(energy),
            None if forces is None else torch.from_numpy(forces),
            [self.groups[gi].name for gi, _ in items],
            [c for _, c in items],
            molecule,
        )


#: Atoms closer than this (Å) in a training conformation are an error: no real molecule
#: has them (H₂'s bond is 0.74 Å), and coincident atoms make the features NaN.
MIN_DISTANCE = 0.1


def _check_coordinates(dataset, path, name: str, chunk: int = 4096) -> None:
    """Finite coordinates, no two atoms of a conformation closer than MIN_DISTANCE."""
    for start in range(0, dataset.shape[0], chunk):
        x = np.asarray(dataset[start : start + chunk], dtype=np.float64)
        bad = ~np.isfinite(x).all(axis=(1, 2))
        if bad.any():
            raise DataError(
                f"{path}: {name}/coordinates of conformation {start + int(np.argmax(bad))} hold NaN or infinite values"
            )
        if x.shape[1] < 2:
            continue
        d = np.linalg.norm(x[:, :, None] - x[:, None], axis=-1)
        d[:, np.arange(x.shape[1]), np.arange(x.shape[1])] = np.inf
        closest = d.min(axis=(1, 2))
        if (closest < MIN_DISTANCE).any():
            c = int(np.argmin(closest))
            i, j = np.unravel_index(int(np.argmin(d[c])), d[c].shape)
            raise DataError(
                f"{path}: {name} conformation {start + c}: atoms {i} and {j} are {closest[c]:.3g} Å apart "
                f"(closer than {MIN_DISTANCE} Å)"
            )


def _numbers(group, path, name) -> np.ndarray:
    try:
        return atomic_numbers(group, path, name)
    except HDF5Error as error:
        raise DataError(str(error)) from None


def write_ani_h5(path, structures: dict[str, dict[str, np.ndarray]], layout: str = "ani") -> None:
    """Write groups of conformations; ``layout`` 'ani' (atomic_numbers + property keys) or
    'torchani' (species as symbols, 'energies').  Used by tests and small tools."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, data in structures.items():
            g = f.create_group(name)
            for key, value in data.items():
                if key == "atomic_numbers" and layout == "torchani":
                    g["species"] = np.array([symbol(int(z)).encode() for z in value])
                else:
                    g[key] = value
