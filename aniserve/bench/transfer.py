"""``aniserve bench transfer``: the ANI-1ccx experiment in miniature.

1. Pretrain an ensemble on the low level (ωB97X/6-31G* energies and forces) of the
   training molecules — cached, so every strategy starts from the same weights.
2. Apply every transfer strategy on the high-level (CCSD(T)/cc-pVDZ) subset of the same
   molecules, same budget and seeds.
3. Score on the held-out, larger test molecules against CCSD(T).

Baselines: the DFT method itself, and the DFT-trained model; both get their energy zero
moved to the CCSD(T) level by per-element offsets fitted on the high-level training
data (what every transferred model gets from its self-energy refit), which leaves their
relative conformer energies untouched.

Conformer errors are of energies relative to each test molecule's mean:
(E_i − ⟨E⟩_mol) − (E_i^ref − ⟨E^ref⟩_mol).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aniserve.bench.progress import Runs, say
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

if TYPE_CHECKING:
    from aniserve.potential import ANIPotential

LOW_ENERGY, LOW_FORCES, HIGH_ENERGY = "wb97x_631gd.energy", "wb97x_631gd.forces", "ccsd(t)_ccpvdz.energy"
HIGH_FORCES = "ccsd(t)_ccpvdz.forces"


@dataclasses.dataclass
class Budget:
    pretrain_epochs: int
    transfer_epochs: int
    seeds: tuple[int, ...]
    ensemble_size: int
    hidden: tuple[int, ...] = (64, 48, 24)
    batch_size: int = 32
    lr: float = 1e-3
    transfer_lr: float | None = None  # default: lr
    force_weight: float = 0.1  # of the DFT force loss in pretraining
    patience: int = 30  # epochs without validation improvement before stopping
    selection: str = "loss"  # of the transfer runs: "loss" or "conformer" (trainer Settings.selection)

    def pretraining(self) -> dict:
        """The fields that decide the pretrained model (its cache key)."""
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("transfer_epochs", "transfer_lr", "seeds")
        }


#: Chosen on the session-3 data snapshot (docs/notebook.md, "What we tried"): batches of 8 and a
#: force weight of 1 gave the best DFT model; larger force weights and smaller networks
#: did worse, and a 10× smaller transfer learning rate barely moved the models.
FULL = Budget(
    pretrain_epochs=400,
    transfer_epochs=400,
    seeds=(0, 1, 2),
    ensemble_size=4,
    batch_size=8,
    force_weight=1.0,
    patience=60,
)
QUICK = Budget(pretrain_epochs=12, transfer_epochs=12, seeds=(0,), ensemble_size=2, hidden=(32, 16, 8))
#: From a given base model (``--base``): no pretraining; ensemble size and networks are
#: the base's own.  Epochs are picked (and training stopped) on the validation molecules'
#: conformer RMSE: chosen by 5-fold cross-validation over the *training* molecules
#: (docs/notebook.md, "What we tried"), where it beat selection on the validation loss for Δ-learning
#: from ANI-1x (0.90 against 1.09 kcal/mol; ANI-1x itself 1.13).
BASE_FULL = Budget(
    pretrain_epochs=0,
    transfer_epochs=60,
    seeds=(0, 1, 2),
    ensemble_size=0,
    batch_size=16,
    lr=1e-3,
    patience=15,
    selection="conformer",
)
BASE_QUICK = Budget(
    pretrain_epochs=0, transfer_epochs=4, seeds=(0,), ensemble_size=0, batch_size=32, patience=4, selection="conformer"
)


@dataclasses.dataclass
class TestSet:
    """High-level test conformations with their DFT values, in a fixed order; forces
    NaN where not computed (CCSD(T) forces exist for some conformations only)."""

    numbers: list[np.ndarray]
    positions: list[np.ndarray]
    molecule: np.ndarray
    high: np.ndarray
    low: np.ndarray
    low_forces: list[np.ndarray]
    high_forces: list[np.ndarray]


def read_test_set(path) -> TestSet:
    import h5py

    out = TestSet([], [], np.array([]), np.array([]), np.array([]), [], [])
    molecule, high, low = [], [], []
    with h5py.File(path, "r") as f:
        for name in sorted(f):
            g = f[name]
            if HIGH_ENERGY not in g:  # a group without the high level has nothing to test
                continue
            keep = np.nonzero(np.isfinite(g[HIGH_ENERGY][()]))[0]
            names = [m.decode() for m in g["molecule"][keep]] if "molecule" in g else [name] * len(keep)
            for row, c in enumerate(keep):
                out.numbers.append(g["atomic_numbers"][()])
                out.positions.append(g["coordinates"][c])
                molecule.append(names[row])
                high.append(g[HIGH_ENERGY][c])
                low.append(g[LOW_ENERGY][c] if LOW_ENERGY in g else np.nan)
                missing = np.full((len(g["atomic_numbers"]), 3), np.nan)
                out.low_forces.append(g[LOW_FORCES][c] if LOW_FORCES in g else missing)
                out.high_forces.append(g[HIGH_FORCES][c] if HIGH_FORCES in g else missing)
    out.molecule, out.high, out.low = np.array(molecule), np.array(high), np.array(low)
    if not len(out.high):
        raise ValueError(f"{path}: no conformation has {HIGH_ENERGY}")
    return out


def metrics(predicted: np.ndarray, test: TestSet, forces=None, std=None) -> dict:
    """kcal/mol (forces kcal/mol/Å) errors against CCSD(T); forces against CCSD(T) where
    the test set has them (with their count, and by element), and against DFT."""
    error = (predicted - test.high) * HARTREE_IN_KCAL_PER_MOL
    relative = np.empty_like(error)
    for mol in np.unique(test.molecule):
        sel = test.molecule == mol
        relative[sel] = error[sel] - error[sel].mean()
    per_molecule = [mol for mol in np.unique(test.molecule) if (test.molecule == mol).sum() > 1]
    conf = np.concatenate([relative[test.molecule == m] for m in per_molecule]) if per_molecule else np.zeros(0)
    by_molecule = {m: float(np.sqrt(np.mean(relative[test.molecule == m] ** 2))) for m in per_molecule}
    out = {
        "conformer_rmse_kcal": float(np.sqrt(np.mean(conf**2))) if len(conf) else float("nan"),
        "conformer_mae_kcal": float(np.mean(np.abs(conf))) if len(conf) else float("nan"),
        "total_rmse_kcal": float(np.sqrt(np.mean(error**2))),
        "test_conformations": int(len(error)),
        "test_molecules": int(len(np.unique(test.molecule))),
        "conformer_rmse_by_molecule": by_molecule,
    }
    if forces is not None:
        diff = np.concatenate([(f - r).ravel() for f, r in zip(forces, test.low_forces)])
        diff = diff[np.isfinite(diff)]
        if len(diff):
            out["force_rmse_vs_dft_kcal_per_a"] = float(np.sqrt(np.mean(diff**2)) * HARTREE_IN_KCAL_PER_MOL)
        out.update(_cc_force_errors(forces, test))
    if std is not None:
        out["mean_ensemble_std_kcal"] = float(np.mean(std) * HARTREE_IN_KCAL_PER_MOL)
    return out


def _cc_force_errors(forces, test: TestSet) -> dict:
    """Force RMSE against CCSD(T) over the test conformations that have CCSD(T) forces,
    overall and by element (kcal/mol/Å), and how many conformations that is."""
    from aniserve.elements import symbol

    have = [i for i, ref in enumerate(test.high_forces) if np.isfinite(ref).all()]
    if not have:
        return {}
    diff = np.concatenate([forces[i] - test.high_forces[i] for i in have]) * HARTREE_IN_KCAL_PER_MOL
    numbers = np.concatenate([test.numbers[i] for i in have])
    return {
        "force_rmse_vs_cc_kcal_per_a": float(np.sqrt(np.mean(diff**2))),
        "cc_force_conformations": len(have),
        "force_rmse_vs_cc_by_element": {
            symbol(int(z)): float(np.sqrt(np.mean(diff[numbers == z] ** 2))) for z in np.unique(numbers)
        },
    }


def predict_test(model, test: TestSet):
    energies, forces, std = [], [], []
    for numbers, positions in zip(test.numbers, test.positions):
        result = model.evaluate(numbers, positions)
        energies.append(float(result.energy))
        forces.append(result.forces)
        std.append(float(result.energy_std))
    return np.array(energies), forces, np.array(std)


def score(model, test: TestSet) -> dict:
    energies, forces, std = predict_test(model, test)
    return metrics(energies, test, forces, std)


def element_offsets(train_path, test: TestSet, base=None) -> np.ndarray:
    """Per-element offsets (E_high − E_base ≈ Σ n_e c_e) fitted on the training files'
    high-level conformations, evaluated for each test conformation.  E_base is the low
    level, or ``base(numbers, positions)`` (Hartree) when given."""
    import h5py

    from aniserve.training.data import data_paths

    rows, y, elements = [], [], sorted({int(z) for n in test.numbers for z in n})
    files = [h5py.File(path, "r") for path in data_paths(train_path)]
    try:
        groups = [g for f in files for g in f.values()]
        elements = sorted(set(elements) | {int(z) for g in groups for z in g["atomic_numbers"][()]})
        for g in groups:
            if HIGH_ENERGY not in g:
                continue
            numbers = g["atomic_numbers"][()]
            known = np.isfinite(g[HIGH_ENERGY][()])
            if base is None:
                known &= np.isfinite(g[LOW_ENERGY][()])
            counts = [np.sum(numbers == z) for z in elements]
            for c in np.nonzero(known)[0]:
                rows.append(counts)
                reference = g[LOW_ENERGY][c] if base is None else base(numbers, g["coordinates"][c])
                y.append(g[HIGH_ENERGY][c] - reference)
    finally:
        for f in files:
            f.close()
    coef = np.linalg.lstsq(np.array(rows, float), np.array(y), rcond=None)[0]
    return np.array([sum(coef[elements.index(int(z))] for z in n) for n in test.numbers])


#: Released models scored on the same test points when their weights can be found.
OFFICIAL = {"ani-1x": "official ANI-1x", "ani-1ccx": "official ANI-1ccx"}


def official_baselines(train_path, test: TestSet) -> dict:
    """The released ANI-1x and ANI-1ccx (trained on millions of conformations) on the
    same test points: the scale of error a large data set buys.  ANI-1ccx targets
    CCSD(T)*/CBS, not cc-pVDZ, so each gets per-element offsets fitted like the DFT
    method's; conformer energies are untouched by them."""
    from aniserve.models import ModelNotFoundError, load_model

    out = {}
    for name in OFFICIAL:
        try:
            model = load_model(name, dtype="float64")
        except ModelNotFoundError:
            _say(f"official {name} not found (set ANISERVE_MODEL_DIR): its baseline row is left out")
            continue
        out[name] = score_with_offsets(model, train_path, test)
    return out


