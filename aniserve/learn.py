"""``aniserve learn``: the active-learning loop a user runs on their own system.

Each iteration, in its own folder ``iter-NNN``:

1. **explore**: Langevin MD of the structure with the current model (ASE, in-process,
   the same evaluation the server runs), at each temperature; every ``interval`` steps a
   frame, with the committee's calibrated spread per √atoms ρ and its force deviation
   (the largest per-atom spread of the members' forces).  A frame is *collected* when ρ
   exceeds the base model's stated threshold for it (``collect.stated_threshold``); ρ is
   measured with the base model's calibration scale in every iteration, so the collected
   fraction is one yardstick throughout, and on energies relative to the starting
   structure (``_score``), which a calibrated model states its own threshold for.
2. **select**: up to ``per_iteration`` of the collected frames, by a registry selection
   strategy (default ``band-fps``: trust band of force deviation, farthest-point choice on
   the frames' mean AEVs); none collected ends the loop (below ``stop_fraction`` too).
3. **label**: PySCF at ``level`` on Dask (``data label``'s machinery), or a teacher model
   (labels that cost nothing, for trying the loop out and for benchmarks).  Records are
   journaled one by one: a killed run loses no finished label.
4. **train**: the last iteration's model (the base, transferred by ``delta`` by default,
   in the first) trained on every label so far, energies and forces; validation on a
   fixed fifth of each iteration's labels.

Before the first iteration, ``held-out`` frames (MD of the base model with another seed,
both temperatures) are labelled once: each iteration reports its model's error on them.
Every stage writes its outputs, then a marker (``*.json``) atomically: rerunning the same
command after an interruption, even ``kill -9``, resumes where it stopped.  The summary
(``summary.json``, a table, ``summary.png``) lists per iteration the collected fraction,
the committee's spread and the held-out errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any

import numpy as np

from aniserve.collect import max_force_spread, relative_rho, stated_threshold
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

log = logging.getLogger(__name__)

#: One record in VALIDATION_EVERY of each iteration's labels validates the training.
VALIDATION_EVERY = 5


@dataclasses.dataclass
class Plan:
    structure: str  # a file ASE reads (its first frame)
    model: str  # the base model: name or path
    out: str  # the run's folder
    level: str | None = None  # METHOD/BASIS for PySCF labels
    teacher: str | None = None  # or a model whose energies and forces are the labels
    temperatures: tuple[float, ...] = (300.0, 1000.0)
    steps: int = 400  # MD steps per temperature and iteration
    interval: int = 10  # steps between frames
    timestep_fs: float = 0.5
    per_iteration: int = 16
    iterations: int = 8
    stop_fraction: float = 0.05
    held_out: int = 12  # frames per temperature
    strategy: str = "band-fps"
    transfer: str = "delta"
    epochs: int = 60
    force_weight: float = 1.0
    seed: int = 0
    workers: int = 1
    threads: int = 1

    def __post_init__(self):
        if (self.level is None) == (self.teacher is None):
            raise ValueError("give the labels' level (--level METHOD/BASIS) or a teacher model (--teacher), not both")
        positive = {k: getattr(self, k) for k in ("steps", "interval", "per_iteration", "iterations", "epochs")}
        bad = [k for k, v in positive.items() if v < 1]
        if bad or not self.temperatures or min(self.temperatures) <= 0 or self.held_out < 2:
            raise ValueError(
                f"steps, interval, per-iteration, iterations and epochs must be at least 1 ({', '.join(bad) or 'ok'}),"
                " temperatures positive and held-out frames at least 2"
            )
        self.temperatures = tuple(float(t) for t in self.temperatures)


def run(plan: Plan) -> dict:
    """Run (or resume) the loop; returns the summary."""
    folder = pathlib.Path(plan.out)
    folder.mkdir(parents=True, exist_ok=True)
    _check_same_plan(folder, plan)
    atoms = _read_structure(plan.structure)
    labeller = _labeller(plan)
    # One yardstick for every iteration: the base model's calibration scale and stated
    # threshold (a fine-tune's own, fitted on a few validation labels, would move it).
    base = _load(plan.model)
    yardstick = (base.energy_std_scale, stated_threshold(base, relative=True))
    held = folder / "held-out"
    if not (held / "done.json").exists():
        held.mkdir(exist_ok=True)
        frames = _explore(base, atoms, plan, plan.seed + 1000, yardstick, frames_per_temperature=plan.held_out)
        _label(labeller, frames, held / "labels.h5", name="held-out")
        _mark(held / "done.json", {"frames": len(frames)})
    held_records = _records(held / "labels.h5")
    rows: list[dict] = []
    model_path: str = plan.model
    labels = 0
    for i in range(plan.iterations):
        here = folder / f"iter-{i:03d}"
        here.mkdir(exist_ok=True)
        model = _load(model_path)
        explored = _stage(here / "explore.json", lambda: _explore_stage(model, atoms, plan, yardstick, here))
        row = {"iteration": i, "model": str(model_path), "labels": labels, **explored}
        row.update(_errors(model, held_records, labeller))
        if explored["collected_fraction"] < plan.stop_fraction or not explored["collected"]:
            row["stopped"] = f"collected fraction {explored['collected_fraction']:.3f} below {plan.stop_fraction}"
            rows.append(row)
            break
        selected = _stage(here / "select.json", lambda: _select_stage(model, here, plan, i))
        _stage(here / "label.json", lambda: _label_stage(labeller, here, selected))
        trained = _stage(here / "train.json", lambda: _train_stage(folder, i, plan, labeller))
        labels = trained["labels"]
        row.update(labels=labels, trained=trained["model"])
        rows.append(row)
        model_path = trained["model"]
    else:  # every iteration trained: the last model's figures
        model = _load(model_path)
        last = _explore_stage(model, atoms, plan, yardstick, None)
        final = {"iteration": plan.iterations, "model": model_path, "labels": labels}
        rows.append({**final, **last, **_errors(model, held_records, labeller)})
    summary = {"plan": dataclasses.asdict(plan), "labels": labeller.describe(), "iterations": rows}
    _atomic_write(folder / "summary.json", json.dumps(summary, indent=1, default=float))
    plot(summary, folder / "summary.png")
    return summary


# ---------------------------------------------------------------- the stages
def _explore_stage(model, atoms, plan: Plan, yardstick, here: pathlib.Path | None) -> dict:
    # The same MD seeds in every iteration (common random numbers), so that iterations
    # differ by their model alone: with a new seed each time, the collected fraction of
    # one model ranged from 0.01 to 1.0 (a trajectory crossing a barrier or not).
    frames = _explore(model, atoms, plan, plan.seed, yardstick, frames_per_temperature=None)
    if here is not None:
        _write_frames(frames, here / "explore.extxyz")
    rho = np.array([f.info["energy_std_per_sqrt_atom_kcal"] for f in frames])
    deviation = np.array([f.info["force_std_max_kcal_per_a"] for f in frames])
    collected = [bool(f.info["collected"]) for f in frames]
    per_temperature = {
        f"{t:g}": float(np.mean([c for c, f in zip(collected, frames) if f.info["temperature_k"] == t]))
        for t in plan.temperatures
    }
    return {
        "frames": len(frames),
        "collected": int(sum(collected)),
        "collected_fraction": float(np.mean(collected)),
        "collected_fraction_by_temperature": per_temperature,
        "threshold_kcal": float(frames[0].info["threshold_kcal"]),
        "mean_rho_kcal": float(rho.mean()),
        "mean_force_deviation_kcal_per_a": float(deviation.mean()),
    }


def _select_stage(model, here: pathlib.Path, plan: Plan, i: int) -> dict:
    from aniserve.registry import registry
    from aniserve.selection import Candidates, mean_aevs
    from aniserve.structures import read_structures

    frames = read_structures(here / "explore.extxyz")
    collected = [k for k, f in enumerate(frames) if f.info["collected"]]
    candidates = Candidates(
        force_deviation=np.array([frames[k].info["force_std_max_kcal_per_a"] for k in collected]),
        group=np.array([frames[k].info["temperature_k"] for k in collected]),
        descriptors=mean_aevs(model, [(frames[k].numbers, frames[k].positions) for k in collected]),
    )
    strategy = registry().get("selection-strategy", plan.strategy)()
    rng = np.random.default_rng([plan.seed, i])
    # The candidates are the collected frames, already above the threshold: a trust band
    # keeps them all but the top 1 % (likely unphysical); the strategy chooses among them.
    chosen = strategy.select(candidates, min(plan.per_iteration, len(collected)), rng, lower_percentile=0.0)
    picked = [collected[int(c)] for c in chosen]
    _write_frames([frames[k] for k in picked], here / "selected.extxyz")
    return {"selected": len(picked), "frames": picked}


def _label_stage(labeller, here: pathlib.Path, selected: dict) -> dict:
    from aniserve.structures import read_structures

    frames = read_structures(here / "selected.extxyz")
    _label(labeller, frames, here / "labels.h5", name=here.name)
    return {"labelled": len(_records(here / "labels.h5"))}


def _train_stage(folder: pathlib.Path, i: int, plan: Plan, labeller) -> dict:
    from aniserve.qmdata.records import write_records
    from aniserve.training import ANIData, Settings, continue_transfer
    from aniserve.training import train as fit

    here = folder / f"iter-{i:03d}"
    records = [r for j in range(i + 1) for r in _records(folder / f"iter-{j:03d}" / "labels.h5")]
    validation = [r for r in records if _validates(r["id"])]
    training = [r for r in records if not _validates(r["id"])]
    if not validation or not training:  # (one or two labels: the first validates, and trains if alone)
        validation, training = records[:1], records[1:] or records[:1]
    write_records(training, here / "train.h5")
    write_records(validation, here / "validation.h5")
    energy, forces = labeller.keys()
    settings = Settings(
        epochs=plan.epochs,
        batch_size=16,
        force_weight=plan.force_weight,
        seed=plan.seed,
        start_competes=True,
        early_stop_patience=max(10, plan.epochs // 4),
    )
    # Each iteration warm-starts from the last one's model: a new correction from random
    # weights every time made the committee's disagreement away from the labels vary
    # from one training to the next, and the collected fraction with it.
    start = str(folder / f"iter-{i - 1:03d}" / "model.safetensors") if i else plan.model
    model, penalty = continue_transfer(_load(start), plan.transfer, plan.seed)
    model.description["name"] = f"{pathlib.Path(plan.out).name}-iter-{i:03d}"
    out = here / "model.safetensors"
    fit(
        model,
        ANIData(here / "train.h5", energy, forces),
        out,
        settings,
        resume=out.with_name(out.name + ".ckpt").exists(),
        penalty=penalty,
        validation_data=ANIData(here / "validation.h5", energy, forces),
        extra={"learn": {"iteration": i, "labels": len(records), "from": start, "strategy": plan.transfer}},
    )
    return {"model": str(out), "labels": len(records), "training": len(training), "validation": len(validation)}


# ------------------------------------------------------------- exploration
def _explore(model, atoms, plan: Plan, seed: int, yardstick, frames_per_temperature: int | None) -> list:
    """Frames of Langevin MD at each temperature (every ``interval`` steps; with
    ``frames_per_temperature``, that many, evenly spread over the run), each with its
    spread and collection flag in ``info``, measured by ``yardstick`` (scale of the
    members' std, threshold on ρ)."""
    frames = []
    for k, temperature in enumerate(plan.temperatures):
        every = plan.interval if frames_per_temperature is None else max(1, plan.steps // frames_per_temperature)
        positions = langevin_frames(
            model, atoms.numbers, atoms.positions, temperature, plan.steps, every, [seed, k], plan.timestep_fs
        )
        if frames_per_temperature is not None:
            positions = positions[:frames_per_temperature]
        for step, x in enumerate(positions):
            frame = atoms.copy()
            frame.positions = x
            frame.info.update(temperature_k=temperature, step=(step + 1) * every, seed=seed)
            frames.append(frame)
    scale, threshold = yardstick
    _score(model, frames, scale, threshold, atoms)
    return frames


def langevin_frames(
    model, numbers, positions, temperature: float, steps: int, interval: int, seed, timestep_fs: float = 0.5
) -> list[np.ndarray]:
    """Positions (Å) every ``interval`` steps of Langevin MD (ASE, friction 0.02/fs,
    Maxwell–Boltzmann start, the served evaluation as the calculator), the start left
    out: the exploration of ``aniserve learn`` and of ``bench active --pool md``."""
    import ase
    from ase import units
    from ase.md.langevin import Langevin

    from aniserve.calculator import ANICalculator

    atoms = ase.Atoms(numbers=numbers, positions=positions)
    atoms.calc = ANICalculator(model)
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature, rng)
    step, friction = timestep_fs * units.fs, 0.02 / units.fs
    dynamics = Langevin(atoms, timestep=step, temperature_K=temperature, friction=friction, rng=rng, fixcm=False)
    frames: list[np.ndarray] = []
    dynamics.attach(lambda: frames.append(atoms.positions.copy()), interval=interval)
    dynamics.run(steps)
    return frames[1:]


def thermalize(atoms, temperature_k: float, rng) -> None:
    """Maxwell–Boltzmann momenta at ``temperature_k`` (ASE ≥ 3.29 names this
    ``thermalize_momenta`` and deprecates ``MaxwellBoltzmannDistribution``)."""
    from ase.md import velocitydistribution

    if hasattr(velocitydistribution, "thermalize_momenta"):
        velocitydistribution.thermalize_momenta(atoms, temperature_k, rng=rng)
    else:
        velocitydistribution.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)


