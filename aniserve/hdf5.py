"""Walking untrusted ANI-format HDF5 files: every reader of training or labelling data
goes through here before it reads a value.

An HDF5 file declares its datasets' shapes, and a few kilobytes can declare billions of
conformations (chunks never written read as the fill value), link a group into itself,
or point through external links and virtual datasets at other files.  So, before
anything is read:

- groups are walked once each (a group reached again is a link cycle, refused), and a
  link to another file (external link) or a dataset mapped from other files (virtual)
  is refused;
- each dataset's shape is checked against the group's (``coordinates`` (C, N, 3),
  ``atomic_numbers`` (N,), a property (C,) or (C, N, 3)) and against limits, and its
  logical size against what the file stores for it (``MAX_EXPANSION``), which no real
  data set's compression comes near;
- atomic numbers must be integers of known elements.
"""

from __future__ import annotations

import numpy as np

#: Bounds on what a file may declare.  The largest public ANI data sets (ANI-1x: 5M
#: conformations in groups of ≤ 60 atoms) are far inside them.
MAX_ATOMS = 100_000  # per structure
MAX_CONFORMATIONS = 100_000_000  # per group
#: Logical bytes per stored byte: gzip on float64 coordinates and energies gains 1–4×.
MAX_EXPANSION = 64


class HDF5Error(ValueError):
    """An HDF5 file whose structure cannot be trusted or does not fit the ANI layout."""


def conformer_groups(root, path, prefix: str = ""):
    """(name, group) for every group holding ``coordinates``, each group visited once;
    link cycles, external links and virtual datasets are refused."""
    import h5py

    seen = set()  # h5py object ids: equal (and hashing equal) for one object reached by two links
    stack = [(prefix, root)]
    while stack:
        base, group = stack.pop()
        if group.id in seen:
            raise HDF5Error(f"{path}: group {base or '/'!r} is linked into itself (a link cycle)")
        seen.add(group.id)
        children = []
        for name in group:
            link = group.get(name, getlink=True)
            where = f"{base}/{name}" if base else name
            if isinstance(link, h5py.ExternalLink):
                raise HDF5Error(
                    f"{path}: {where!r} is an external link to {link.filename!r}; only data inside the file is read"
                )
            item = group.get(name)
            if item is None:
                raise HDF5Error(f"{path}: {where!r} is a link to nothing")
            if isinstance(item, h5py.Dataset) and item.is_virtual:
                raise HDF5Error(
                    f"{path}: {where!r} is a virtual dataset (mapped from other files); only data "
                    f"stored in the file is read"
                )
            if isinstance(item, h5py.Group):
                children.append((where, item))
        if base and "coordinates" in group:
            yield base, group
        else:
            stack.extend(reversed(children))


def check_group(group, path, name: str, properties=()) -> tuple[int, int]:
    """(conformations, atoms) of a conformer group, once ``coordinates``, the atomic
    numbers and the given property datasets have been checked against each other and
    against the limits (nothing is read but the atomic numbers)."""
    coordinates = _dataset(group, "coordinates", path, name)
    shape = coordinates.shape
    if len(shape) != 3 or shape[2] != 3:
        raise HDF5Error(f"{path}: {name}/coordinates has shape {shape}, not (conformations, atoms, 3)")
    count, atoms = shape[0], shape[1]
    if not 1 <= atoms <= MAX_ATOMS or count > MAX_CONFORMATIONS:
        raise HDF5Error(
            f"{path}: {name}/coordinates declares {count} conformations of {atoms} atoms (limits: "
            f"{MAX_CONFORMATIONS} conformations, 1..{MAX_ATOMS} atoms)"
        )
    for key in ("atomic_numbers", "species"):
        if key in group:
            numbers = _dataset(group, key, path, name)
            if numbers.shape != (atoms,):
                raise HDF5Error(f"{path}: {name}/{key} has shape {numbers.shape}, the coordinates have {atoms} atoms")
    for key in properties:
        if key not in group:
            continue
        values = _dataset(group, key, path, name)
        if values.shape not in ((count,), (count, atoms, 3)):
            raise HDF5Error(
                f"{path}: {name}/{key} has shape {values.shape}; with {count} conformations of {atoms} "
                f"atoms it must be ({count},) or ({count}, {atoms}, 3)"
            )
    return count, atoms


def atomic_numbers(group, path, name: str) -> np.ndarray:
    """The group's atomic numbers (``atomic_numbers``, or TorchANI's ``species`` as
    symbols or numbers), each an integer of a known element."""
    from aniserve.elements import NUMBERS

    if "atomic_numbers" in group:
        raw, key = group["atomic_numbers"][()], "atomic_numbers"
    elif "species" in group:
        raw, key = group["species"][()], "species"
        if raw.dtype.kind in "SUO":
            try:
                return np.array([NUMBERS[s.decode() if isinstance(s, bytes) else str(s)] for s in raw], np.int64)
            except KeyError as error:
                raise HDF5Error(f"{path}: group {name!r} has unknown element symbol {error}") from None
    else:
        raise HDF5Error(f"{path}: group {name!r} has coordinates but neither 'atomic_numbers' nor 'species'")
    raw = np.asarray(raw)
    if raw.dtype.kind not in "iu":
        raise HDF5Error(f"{path}: {name}/{key} holds {raw.dtype} values, not integers")
    if raw.size and not ((raw >= 1) & (raw <= len(NUMBERS) - 1)).all():
        bad = raw[(raw < 1) | (raw > len(NUMBERS) - 1)][0]
        raise HDF5Error(f"{path}: {name}/{key} holds {bad}, not the atomic number of an element")
    return raw.astype(np.int64)


def _dataset(group, key: str, path, name: str):
    import h5py

    item = group.get(key)
    if not isinstance(item, h5py.Dataset):
        raise HDF5Error(f"{path}: {name}/{key} is not a dataset")
    logical = int(np.prod(item.shape, dtype=np.float64) * item.dtype.itemsize)
    stored = item.id.get_storage_size()
    if logical > MAX_EXPANSION * stored + (1 << 20):
        raise HDF5Error(
            f"{path}: {name}/{key} declares {logical} bytes ({item.shape}) but the file stores "
            f"{stored} for it: unwritten or over-compressed data is refused"
        )
    return item
