"""``bench active --pool md``: a pool with the redundancy of real exploration.

Normal-mode conformations (eight per molecule) leave a selection little to choose
between; frames of molecular dynamics are what an active-learning run meets.  From the
first conformation of each molecule of an ANI file, Langevin MD with the *explorer*
(the committee's own model) at each temperature, a frame every ``interval`` steps; each
frame labelled by a *teacher* model (energies and forces at the teacher's level; free).
A frame's molecule is ``name@300K``, so a selection's cap per trajectory and the scores
per temperature read it.  Built once per setting and kept in the bench's work folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import numpy as np

log = logging.getLogger(__name__)

TEACHER_ENERGY, TEACHER_FORCES = "teacher.energy", "teacher.forces"
TEMPERATURES = (300.0, 1000.0)
#: Frames with two atoms closer than this (Å) end a trajectory: it has collapsed.
MIN_DISTANCE = 0.6


def starts(path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(molecule, numbers, positions) of the first conformation of each molecule in ``path``."""
    from aniserve.qmdata.records import read_h5

    first: dict[str, dict] = {}
    for r in read_h5(path):
        if r["molecule"] not in first or r["index"] < first[r["molecule"]]["index"]:
            first[r["molecule"]] = r
    if not first:
        raise ValueError(f"{path}: no conformations to start MD from")
    return [(name, np.array(r["numbers"]), np.array(r["positions"])) for name, r in sorted(first.items())]


def build(starts_path, folder, explorer: str, teacher: str, steps: int, interval: int, seed: int = 0) -> pathlib.Path:
    """The MD frames of ``starts_path``'s molecules with teacher labels, as an ANI file
    in ``folder`` (named by its settings; made once)."""
    from aniserve.learn import langevin_frames
    from aniserve.models import load_model
    from aniserve.qmdata.records import write_records

    settings = {
        "starts": str(starts_path),
        "explorer": explorer,
        "teacher": teacher,
        "steps": steps,
        "interval": interval,
        "seed": seed,
        "temperatures": TEMPERATURES,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = pathlib.Path(folder) / f"md-{pathlib.Path(starts_path).stem}-{key}.h5"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(explorer, dtype="float64")
    labeller = load_model(teacher, dtype="float64")
    records = []
    for m, (name, numbers, positions) in enumerate(starts(starts_path)):
        for t, temperature in enumerate(TEMPERATURES):
            frames = langevin_frames(model, numbers, positions, temperature, steps, interval, [seed, m, t])
            # A trajectory that collapses (ANI models have no short-range wall: N₂ at 1,000 K
            # with ANI-1x fused to 0.07 Å) is kept up to its last physical frame.
            physical = [closest_distance(x) >= MIN_DISTANCE for x in frames]
            if not all(physical):
                log.warning(f"MD pool: {name} at {temperature:g} K collapsed after {physical.index(False)} frames")
                frames = frames[: physical.index(False)]
            if not frames:
                continue
            trajectory = f"{name}@{temperature:g}K"
            records += _labelled(
                labeller, teacher, trajectory, numbers, frames, f"bench active MD ({explorer})", temperature
            )
        log.info(f"MD pool {out.name}: {name} done ({len(records)} frames so far)")
    write_records(records, out)
    return out


def _labelled(
    labeller, teacher: str, molecule: str, numbers, frames, source: str, temperature: float = float("nan")
) -> list[dict]:
    """Records of ``frames`` (one molecule's positions) with the teacher's energies and forces."""
    from aniserve.qmdata.label import structure_id

    result = labeller.evaluate(np.stack([numbers] * len(frames)), np.stack(frames))
    records = []
    for i, (x, energy, forces) in enumerate(zip(frames, np.atleast_1d(result.energy), result.forces)):
        record = {
            "id": structure_id(molecule, numbers, x),
            "molecule": molecule,
            "source": source,
            "index": i,
            "temperature_k": temperature,
            "numbers": np.asarray(numbers).tolist(),
            "positions": np.asarray(x).tolist(),
            "levels": {
                "teacher": {
                    "energy": float(energy),
                    "forces": np.asarray(forces).tolist(),
                    "wall_s": 0.0,
                    "attributes": {"method": "teacher", "model": teacher},
                }
            },
        }
        records.append(record)
    return records


def relabel(path, folder, teacher: str) -> pathlib.Path:
    """Every conformation of ``path`` labelled by ``teacher``, as an ANI file in
    ``folder`` (made once): what a student of the teacher is pretrained on, and replays."""
    from aniserve.models import load_model
    from aniserve.qmdata.records import read_h5, write_records

    digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:12]
    out = pathlib.Path(folder) / f"{pathlib.Path(path).stem}-{teacher}-{digest}.h5"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    labeller = load_model(teacher, dtype="float64")
    by_molecule: dict[str, list[dict]] = {}
    for r in read_h5(path):
        by_molecule.setdefault(r["molecule"], []).append(r)
    records = []
    for name, rs in sorted(by_molecule.items()):
        frames = [np.asarray(r["positions"], float) for r in sorted(rs, key=lambda r: r["index"])]
        # The file's name, not its path: byte-identical inputs give byte-identical outputs
        # (a cached student's key), wherever they lie.
        records += _labelled(labeller, teacher, name, np.asarray(rs[0]["numbers"]), frames, pathlib.Path(path).name)
    write_records(records, out)
    return out


def closest_distance(positions: np.ndarray) -> float:
    """The smallest interatomic distance of one structure, Å."""
    x = np.asarray(positions, float)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float(d.min())