def _score(model, frames, scale: float, threshold: float, start) -> None:
    """ρ and force deviation of each frame, and whether ρ exceeds ``threshold``.

    ρ is the members' spread of the frame's energy *relative to the starting structure*
    (``start``, each member's own energy there; × ``scale``, per √atoms): members that
    agree on every conformation but not on the molecule's energy zero do not doubt
    anything the dynamics feels, and a fine-tune on a few labels of one molecule leaves
    exactly such offsets (measured on formaldoxime: members ±3 kcal/mol apart in their
    zero after nine labels, their relative energies as close as before).  Relative to a
    fixed structure, not to the frames' mean: the mean moved with what an exploration
    happened to visit (one trajectory crossing a barrier raised every frame's ρ, at 300 K
    too: collected fractions 0.01 to 1.0 for one model, by the MD's seed)."""
    numbers = np.stack([start.numbers] + [f.numbers for f in frames])
    positions = np.stack([start.positions] + [f.positions for f in frames])
    result = model.evaluate(numbers, positions, member_forces=True)
    force_std = max_force_spread(result.member_forces[1:])
    rho = relative_rho(result.member_energies[1:], result.member_energies[0], scale, numbers.shape[1])
    for f, r, d in zip(frames, rho, force_std):
        f.info.update(
            energy_std_per_sqrt_atom_kcal=float(r),
            force_std_max_kcal_per_a=float(d),
            threshold_kcal=threshold,
            collected=bool(r > threshold),
        )


