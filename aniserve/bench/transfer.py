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
import logging
import pathlib
import time
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import torch

from aniserve.bench import command as common
from aniserve.bench.budget import FROM_BASE, FROM_BASE_QUICK, TRANSFER, TRANSFER_QUICK, Budget
from aniserve.bench.progress import Runs
from aniserve.bench.scoring import (
    HIGH_ENERGY,
    HIGH_FORCES,
    LOW_ENERGY,
    LOW_FORCES,
    TestSet,
    cc_force_errors,
    element_offsets,
    metrics,
    read_test_set,
    score,
    score_with_offsets,
    seed_mean,
)

if TYPE_CHECKING:
    from aniserve.potential import ANIPotential

log = logging.getLogger(__name__)


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
            log.info(f"official {name} not found (set ANISERVE_MODEL_DIR): its baseline row is left out")
            continue
        out[name] = score_with_offsets(model, train_path, test)
    return out


def _file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def pretrain(
    train_path, budget: Budget, workdir: pathlib.Path, seed: int, keys: tuple[str, str] = (LOW_ENERGY, LOW_FORCES)
) -> pathlib.Path:
    """The DFT model (cached by data hash, budget and seed; resumed if interrupted),
    trained on the energies and forces ``keys`` (by default the low level, ωB97X)."""
    from aniserve.training import ANIData, default_description, new_model, train
    from aniserve.training.data import data_paths

    hashes = [_file_hash(path) for path in data_paths(train_path)]
    # One file keeps the key it had before several were allowed, so cached models stay valid.
    identity: list = [hashes[0] if len(hashes) == 1 else hashes, budget.pretraining(), seed]
    if keys != (LOW_ENERGY, LOW_FORCES):  # (the default's key stays what it was: cached models stay valid)
        identity.append(list(keys))
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    path = workdir / f"pretrained-{key[:16]}.safetensors"
    if path.exists():
        log.info(f"pretrained model from cache: {path}")
        return path
    data = ANIData(train_path, *keys)
    description = default_description(["H", "C", "N", "O"], budget.hidden, budget.ensemble_size, name="bench-dft")
    settings = budget.pretrain_settings(seed)
    log.info(f"pretraining on {keys[0]} + forces, seed {seed} …")
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
    from aniserve.training import ANIData, continue_transfer, train, transfer_model
    from aniserve.training.trainer import fit_self_energies

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    strategies = strategies or registry().names("transfer-strategy")
    test = read_test_set(test_path)
    high = ANIData(train_path, HIGH_ENERGY, HIGH_FORCES if budget.high_force_weight else None)
    log.info(
        f"data: {len(ANIData(train_path, LOW_ENERGY))} low-level and {len(high)} high-level training "
        f"conformations; {len(test.high)} test conformations of {len(np.unique(test.molecule))} molecules"
    )

    offsets = element_offsets(train_path, test)
    baselines = {
        "dft_method": {
            **metrics(test.low + offsets, test),
            **cc_force_errors(test.low_forces, test),
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
            record = {"from": origin, "strategy": name, "options": options or {}}
            runs.start(f"transfer: {name}, seed {seed} …")
            if budget.energies_first:
                first = workdir / f"{name}-seed{seed}-energies.safetensors"
                train(
                    model,
                    high,
                    first,
                    budget.energies_stage_settings(seed),
                    penalty=penalty,
                    extra={"transfer": record},
                )
                model, penalty = continue_transfer(load_saved(first), name, seed)
                record = {**record, "energies_first": first.name}
            summary = train(
                model, high, out, budget.transfer_settings(seed), penalty=penalty, extra={"transfer": record}
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


@click.command("transfer")
@click.option("--quick", is_flag=True, help="Small budget, one seed: minutes on 2 CPU cores (what the tests run).")
@click.option("--strategies", default=None, help="Comma-separated strategy names; default every registered one.")
@click.option(
    "--train",
    "train_path",
    multiple=True,
    default=["data/qm-train.h5"],
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Training set (low level + high-level subset); give it more than once to train on several "
    "files as one set (e.g. --train data/qm-train.h5 --train data/qm-train-rings.h5).",
)
@common.test_option("Held-out test set with both levels.")
@click.option(
    "--base",
    default=None,
    metavar="NAME_OR_PATH",
    help="Start every strategy from this model (e.g. ani-1x, ani-2x, a model file) instead of our own "
    "DFT pretraining on --train's low level.",
)
@common.seeds_option
@click.option("--option", "options", multiple=True, metavar="KEY=JSON", help="Option passed to every strategy.")
@common.budget_option
@common.workdir_option("bench-transfer")
@common.json_option()
@common.plot_option("Write a PNG bar chart.")
@click.option(
    "--export-best",
    "export_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Save the best strategy's seed-0 model here (how the embedded model is made).",
)
@click.option("--export-name", default="aniserve-1x-ccsdt", show_default=True, help="Name given to the exported model.")
@click.option("--export-card", default=None, help="Model card path recorded in the exported model's description.")
def command(
    quick,
    strategies,
    train_path,
    test_path,
    base,
    seeds,
    options,
    budget_items,
    workdir,
    json_out,
    plot_out,
    export_path,
    export_name,
    export_card,
):
    """Transfer to CCSD(T) with every strategy from one base (own DFT pretraining or --base),
    score on larger held-out molecules.

    Example: aniserve bench transfer --base ani-1x --quick --json transfer.json --plot transfer.png
    """
    common.data_files(("--train", *train_path), ("--test", test_path))
    preset = (FROM_BASE_QUICK if quick else FROM_BASE) if base is not None else (TRANSFER_QUICK if quick else TRANSFER)
    budget = common.budget_from(preset, seeds, budget_items)
    workdir = workdir or default_workdir()
    names = strategies.split(",") if strategies else None
    result = run(train_path, test_path, names, budget, workdir, common.parse_items(options), base=base)
    common.report_kept(workdir)
    common.finish(result, table(result), json_out, plot_out, plot)
    if export_path:
        best = export_best(result, export_path, export_name, export_card)
        click.echo(f"exported {best['name']} (seed 0) as {export_name} to {export_path}")
