"""aniserve inside i-PI: a PES for i-PI's ``<ffdirect>`` force field (tested with i-PI 3.3.1), which
i-PI loads from this file and calls in its own process, with no socket and no second
process.  In i-PI's input::

    <ffdirect name='ani' pbc='false'>
      <pes>custom</pes><pes_path>PATH</pes_path>
      <parameters>{template: init.xyz, model: ani-1ccx, pbc: no}</parameters>
      <batch_size>8</batch_size>
    </ffdirect>

PATH is this file (``python -m aniserve.ipi_pes`` prints it).  ``<batch_size>``, the
number of beads, makes each step one evaluation of all beads.  Parameters: ``template``
(a structure file giving the atoms, in i-PI's order; required), ``model`` (a name or
path, default the embedded model), ``dtype`` (float32), ``device`` (cpu), ``pbc`` (auto:
periodic when i-PI's cell is non-singular; yes; no, for a molecule in i-PI's box), ``extras`` (std: the ensemble's
energy std; committee: also each member's energy, forces and virial; none), ``skin``
(Å, 1.0), ``threads`` (the CPU threads of i-PI's process; default torch's), and
``collect`` (an extended XYZ file to append uncertain structures to), with
``collect_energy_std`` and ``collect_relative`` as ``drive --collect``'s.  i-PI's
Python driver takes the same file: ``i-pi-py_driver -m custom -P PATH -o
template=init.xyz,model=ani-1ccx -u -a NAME``.

i-PI loads the file by path, not as part of the package: imports here are absolute.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from aniserve.ipi_edge import EXTRAS_CHOICES, PBC_CHOICES, extras_json, results_to_ipi, structure_from_ipi

# How i-PI finds the class in a PES file (read from the source as literals).
__DRIVER_NAME__ = "aniserve"
__DRIVER_CLASS__ = "ANIServePES"

#: Parameters i-PI adds of its own accord.
_IPI_OWN = ("verbosity", "verbose")


class ANIServePES:
    """Energies, forces and virials in i-PI's units (Hartree, Bohr) for the structures
    i-PI hands over: one (cell, positions) or lists of them (a batch)."""

    def __init__(
        self,
        template: str | None = None,
        model: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        pbc: str = "auto",
        extras: str = "std",
        skin: float = 1.0,
        threads: int | None = None,
        collect: str | None = None,
        collect_energy_std: float | None = None,
        collect_relative: bool | str = False,
        **others,
    ):
        from aniserve.models import load_model
        from aniserve.serving import Evaluator
        from aniserve.structures import read_structures

        unknown = sorted(k for k in others if k not in _IPI_OWN)
        if unknown:
            raise ValueError(
                f"aniserve PES: unknown parameter(s) {', '.join(unknown)}; it takes template, model, dtype, "
                "device, pbc, extras, skin, threads, collect, collect_energy_std, collect_relative"
            )
        if template is None:
            raise ValueError("aniserve PES: give the atoms as a structure file: <parameters>{template: init.xyz}")
        if str(pbc) not in PBC_CHOICES:
            raise ValueError(f"aniserve PES: pbc must be one of {', '.join(PBC_CHOICES)}, got {pbc!r}")
        if str(extras) not in EXTRAS_CHOICES:
            raise ValueError(f"aniserve PES: extras must be one of {', '.join(EXTRAS_CHOICES)}, got {extras!r}")
        self.pbc, self.extras = str(pbc), str(extras)
        skin = _number("skin", skin, float, 0)
        if threads is not None:
            import torch

            torch.set_num_threads(_number("threads", threads, int, 1))  # i-PI's process, as drive --threads
        self.numbers = np.asarray(read_structures(pathlib.Path(str(template)), 0)[0].numbers)
        potential = load_model(None if model is None else str(model), device=str(device), dtype=str(dtype))
        self.evaluator = Evaluator(
            potential,
            skin=skin,
            members=self.extras == "committee",
            collector=None if collect is None else _collector(collect, collect_energy_std, collect_relative),
        )
        self.evaluator.check_elements(self.numbers)  # an element the model lacks: fail at start-up

    def __call__(self, cell, pos):
        """i-PI's call: ``cell`` (3, 3) and ``pos`` (N, 3) in Bohr give (energy, forces,
        virial, extras); lists of them, a list of such tuples."""
        batched = isinstance(cell, list)
        cells, positions = (cell, pos) if batched else ([cell], [pos])
        if len(cells) != len(positions):
            raise ValueError(f"aniserve PES: {len(cells)} cells for {len(positions)} structures")
        slots = []
        for slot, (h, r) in enumerate(zip(cells, positions)):
            r = np.asarray(r, dtype=np.float64)
            if r.size != 3 * len(self.numbers):
                raise ValueError(
                    f"aniserve PES: i-PI sent {r.size / 3:g} atoms, the template has {len(self.numbers)}: "
                    "give the file i-PI starts from as template"
                )
            r = r.reshape(-1, 3)
            # Slots by batch position: each keeps its neighbour list (rebuilt where
            # an atom has moved half the skin, so a different bead there is still right).
            slots.append(
                (("i-PI", slot), structure_from_ipi(self.numbers, np.asarray(h, dtype=np.float64), r, self.pbc))
            )
        results = self.evaluator.evaluate(slots)
        energies, forces, virials = results_to_ipi(results)
        out = [
            (float(e), f, v, extras_json(result, self.extras))
            for e, f, v, result in zip(energies, forces, virials, results)
        ]
        return out if batched else out[0]


def _collector(path, energy_std, relative):
    """``drive --collect``'s collector: the model's stated threshold unless one is given
    (not 0: the PES has no force criterion, so nothing would be collected), absolute or
    relative to each slot's first structure."""
    from aniserve.collect import MODEL_THRESHOLD, Collector

    if isinstance(relative, str):
        if relative.strip().lower() not in ("true", "false"):
            raise ValueError(f"aniserve PES: collect_relative must be true or false, got {relative!r}")
        relative = relative.strip().lower() == "true"
    threshold = MODEL_THRESHOLD if energy_std is None else (_number("collect_energy_std", energy_std, float, 0) or None)
    if threshold is None:
        raise ValueError("aniserve PES: collect_energy_std 0 leaves nothing to collect by")
    return Collector(pathlib.Path(str(path)), energy_std=threshold, relative=bool(relative))


def _number(name: str, value, kind, low):
    """A parameter as a finite number of ``kind`` ≥ ``low``, or a ValueError naming it."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number < low or (kind is int and number != float(value)):
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"aniserve PES: {name} must be {what} ≥ {low}, got {value!r}")
    return number


if __name__ == "__main__":
    print(pathlib.Path(__file__).resolve())