# ------------------------------------------------------------------ labels
class PySCFLabels:
    """Labels at a PySCF level, computed on Dask by ``data label``'s machinery."""

    def __init__(self, level: str, workers: int, threads: int):
        from aniserve.qmdata.levels import Level

        self.level, self.workers, self.threads = Level.parse(level), workers, threads

    def keys(self) -> tuple[str, str]:
        return f"{self.level.key}.energy", f"{self.level.key}.forces"

    def describe(self) -> dict:
        return {"level": f"{self.level.method}/{self.level.basis}"}

    def label(self, structures: list[dict], out: pathlib.Path) -> None:
        from aniserve.qmdata.label import tasks
        from aniserve.qmdata.schedule import run_job

        summary = run_job(tasks(structures, self.level, True), out, workers=self.workers, threads=self.threads)
        if summary is not None and summary.failures:
            raise RuntimeError(f"{len(summary.failures)} labels failed: {summary.failures}")


class TeacherLabels:
    """A teacher model's energies and forces as labels (free: for trying the loop out
    and for benchmarks)."""

    def __init__(self, teacher: str):
        self.name = teacher
        self._model: Any = None

    def keys(self) -> tuple[str, str]:
        return "teacher.energy", "teacher.forces"

    def describe(self) -> dict:
        return {"teacher": self.name}

    def label(self, structures: list[dict], out: pathlib.Path) -> None:
        from aniserve.qmdata.records import Journal, build, done_levels

        if self._model is None:
            self._model = _load(self.name, "float64")
        teacher = self._model
        journal = Journal(out.with_suffix(".work"))
        done = done_levels(journal, out)
        for s in structures:
            if "teacher" in done.get(s["id"], set()):
                continue
            result = teacher.evaluate(np.array(s["numbers"]), np.array(s["positions"]))
            level = {"energy": float(result.energy), "forces": result.forces.tolist(), "wall_s": 0.0}
            level["attributes"] = {"method": "teacher", "model": self.name}
            journal.write({**_record_head(s), "levels": {"teacher": level}})
        build(journal, out)


