"""``aniserve bench active``: does query by committee choose better labels than chance?

From a base model (default the official ANI-1x), a pool of conformations with
high-level labels (the training set's CCSD(T) points) and a held-out test set:

- **qbc**: in rounds — choose the pool conformations with the largest ensemble spread
  per √atoms (σ_E/√N, ANI-1x's criterion) under the current model until K₁ are chosen,
  transfer the base to them, rank the rest of the pool by the *retrained* ensemble's
  spread, add the top ones up to K₂, transfer again from the base, and so on;
- **random**: K conformations drawn at random (nested: the K₁ drawn are part of K₂).

Every selection is transferred from the base with the same strategy and budget and
scored on the test set against the high level as ``bench transfer`` scores (conformer
and total-energy errors).  Seeds change the random draws and the training.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import click
import numpy as np
import torch

from aniserve.bench import command as common
from aniserve.bench.budget import ACTIVE, ACTIVE_QUICK, Budget
from aniserve.bench.progress import Runs
from aniserve.bench.scoring import HIGH_ENERGY, read_test_set, score, seed_mean
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

log = logging.getLogger(__name__)


def spreads(model, data) -> np.ndarray:
    """σ_E/√N (Hartree) of every conformation of ``data``, in ``data.items()`` order."""
    out = []
    for items in _chunks(data.items(), 64):
        batch = data.read(items)
        real = batch.numbers > 0
        result = model.evaluate(batch.numbers.numpy(), batch.positions.numpy())
        out.append(np.asarray(result.energy_std) / np.sqrt(real.sum(1).numpy()))
    return np.concatenate(out)


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _transfer(base_loader, selection, strategy, options, budget: Budget, seed, out):
    from aniserve.modelfile import load_saved
    from aniserve.training import train, transfer_model

    model, penalty = transfer_model(base_loader(), strategy, dict(options or {}), seed)
    train(model, selection, out, budget.transfer_settings(seed), penalty=penalty)
    return load_saved(out).to(torch.float64).eval()


def run(train_path, test_path, base: str, strategy: str, budget: Budget, workdir, options=None) -> dict:
    from aniserve.bench.transfer import load_base
    from aniserve.training import ANIData

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pool = ANIData(train_path, HIGH_ENERGY)
    test = read_test_set(test_path)
    items = pool.items()
    if max(budget.ks) > len(items):
        raise ValueError(f"K = {max(budget.ks)} exceeds the pool's {len(items)} high-level conformations")
    log.info(
        f"pool: {len(items)} high-level conformations; test: {len(test.high)}; K = {list(budget.ks)}; "
        f"strategy {strategy}; base {base}"
    )
    base_model = load_base(base).to(torch.float64).eval()
    base_spread = spreads(base_model, pool)
    runs: dict[str, dict[int, list]] = {"qbc": {k: [] for k in budget.ks}, "random": {k: [] for k in budget.ks}}
    progress = Runs(2 * len(budget.seeds) * len(budget.ks))
    for seed in budget.seeds:
        # Random: one permutation per seed, so the selections are nested.
        order = np.random.default_rng(seed).permutation(len(items))
        for k in budget.ks:
            chosen = [items[i] for i in order[:k]]
            progress.start(f"random  K={k}, seed {seed}")
            model = _transfer(
                lambda: load_base(base),
                pool.select(chosen),
                strategy,
                options,
                budget,
                seed,
                workdir / f"random-k{k}-seed{seed}.safetensors",
            )
            runs["random"][k].append({"seed": seed, **score(model, test)})
            log.info(f"random  K={k:4d} seed {seed}: conformer RMSE {runs['random'][k][-1]['conformer_rmse_kcal']:.3f}")
        # Query by committee in rounds: rank by the current model's spread.
        chosen_idx: list[int] = []
        current = base_spread
        for k in budget.ks:
            taken = set(chosen_idx)
            ranked = [i for i in np.argsort(-current, kind="stable") if i not in taken]
            chosen_idx += ranked[: k - len(chosen_idx)]
            progress.start(f"qbc     K={k}, seed {seed}")
            model = _transfer(
                lambda: load_base(base),
                pool.select([items[i] for i in chosen_idx]),
                strategy,
                options,
                budget,
                seed,
                workdir / f"qbc-k{k}-seed{seed}.safetensors",
            )
            result = score(model, test)
            result["mean_spread_per_sqrt_atom_kcal"] = float(np.mean(current[chosen_idx]) * HARTREE_IN_KCAL_PER_MOL)
            runs["qbc"][k].append({"seed": seed, **result})
            log.info(f"qbc     K={k:4d} seed {seed}: conformer RMSE {result['conformer_rmse_kcal']:.3f}")
            current = spreads(model, pool)
    selections = {
        name: [{"k": k, **seed_mean(rs), "runs": rs} for k, rs in by_k.items()] for name, by_k in runs.items()
    }
    return {
        "base": str(base),
        "strategy": strategy,
        "budget": dataclasses.asdict(budget),
        "pool": str(train_path),
        "test": str(test_path),
        "pool_size": len(items),
        "selections": selections,
    }


def table(result: dict) -> str:
    ks = [row["k"] for row in result["selections"]["qbc"]]
    lines = [
        f"base {result['base']}, strategy {result['strategy']}, pool {result['pool_size']} conformations",
        f"{'K':>6s} {'QBC conformer RMSE':>20s} {'random conformer RMSE':>22s} {'QBC total RMSE':>16s} "
        f"{'random total RMSE':>18s}",
    ]
    for k in ks:
        q = next(r for r in result["selections"]["qbc"] if r["k"] == k)
        r = next(r for r in result["selections"]["random"] if r["k"] == k)

        def cell(m, key, width):
            return f"{m[key]:.2f}±{m[key + '_std']:.2f}".rjust(width)

        lines.append(
            f"{k:6d} {cell(q, 'conformer_rmse_kcal', 20)} {cell(r, 'conformer_rmse_kcal', 22)} "
            f"{cell(q, 'total_rmse_kcal', 16)} {cell(r, 'total_rmse_kcal', 18)}"
        )
    lines.append("kcal/mol against the high level on the held-out test molecules; ± is the spread over seeds")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in (
        (axes[0], "conformer_rmse_kcal", "conformer RMSE"),
        (axes[1], "total_rmse_kcal", "total-energy RMSE"),
    ):
        for name, label in (("qbc", "query by committee"), ("random", "random")):
            rows = result["selections"][name]
            ax.errorbar(
                [r["k"] for r in rows],
                [r[key] for r in rows],
                yerr=[r[key + "_std"] for r in rows],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled conformations K")
        ax.set_ylabel(f"{title} vs high level, kcal/mol")
        ax.legend()
    fig.suptitle(f"Active learning from {result['base']} ({result['strategy']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_workdir() -> pathlib.Path:
    from aniserve.bench.transfer import default_workdir as transfer_workdir

    return transfer_workdir().parent / "bench-active"


@click.command("active")
@click.option(
    "--quick", is_flag=True, help="K = 8, 16, one seed, 3 epochs: minutes on 2 CPU cores (what the tests run)."
)
@click.option("--base", default="ani-1x", show_default=True, help="Model every selection is transferred from.")
@click.option(
    "--strategy",
    default="delta",
    show_default=True,
    help="Transfer strategy used for every selection (delta: the best in cross-validation, docs/notebook.md).",
)
@click.option(
    "--train",
    "train_path",
    default="data/qm-train.h5",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The pool: its high-level conformations.",
)
@click.option(
    "--test",
    "test_path",
    default="data/qm-test.h5",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Held-out test set with the high level.",
)
@click.option("--ks", default=None, help="Comma-separated selection sizes (default 32,64,128; quick 8,16).")
@common.seeds_option
@click.option("--epochs", default=None, type=int, help="Transfer epochs per selection (default 60, quick 3).")
@common.budget_option
@common.workdir_option("bench-active")
@common.json_option()
@common.plot_option("Write the learning curves (PNG).")
def command(quick, base, strategy, train_path, test_path, ks, seeds, epochs, budget_items, workdir, json_out, plot_out):
    """Query by committee against random selection of K labels: learning curves on held-out molecules.

    Example: aniserve bench active --json active.json --plot active.png
    """
    common.data_files(("--train", train_path), ("--test", test_path))
    items = list(budget_items)
    if ks:
        items.append(f"ks={[int(k) for k in ks.split(',')]}")
    if epochs:
        items.append(f"transfer_epochs={epochs}")
    budget = common.budget_from(ACTIVE_QUICK if quick else ACTIVE, seeds, items)
    workdir = workdir or default_workdir()
    result = run(train_path, test_path, base, strategy, budget, workdir)
    common.report_kept(workdir)
    common.finish(result, table(result), json_out, plot_out, plot)
