"""``aniserve data generate``: sampled conformations of a molecule list, as tasks.

Work is a fixed list of calculations (molecule, conformation index), each at the low
level and, for every ``high_every``-th conformation, at the high level too.  The
geometries are sampled here, in the scheduling process (normal-mode sampling is cheap
and deterministic in the index); the calculations run on Dask workers
(``aniserve.qmdata.schedule``).  Record ids are ``MOLECULE~INDEX``.
"""

from __future__ import annotations

from aniserve.qmdata import sampling
from aniserve.qmdata.levels import Level
from aniserve.qmdata.schedule import Task

SAMPLING_NOTE = (
    "normal-mode sampling around MMFF94 minima (RDKit), T uniform in [50, 600] K; index 0 is the MMFF minimum"
)


def plan(
    specs, conformations: int, low: Level, high: Level | None, high_every: int, high_forces: bool = False
) -> list[tuple]:
    """(spec, index, levels, keys of the levels with forces) in round-robin order over
    molecules, so a partial run covers all of them.  The low level always has forces;
    the high level (CCSD(T): minutes to hours a structure) only with ``high_forces``."""
    jobs = []
    for index in range(conformations):
        with_high = high is not None and index % high_every == 0
        levels = (low, high) if with_high else (low,)
        forces = frozenset(lv.key for lv in levels if lv is not None and (lv is low or high_forces))
        for spec in specs:
            jobs.append((spec, index, levels, forces))
    return jobs


def job_id(spec: sampling.MoleculeSpec, index: int) -> str:
    return f"{spec.name}~{index}"


def tasks(jobs: list[tuple], done: dict[str, set[str]] | None = None, log=None) -> list[Task]:
    """Tasks for the jobs whose marks (``records.marks``) are not all in ``done``
    (sampling only those)."""
    equilibria: dict[str, sampling.Equilibrium] = {}
    out = []
    done = done or {}
    for spec, index, levels, forces in jobs:
        rid = job_id(spec, index)
        if {lv.key for lv in levels} | {f"{k}.forces" for k in forces} <= done.get(rid, set()):
            continue
        if spec.name not in equilibria:
            if log:
                print(f"optimising {spec.name} (MMFF94) …", file=log, flush=True)
            equilibria[spec.name] = sampling.optimise(spec)
        eq = equilibria[spec.name]
        positions, temperature = sampling.sample_conformation(eq, index)
        out.append(
            Task(
                rid,
                tuple(int(z) for z in eq.numbers),
                tuple((float(p[0]), float(p[1]), float(p[2])) for p in positions),
                tuple(levels),
                forces,
                spec.name,
                spec.source,
                index,
                float(temperature),
            )
        )
    return out