def _labeller(plan: Plan):
    return PySCFLabels(plan.level, plan.workers, plan.threads) if plan.level else TeacherLabels(str(plan.teacher))


def _label(labeller, frames, out: pathlib.Path, name: str) -> None:
    structures = []
    for index, frame in enumerate(frames):
        order = np.argsort(-frame.numbers, kind="stable")  # the ANI layout's atom order
        s = {
            "name": name,
            "source": f"aniserve learn {name}",
            "index": index,
            "temperature_k": float(frame.info.get("temperature_k", float("nan"))),
            "numbers": frame.numbers[order].tolist(),
            "positions": frame.positions[order].tolist(),
        }
        s["id"] = _record_id(s)
        structures.append(s)
    labeller.label(structures, out)


def _record_id(s: dict) -> str:
    from aniserve.qmdata.label import structure_id

    return structure_id(s["name"], s["numbers"], s["positions"])


def _record_head(s: dict) -> dict:
    return {k: s[k] for k in ("id", "source", "index", "temperature_k", "numbers", "positions")} | {
        "molecule": s["name"]
    }


def _validates(record_id: str) -> bool:
    return int(hashlib.sha256(record_id.encode()).hexdigest(), 16) % VALIDATION_EVERY == 0


def _records(path: pathlib.Path) -> list[dict]:
    from aniserve.qmdata.records import read_h5

    return read_h5(path) if path.exists() else []


