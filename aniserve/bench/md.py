"""``aniserve bench md``: is a model fit for molecular dynamics?

For each model, through the in-process ASE calculator (the serving path a user's MD
takes), on a molecule without a ring (ethanol) and one with (pyridine, a test molecule):

- **NVE** (velocity Verlet, 0.5 fs) from Maxwell–Boltzmann velocities at 300 K, in
  float64 and float32: the total energy's fluctuation (std) and drift (slope), per atom;
  seeds give each model the same start, so models are compared pair by pair;
- **stability** under a Langevin thermostat at 300 K and 1,000 K: bonds broken (a pair
  bonded at the start, by covalent radii, stretched past 1.6× its starting length), the
  closest approach of two atoms; and along the trajectory the calibrated spread ρ and
  the fraction of frames the model's stated collection threshold would flag;
- **harmonic frequencies** of water, HCN and formaldehyde at the model's minimum, against
  CCSD(T)/cc-pVDZ at its own (``aniserve.bench.frequencies``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib

import click
import numpy as np

from aniserve.bench import command as common

log = logging.getLogger(__name__)

#: ASE g2 names: a chain and an aromatic ring (pyridine is one of the test molecules).
MOLECULES = {"ethanol": "CH3CH2OH", "pyridine": "C5H5N"}
DEFAULT_MODELS = ("aniserve-1x-ccsdt", "ani-1x", "ani-1ccx")
TIMESTEP_FS = 0.5
BROKEN = 1.6  # × the starting length of a bonded pair


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: int = 2000  # per trajectory (1 ps)
    seeds: int = 3
    temperatures: tuple[float, ...] = (300.0, 1000.0)


FULL, QUICK = Plan(), Plan(steps=200, seeds=1)


def _start(name: str):
    """The molecule at the model's minimum would differ per model; all start from ASE's
    g2 geometry instead, so the runs of a seed are the same experiment for every model."""
    from ase.build import molecule

    return molecule(MOLECULES[name])


def _bonds(atoms) -> tuple[np.ndarray, np.ndarray]:
    from ase.data import covalent_radii

    d = atoms.get_all_distances()
    radii = covalent_radii[atoms.numbers]
    i, j = np.nonzero(np.triu(d < 1.25 * (radii[:, None] + radii[None, :]), 1))
    return np.stack([i, j], 1), d[i, j]


def _calculator(model, dtype: str, collect=None):
    from aniserve.calculator import ANICalculator

    return ANICalculator(model, dtype=dtype, collect=collect)


def nve(model, name: str, dtype: str, seed: int, steps: int) -> dict:
    from ase import units
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    from aniserve.learn import thermalize

    atoms = _start(name)
    atoms.calc = _calculator(model, dtype)
    thermalize(atoms, 300, np.random.default_rng(seed))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
    totals = []
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    per_atom = np.array(totals) / len(atoms) / units.kcal * units.mol  # kcal/mol per atom
    time_ps = np.arange(len(per_atom)) * TIMESTEP_FS / 1000
    return {
        "fluctuation_kcal_per_atom": float(per_atom.std()),
        "drift_kcal_per_atom_per_ps": float(np.polyfit(time_ps, per_atom, 1)[0]),
    }


def thermal(model, name: str, temperature: float, seed: int, steps: int) -> dict:
    import tempfile

    from aniserve.collect import Collector

    atoms = _start(name)
    # The collector `drive --collect-relative` runs, at the threshold the model states
    # (the absolute ρ below is `drive --collect`'s); what it writes is not kept.
    with tempfile.TemporaryDirectory() as scratch:
        relative = Collector(pathlib.Path(scratch) / "collected.extxyz", relative=True)
        return _thermal(model, atoms, relative, temperature, seed, steps)


def _thermal(model, atoms, relative, temperature: float, seed: int, steps: int) -> dict:
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    from aniserve.collect import stated_threshold
    from aniserve.learn import thermalize

    calc = _calculator(model, "float64", collect=relative)
    atoms.calc = calc
    pairs, lengths = _bonds(atoms)
    thermalize(atoms, temperature, np.random.default_rng(seed))
    # The centre of mass held by a constraint, not by Langevin's fixcm (which ASE 3.28
    # deprecates: it does not sample the NVT distribution exactly, most visibly for
    # small systems such as these).
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms,
        TIMESTEP_FS * units.fs,
        temperature_K=temperature,
        friction=0.01 / units.fs,
        rng=np.random.default_rng(seed),
        fixcm=False,
    )
    rho, broken, closest = [], set(), math.inf
    n = len(atoms)

    def observe():
        nonlocal closest
        d = atoms.get_all_distances()
        stretched = d[pairs[:, 0], pairs[:, 1]] > BROKEN * lengths
        broken.update(map(tuple, pairs[stretched].tolist()))
        closest = min(closest, float(d[np.triu_indices(n, 1)].min()))
        rho.append(calc.results["energy_std"] / units.kcal * units.mol / math.sqrt(n))

    dyn.attach(observe, interval=1)
    dyn.run(steps)
    threshold = stated_threshold(calc.model)
    values = np.array(rho)
    return {
        "broken_bonds": len(broken),
        "closest_approach_a": closest,
        "rho_mean_kcal": float(values.mean()),
        "flagged_fraction": float((values > threshold).mean()),
        "threshold_kcal": threshold,
        "flagged_fraction_relative": relative.fraction,
        "threshold_relative_kcal": stated_threshold(calc.model, relative=True),
    }


def frequency_errors(model) -> dict:
    import json

    from aniserve.bench.frequencies import CC_REFERENCE, model_frequencies

    reference = json.loads(CC_REFERENCE.read_text())["molecules"]
    out: dict = {}
    for name, ref in reference.items():
        start = np.array(ref["minimum_angstrom"])
        _, values = model_frequencies(model, np.array(ref["numbers"]), start)
        out[name] = {
            "wavenumbers_cm1": values.round(1).tolist(),
            "mae_cm1": float(np.mean(np.abs(values - np.array(ref["wavenumbers_cm1"])))),
        }
    out["mae_cm1"] = float(np.mean([v["mae_cm1"] for v in out.values()]))
    return out


def run(models, plan: Plan, molecules=tuple(MOLECULES)) -> dict:
    from aniserve.models import load_model

    result: dict = {"plan": dataclasses.asdict(plan), "timestep_fs": TIMESTEP_FS, "models": {}}
    for name in models:
        loaded = {dtype: load_model(name, dtype=dtype) for dtype in ("float64", "float32")}
        per: dict = {"molecules": {}}
        for molecule in molecules:
            entry: dict = {}
            for dtype in ("float64", "float32"):
                runs = [nve(loaded[dtype], molecule, dtype, seed, plan.steps) for seed in range(plan.seeds)]
                entry[f"nve_{dtype}"] = runs
                fluctuations = [round(r["fluctuation_kcal_per_atom"], 5) for r in runs]
                log.info(f"{name} {molecule} NVE {dtype}: fluctuation {fluctuations}")
            for temperature in plan.temperatures:
                runs = [
                    thermal(loaded["float64"], molecule, temperature, seed, plan.steps) for seed in range(plan.seeds)
                ]
                entry[f"langevin_{temperature:.0f}k"] = runs
                log.info(
                    f"{name} {molecule} {temperature:.0f} K: flagged {[r['flagged_fraction'] for r in runs]}, "
                    f"relative {[r['flagged_fraction_relative'] for r in runs]}"
                )
            per["molecules"][molecule] = entry
        per["frequencies"] = frequency_errors(loaded["float64"])
        result["models"][name] = per
    return result


def _mean(runs, key) -> float:
    return float(np.mean([r[key] for r in runs]))


def table(result: dict) -> str:
    temps = [f"{t:.0f}k" for t in result["plan"]["temperatures"]]
    head = (
        f"{'model':20s} {'molecule':9s} {'NVE σ64':>8s} {'NVE σ32':>8s} {'drift64':>8s} "
        + " ".join(
            f"{'broken ' + t:>11s} {'closest ' + t:>12s} {'ρ ' + t:>7s} {'flag ' + t:>9s} {'rel ' + t:>9s}"
            for t in temps
        )
        + f" {'freq MAE':>8s}"
    )
    lines = [head]
    for model, per in result["models"].items():
        for molecule, e in per["molecules"].items():
            cells = [
                f"{model:20s} {molecule:9s} {_mean(e['nve_float64'], 'fluctuation_kcal_per_atom'):8.5f} "
                f"{_mean(e['nve_float32'], 'fluctuation_kcal_per_atom'):8.5f} "
                f"{_mean(e['nve_float64'], 'drift_kcal_per_atom_per_ps'):8.5f}"
            ]
            for t in temps:
                runs = e[f"langevin_{t}"]
                cells.append(
                    f"{sum(r['broken_bonds'] for r in runs):11d} {min(r['closest_approach_a'] for r in runs):12.3f} "
                    f"{_mean(runs, 'rho_mean_kcal'):7.3f} {_mean(runs, 'flagged_fraction'):9.3f} "
                    f"{_mean(runs, 'flagged_fraction_relative'):9.3f}"
                )
            cells.append(f"{per['frequencies']['mae_cm1']:8.1f}")
            lines.append(" ".join(cells))
    lines.append(
        "NVE σ: std of the total energy per atom (kcal/mol), drift per atom per ps, means over seeds; broken: bonds "
        "stretched past 1.6× (all seeds); closest: Å; ρ: calibrated spread per √atom (kcal/mol); flag: the fraction "
        "of frames above the model's stated threshold; rel: the same for ρ relative to the trajectory's first frame "
        "(drive --collect-relative); freq MAE: harmonic wavenumbers against CCSD(T)/cc-pVDZ, cm⁻¹"
    )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    molecules = list(next(iter(result["models"].values()))["molecules"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / len(models)
    x = np.arange(len(molecules))
    for i, model in enumerate(models):
        per = result["models"][model]["molecules"]
        axes[0].bar(
            x + i * width,
            [_mean(per[m]["nve_float64"], "fluctuation_kcal_per_atom") for m in molecules],
            width,
            label=model,
        )
        axes[1].bar(
            x + i * width, [_mean(per[m]["langevin_300k"], "flagged_fraction") for m in molecules], width, label=model
        )
    axes[0].set(xticks=x + 0.4 - width / 2, xticklabels=molecules, ylabel="NVE total-energy std per atom, kcal/mol")
    axes[1].set(xticks=x + 0.4 - width / 2, xticklabels=molecules, ylabel="frames flagged at 300 K (stated threshold)")
    names = [m for m in next(iter(result["models"].values()))["frequencies"] if m != "mae_cm1"]
    for i, model in enumerate(models):
        f = result["models"][model]["frequencies"]
        axes[2].bar(np.arange(len(names)) + i * width, [f[n]["mae_cm1"] for n in names], width, label=model)
    axes[2].set(
        xticks=np.arange(len(names)) + 0.4 - width / 2, xticklabels=names, ylabel="frequency MAE vs CCSD(T), cm⁻¹"
    )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("md")
@click.option(
    "--model",
    "models",
    multiple=True,
    help=f"Model name or path; repeat for several (default: {', '.join(DEFAULT_MODELS)}).",
)
@click.option("--quick", is_flag=True, help=f"{QUICK.steps} steps per trajectory, one seed: about a minute per model.")
@click.option("--steps", default=None, type=int, help=f"Steps per trajectory (default {FULL.steps}, 0.5 fs each).")
@common.seeds_option
@common.json_option()
@common.plot_option()
def command(models, quick, steps, seeds, json_out, plot_out):
    """Fitness for molecular dynamics: NVE energy conservation (float64 and float32),
    stability and spread at 300 K and 1,000 K, harmonic frequencies against CCSD(T).

    Example: aniserve bench md --json data/bench-md.json --plot data/bench-md.png
    """
    plan = QUICK if quick else FULL
    plan = dataclasses.replace(plan, steps=steps or plan.steps, seeds=seeds or plan.seeds)
    result = run(models or DEFAULT_MODELS, plan)
    common.finish(result, table(result), json_out, plot_out, plot)
