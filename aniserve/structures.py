"""Reading structure files: one reader for ``eval``, ``drive --structure``, ``data
label`` and the examples.

Everything ASE reads is read by ASE (extended XYZ with its ``Lattice``, CIF, PDB with
CRYST1, POSCAR, …), and one thing ASE does not read is added: the comment line i-PI
writes and reads in its XYZ files, ``# CELL(abcABC): a b c α β γ …``, ``# CELL(H): …``
or ``# CELL(GENH): …`` (the cell matrix with the lattice vectors as columns), with the
units of the positions and of the cell as ``positions{UNIT}`` and ``cell{UNIT}``
(atomic units, i.e. bohr, when not given, as in i-PI).  ASE reads such a file as a
cluster, which for a periodic box is silently wrong; here it is a box.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np

from aniserve.units import BOHR_IN_ANGSTROM

#: Lengths in Å of the units i-PI files name.
LENGTH_UNITS = {
    "angstrom": 1.0,
    "atomic_unit": BOHR_IN_ANGSTROM,
    "bohr": BOHR_IN_ANGSTROM,
    "nanometer": 10.0,
    "picometer": 0.01,
    "meter": 1e10,
}
_CELL = re.compile(r"CELL[\(\[\{](abcABC|H|GENH)[\)\]\}]:\s+(.*)")
_UNITS = re.compile(r"\b(positions|cell)\{(\w+)\}")


class StructureFileError(ValueError):
    """A structure file that cannot be read, with the file and the problem named."""


def read_structures(path, index=":") -> list:
    """The structures of ``path`` as ``ase.Atoms`` (a list, even for one), with the cell
    and periodicity of i-PI's comment lines where the file has them.  ``index``: ASE's
    frame selection (``":"``, ``0``, ``"-1"``, ``"2:5"``)."""
    import ase.io
    from ase.io.formats import string2index

    path = pathlib.Path(path)
    if not path.is_file():
        raise StructureFileError(f"cannot read structures from {path}: no such file")
    if path.stat().st_size == 0:
        raise StructureFileError(f"cannot read structures from {path}: empty file")
    try:
        frames = ase.io.read(path, index=index)
    except Exception as error:  # noqa: BLE001 - ASE's readers raise many kinds; reported as one line
        raise StructureFileError(f"cannot read structures from {path}: {error or type(error).__name__}") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise StructureFileError(f"{path} holds no structures (index {index!r})")
    comments = _xyz_comments(path)
    if comments is not None:
        selected: Any = string2index(index) if isinstance(index, str) else index
        chosen = comments[selected] if isinstance(selected, slice) else [comments[selected]]
        if len(chosen) == len(frames):
            for n, (atoms, comment) in enumerate(zip(frames, chosen)):
                _apply_ipi_comment(atoms, comment, f"{path}, frame {n}")
    return frames


def _xyz_comments(path: pathlib.Path) -> list[str] | None:
    """The comment line of each frame of an XYZ file, or None for other formats."""
    if path.suffix.lower() not in (".xyz", ".extxyz"):
        return None
    comments: list[str] = []
    with open(path, errors="replace") as f:
        while True:
            count = f.readline()
            if not count.strip():
                return comments
            try:
                natoms = int(count.split()[0])
            except ValueError:
                return None  # not plain XYZ after all: ASE's reading stands
            comments.append(f.readline())
            for _ in range(natoms):
                f.readline()


def _apply_ipi_comment(atoms, comment: str, where: str) -> None:
    units = dict(_UNITS.findall(comment))
    for unit in units.values():
        if unit not in LENGTH_UNITS:
            raise StructureFileError(f"{where}: unknown length unit {unit!r} (known: {', '.join(LENGTH_UNITS)})")
    match = _CELL.search(comment)
    if match is None and "positions" not in units:
        return
    # i-PI's default ("automatic") units are atomic units.
    atoms.positions *= LENGTH_UNITS[units.get("positions", "atomic_unit")]
    atoms.info = {}  # what ASE made of the comment as key=value pairs ("CELL(abcABC):": True, …)
    if match is None:
        return
    kind, numbers = match.group(1), match.group(2).split()
    try:
        values = [float(x) for x in numbers[: 6 if kind == "abcABC" else 9]]
    except ValueError:
        values = []
    if len(values) != (6 if kind == "abcABC" else 9) or not np.isfinite(values).all():
        raise StructureFileError(
            f"{where}: CELL({kind}) needs {6 if kind == 'abcABC' else 9} finite numbers, got {' '.join(numbers)[:80]!r}"
        )
    scale = LENGTH_UNITS[units.get("cell", "atomic_unit")]
    if kind == "abcABC":
        from ase.geometry import cellpar_to_cell

        cell = cellpar_to_cell([v * scale for v in values[:3]] + values[3:])
    else:
        cell = np.array(values).reshape(3, 3).T * scale  # i-PI's h: lattice vectors as columns
    atoms.cell = cell
    atoms.pbc = True