# ------------------------------------------------------------------ errors
def _errors(model, records: list[dict], labeller) -> dict:
    """The model's error on the held-out frames: energies relative to their mean (the
    conformer RMSE, blind to a constant offset), kcal/mol, and forces, kcal/mol/Å."""
    energy_key, forces_key = (k.split(".")[0] for k in labeller.keys())
    usable = [r for r in records if energy_key in r["levels"]]
    if not usable:
        return {}
    numbers = np.stack([r["numbers"] for r in usable])
    positions = np.stack([r["positions"] for r in usable])
    result = model.evaluate(numbers, positions)
    reference = np.array([r["levels"][energy_key]["energy"] for r in usable])
    error = (np.asarray(result.energy) - reference) * HARTREE_IN_KCAL_PER_MOL
    forces = np.stack([np.asarray(r["levels"][energy_key]["forces"], float) for r in usable])
    force_error = (result.forces - forces) * HARTREE_IN_KCAL_PER_MOL
    return {
        "held_out_frames": len(usable),
        "held_out_conformer_rmse_kcal": float(np.sqrt(np.mean((error - error.mean()) ** 2))),
        "held_out_force_rmse_kcal_per_a": float(np.sqrt(np.mean(force_error**2))),
    }


# ---------------------------------------------------------------- plumbing
def _stage(marker: pathlib.Path, work) -> dict:
    """A stage's result: read from its marker when done, else computed and marked."""
    if marker.exists():
        return json.loads(marker.read_text())
    result = work()
    _mark(marker, result)
    return result