def score_with_offsets(model, train_path, test: TestSet) -> dict:
    """A fixed model's test errors after per-element offsets to the high level (fitted on
    the training set's high-level points), and its reaction-energy errors."""
    from aniserve.bench import reactions

    energies, forces, std = predict_test(model, test)
    offsets = element_offsets(train_path, test, lambda n, x: float(model.evaluate(n, x).energy))
    return {**metrics(energies + offsets, test, forces, std), "reactions": reactions.score(model)}


def _file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


_say = say


def pretrain(train_path, budget: Budget, workdir: pathlib.Path, seed: int) -> pathlib.Path:
    """The DFT model (cached by data hash, budget and seed; resumed if interrupted)."""
    from aniserve.training import ANIData, Settings, default_description, new_model, train
    from aniserve.training.data import data_paths

    hashes = [_file_hash(path) for path in data_paths(train_path)]
    # One file keeps the key it had before several were allowed, so cached models stay valid.
    key = hashlib.sha256(
        json.dumps([hashes[0] if len(hashes) == 1 else hashes, budget.pretraining(), seed]).encode()
    ).hexdigest()
    path = workdir / f"pretrained-{key[:16]}.safetensors"
    if path.exists():
        _say(f"pretrained model from cache: {path}")
        return path
    data = ANIData(train_path, LOW_ENERGY, LOW_FORCES)
    description = default_description(["H", "C", "N", "O"], budget.hidden, budget.ensemble_size, name="bench-dft")
    settings = Settings(
        epochs=budget.pretrain_epochs,
        batch_size=budget.batch_size,
        lr=budget.lr,
        seed=seed,
        force_weight=budget.force_weight,
        early_stop_patience=budget.patience,
        plateau_patience=max(1, budget.patience // 3),
    )
    _say(f"pretraining on {LOW_ENERGY} + forces, seed {seed} …")
    # An interrupted pretraining continues from its checkpoint (same data, budget and
    # seed: the key is in the name), exactly as if it had not stopped.
    train(new_model(description, seed), data, path, settings, resume=True)
    return path


def load_base(base: str) -> ANIPotential:
    """A fresh trainable float32 copy of the base model (name or path)."""
    from aniserve.models import load_model

    return load_model(base, dtype="float32")


def run(
    train_path, test_path, strategies: list[str] | None, budget: Budget, workdir, options=None, base: str | None = None
) -> dict:
    """Every strategy from the same starting point, scored on the test set.

    base: None for our own DFT pretraining on the training set's low level (cached per
    seed); otherwise a model name or path (``ani-1x``, a file) that every strategy starts
    from, with the base itself (plus per-element offsets) as the baseline."""
    from aniserve.bench import reactions
    from aniserve.modelfile import load_saved
    from aniserve.registry import registry
    from aniserve.training import ANIData, Settings, train, transfer_model
    from aniserve.training.trainer import fit_self_energies

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    strategies = strategies or registry().names("transfer-strategy")
    test = read_test_set(test_path)
    high = ANIData(train_path, HIGH_ENERGY)
    _say(
        f"data: {len(ANIData(train_path, LOW_ENERGY))} low-level and {len(high)} high-level training "
        f"conformations; {len(test.high)} test conformations of {len(np.unique(test.molecule))} molecules"
    )

    offsets = element_offsets(train_path, test)
    baselines = {
        "dft_method": {
            **metrics(test.low + offsets, test),
            **_cc_force_errors(test.low_forces, test),
            "reactions": reactions.dft_scores(),
        },
        **official_baselines(train_path, test),
    }
    per_strategy: dict[str, list] = {name: [] for name in strategies}
    dft_model_runs = []
    if base is not None:
        baselines["base_model"] = {
            **score_with_offsets(load_base(base).to(torch.float64), train_path, test),
            "name": str(base),
        }
    runs = Runs(len(budget.seeds) * len(strategies))
    for seed in budget.seeds:
        if base is None:
            pre_path = pretrain(train_path, budget, workdir, seed)
            dft_model = load_saved(pre_path).to(torch.float64)
            fit_self_energies(dft_model, high)
            dft_model_runs.append(score(dft_model, test))
            start_from, origin = (lambda: load_saved(pre_path)), pre_path.name
        else:
            start_from, origin = (lambda: load_base(base)), str(base)
        for name in strategies:
            started = time.perf_counter()
            model, penalty = transfer_model(start_from(), name, dict(options or {}), seed)
            out = workdir / f"{name}-seed{seed}.safetensors"
            settings = Settings(
                epochs=budget.transfer_epochs,
                batch_size=budget.batch_size,
                lr=budget.transfer_lr or budget.lr,
                seed=seed,
                early_stop_patience=budget.patience,
                plateau_patience=max(1, budget.patience // 3),
                selection=budget.selection,
            )
            runs.start(f"transfer: {name}, seed {seed} …")
            summary = train(
                model,
                high,
                out,
                settings,
                penalty=penalty,
                extra={"transfer": {"from": origin, "strategy": name, "options": options or {}}},
            )
            trained = load_saved(out).to(torch.float64).eval()
            result = score(trained, test)
            result["reactions"] = reactions.score(trained)
            result.update(
                seed=seed,
                seconds=round(time.perf_counter() - started, 1),
                validation_conformer_rmse_kcal=summary["validation_conformer_rmse_kcal"],
                trainable_parameters=summary["trainable_parameters"],
                model=str(out),
            )
            per_strategy[name].append(result)
    if dft_model_runs:
        baselines["dft_model"] = _aggregate(dft_model_runs)
    return {
        "base": str(base) if base is not None else "own DFT pretraining",
        "budget": dataclasses.asdict(budget),
        "train": str(high.path),
        "test": str(test_path),
        "strategies": [{"name": name, **_aggregate(runs), "runs": runs} for name, runs in per_strategy.items()],
        "baselines": baselines,
    }


def export_best(result: dict, path, name: str, card: str | None = None) -> dict:
    """Save the seed-0 model of the strategy with the lowest mean *validation* conformer
    RMSE (held-out training molecules; the test set plays no part in the choice, and
    seed 0 is fixed in advance) as ``name``, with its training record (less the per-epoch
    history) and its own test errors.  Returns the chosen strategy's row."""
    from aniserve.modelfile import load_saved, read_description, save_model

    best = min(result["strategies"], key=lambda s: np.nan_to_num(s["validation_conformer_rmse_kcal"], nan=np.inf))
    run = next(r for r in best["runs"] if r["seed"] == 0)
    training = {k: v for k, v in read_description(run["model"]).get("training", {}).items() if k != "history"}
    errors = {k: v for k, v in run.items() if k.endswith(("_kcal", "_kcal_per_a", "_by_molecule")) or k == "reactions"}
    extra: dict[str, Any] = {
        "training": training,
        "benchmark": {
            "base": result.get("base"),
            "train": result["train"],
            "test": result["test"],
            "strategy": best["name"],
            **errors,
        },
    }
    if card:
        extra["card"] = card
    save_model(load_saved(run["model"]), path, name, extra)
    return best


def budget_for(from_base: bool, quick: bool, seeds: int | None = None, overrides: dict | None = None) -> Budget:
    """The budget a run uses: full or quick, from an official base or own pretraining,
    with ``seeds`` seeds and any fields overridden (ValueError naming unknown ones)."""
    budget = (BASE_QUICK if quick else BASE_FULL) if from_base else (QUICK if quick else FULL)
    if seeds:
        budget = dataclasses.replace(budget, seeds=tuple(range(seeds)))
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(budget)} - {"seeds"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown budget field(s) {sorted(unknown)}; known: {sorted(fields)}")
    if "hidden" in overrides:
        overrides["hidden"] = tuple(overrides["hidden"])
    return dataclasses.replace(budget, **overrides)


def seed_mean(runs: list[dict]) -> dict:
    """Mean and spread (population std, ``*_std``) over seeds of every scalar figure
    (``*_kcal``, ``*_kcal_per_a``), and how many seeds."""
    keys = [k for k in runs[0] if k.endswith(("_kcal", "_kcal_per_a")) and isinstance(runs[0][k], float)]
    out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out.update({f"{k}_std": float(np.std([r[k] for r in runs])) for k in keys})
    out["seeds"] = len(runs)
    return out


def _aggregate(runs: list[dict]) -> dict:
    out = seed_mean(runs)
    out["conformer_rmse_by_molecule"] = {
        m: float(np.mean([r["conformer_rmse_by_molecule"][m] for r in runs]))
        for m in runs[0]["conformer_rmse_by_molecule"]
    }
    out["reactions"] = {}
    for set_name in runs[0].get("reactions", {}):
        maes = [r["reactions"][set_name]["mae_kcal"] for r in runs]
        out["reactions"][set_name] = {
            "mae_kcal": float(np.mean(maes)),
            "mae_kcal_std": float(np.std(maes)),
            "reactions": runs[0]["reactions"][set_name]["reactions"],
        }
    return out


def _rows(result: dict) -> list[tuple[str, str, dict]]:
    """(short label, long label, metrics) of every row, baselines first."""
    baselines = result["baselines"]
    rows = [("DFT method", "DFT method (ωB97X/6-31G*)", baselines["dft_method"])]
    if "dft_model" in baselines:
        rows.append(("DFT model", "DFT-trained model", baselines["dft_model"]))
    if "base_model" in baselines:
        name = baselines["base_model"]["name"]
        rows.append((f"base {name}", f"base {name} (+ offsets)", baselines["base_model"]))
    # (An official model that is also the base is shown once, as the base.)
    rows += [
        (k, OFFICIAL[k], baselines[k])
        for k in OFFICIAL
        if k in baselines and baselines.get("base_model", {}).get("name") != k
    ]
    rows += [(s["name"], f"transfer: {s['name']}", s) for s in result["strategies"]]
    return rows


def table(result: dict) -> str:
    head = (
        f"{'model':32s} {'conformer RMSE':>15s} {'conformer MAE':>14s} {'total RMSE':>12s} "
        f"{'F RMSE vs CC':>13s} {'F RMSE vs DFT':>14s} {'HC7/11 MAE':>12s} {'ISOL6 MAE':>11s}"
    )
    lines = [f"base: {result.get('base', 'own DFT pretraining')}", head, "-" * len(head)]

    def cell(m, key, width):
        if key not in m:
            return f"{'–':>{width}s}"
        spread = m.get(f"{key}_std")
        text = f"{m[key]:.2f}" + (f"±{spread:.2f}" if spread else "")
        return f"{text:>{width}s}"

    for _, label, m in _rows(result):
        sets = m.get("reactions", {})
        lines.append(
            f"{label:32s} {cell(m, 'conformer_rmse_kcal', 15)} {cell(m, 'conformer_mae_kcal', 14)} "
            f"{cell(m, 'total_rmse_kcal', 12)} {cell(m, 'force_rmse_vs_cc_kcal_per_a', 13)} "
            f"{cell(m, 'force_rmse_vs_dft_kcal_per_a', 14)} "
            f"{cell(sets.get('HC7-11', {}), 'mae_kcal', 12)} {cell(sets.get('ISOL6', {}), 'mae_kcal', 11)}"
        )
    cc = max((m.get("cc_force_conformations", 0) for _, _, m in _rows(result)), default=0)
    lines.append(
        f"kcal/mol (forces kcal/mol/Å) against CCSD(T)/cc-pVDZ on the held-out test molecules (forces vs CC "
        f"on the {cc} conformations with CCSD(T) forces; vs DFT on all); reaction MAEs against the sets' "
        f"coupled-cluster references; ± is the spread over seeds"
    )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, _, rows = zip(*_rows(result))
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 4))
    x = np.arange(len(labels))
    for offset, key, label in [
        (-0.2, "conformer_rmse_kcal", "conformer RMSE"),
        (0.2, "conformer_mae_kcal", "conformer MAE"),
    ]:
        ax.bar(
            x + offset, [r[key] for r in rows], 0.4, yerr=[r.get(f"{key}_std", 0) for r in rows], capsize=3, label=label
        )
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("error vs CCSD(T), kcal/mol")
    ax.set_title(f"Transfer to CCSD(T) from {result.get('base', 'own DFT pretraining')}, held-out larger molecules")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_workdir() -> pathlib.Path:
    from aniserve.cache import cache_root

    return cache_root() / "bench-transfer"