def _mark(path: pathlib.Path, content: dict) -> None:
    _atomic_write(path, json.dumps(content, indent=1, default=float))


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_same_plan(folder: pathlib.Path, plan: Plan) -> None:
    """A resumed run must be the same run: a folder started with other settings is refused."""
    saved = folder / "plan.json"
    mine = dataclasses.asdict(plan)
    mine["temperatures"] = list(mine["temperatures"])
    if saved.exists():
        theirs = json.loads(saved.read_text())
        changed = sorted(k for k in mine if k not in ("workers", "threads") and theirs.get(k) != mine[k])
        if changed:
            raise ValueError(
                f"{folder} holds a run with other settings ({', '.join(changed)}): resume it with the same "
                "command, or give another --out"
            )
    else:
        _atomic_write(saved, json.dumps(mine, indent=1))


def _read_structure(path: str):
    from aniserve.structures import read_structures

    atoms = read_structures(path)[0]
    if atoms.pbc.any():
        raise ValueError(f"{path}: aniserve learn explores isolated molecules; this structure is periodic")
    return atoms


def _load(name: str, dtype: str = "float32"):
    from aniserve.models import load_model

    return load_model(name, dtype=dtype)


def _write_frames(frames, path: pathlib.Path) -> None:
    import ase.io

    tmp = path.with_name(f".{path.name}.tmp")
    ase.io.write(tmp, frames, format="extxyz")
    os.replace(tmp, path)


def table(summary: dict) -> str:
    lines = [
        f"{'iteration':>9s} {'frames':>6s} {'collected':>9s} {'mean ρ':>7s} {'force dev':>9s} {'labels':>6s} "
        f"{'held-out E':>10s} {'held-out F':>10s}",
        f"{'':>9s} {'':>6s} {'fraction':>9s} {'kcal':>7s} {'kcal/Å':>9s} {'so far':>6s} {'kcal/mol':>10s} "
        f"{'kcal/mol/Å':>10s}",
    ]
    for r in summary["iterations"]:
        lines.append(
            f"{r['iteration']:9d} {r['frames']:6d} {r['collected_fraction']:9.3f} {r['mean_rho_kcal']:7.3f} "
            f"{r['mean_force_deviation_kcal_per_a']:9.2f} {r.get('labels', 0):6d} "
            f"{r.get('held_out_conformer_rmse_kcal', float('nan')):10.3f} "
            f"{r.get('held_out_force_rmse_kcal_per_a', float('nan')):10.2f}"
        )
    lines.append(
        "collected: frames whose spread ρ = σ_E/√N, of the energy relative to the starting structure, exceeds the "
        "threshold the base model states for it; held-out: the error of the iteration's model (before its "
        "training) on labelled MD frames set aside at the start"
    )
    return "\n".join(lines)


def plot(summary: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no summary plot")
        return
    rows = summary["iterations"]
    x = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(x, [r["collected_fraction"] for r in rows], "o-")
    axes[0].set(xlabel="iteration", ylabel="collected fraction", title="frames the committee flags")
    axes[1].plot(x, [r.get("held_out_force_rmse_kcal_per_a", np.nan) for r in rows], "o-")
    axes[1].set(xlabel="iteration", ylabel="kcal/mol/Å", title="held-out force RMSE")
    axes[2].plot(x, [r.get("held_out_conformer_rmse_kcal", np.nan) for r in rows], "o-")
    axes[2].set(xlabel="iteration", ylabel="kcal/mol", title="held-out conformer RMSE")
    fig.suptitle(f"aniserve learn: {summary['plan']['structure']} from {summary['plan']['model']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
