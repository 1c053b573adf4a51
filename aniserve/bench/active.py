"""``aniserve bench active``: which selection of labels buys the most accuracy?

By default a *student* (a small ensemble pretrained here on a teacher's labels, the
official ANI-1x's, of the pool file's conformations) learns the teacher from a pool of
MD frames (300 and 1,000 K) of the pool file's molecules; a fifth of its formulas are
held out as test molecules (their MD frames at both temperatures).  Labels cost nothing
(the teacher computes them), so the selections, not the labelling, are compared.  The
other pools: ``--pool conformations`` learns the file's own labels, its CCSD(T) points
from a model base, or (``--level wb97x``) the shipped ωB97X energies and forces.

Each *arm* labels K structures in rounds (K₁, then K₂ ⊇ K₁, …) chosen by a selection
strategy of the registry (``aniserve.selection``): ``random`` (nested draws), ``top-k``
(the largest force deviations of the current committee: query by committee),
``band`` (a trust band of force deviation, random inside, a fair share per molecule)
and ``band-fps`` (the band, farthest-point sampling on mean AEVs inside).

The loop is the honest one:

- **validation molecules are fixed and outside the pool**: 15 % of the pool file's
  formulas, the same for every arm, seed and round, pick the epochs (on forces where
  the labels have them, else conformer RMSE);
  nothing selected is ever validated on, so a selection cannot grade itself;
- **energy offsets are fitted on every label there is**, the validation molecules' and
  all labelled so far, before each round; never on a selection alone (a top-K round
  may span four compositions);
- **the start competes**: a round that does not beat the model it started from (on the
  validation molecules) returns that model unchanged;
- **each round warm-starts** from the previous round's model, whose committee (its
  retrained members) ranks the rest of the pool for the next round; the student's
  rounds replay twice as many of its pretraining conformations beside the labels.

Every arm is scored on the test set against the high level as ``bench transfer``
scores; seeds change the draws and the training.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import pathlib

import click
import numpy as np
import torch

from aniserve.bench import command as common
from aniserve.bench.budget import ACTIVE, ACTIVE_QUICK, ACTIVE_STUDENT, ACTIVE_STUDENT_QUICK, Budget
from aniserve.bench.progress import Runs
from aniserve.bench.scoring import (
    HIGH_ENERGY,
    HIGH_FORCES,
    LOW_ENERGY,
    LOW_FORCES,
    read_test_set,
    score,
    seed_mean,
    subset,
)
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

log = logging.getLogger(__name__)

#: The arms: selection strategies of the registry.
ARMS = ("random", "top-k", "band", "band-fps")
#: The validation molecules: this share of the pool file's formulas, always the same ones.
VALIDATION_SHARE, VALIDATION_SEED = 0.15, 0


def candidates(model, pool, items):
    """The selection strategies' view of ``items`` of ``pool`` under ``model``'s
    committee: force deviation (the largest over atoms of the members' force spread,
    kcal/mol/Å), energy spread per atom, molecule, and the mean AEV as descriptor.
    Conformations of one molecule are evaluated in one batch."""
    from aniserve.collect import max_force_spread
    from aniserve.selection import Candidates, mean_aevs

    batch = pool.read(items)
    structures = []
    for numbers, positions in zip(batch.numbers.numpy(), batch.positions.numpy()):
        real = numbers > 0
        structures.append((numbers[real], positions[real]))
    deviation, spread = np.zeros(len(structures)), np.zeros(len(structures))
    same: dict[tuple, list[int]] = {}
    for i, (numbers, _) in enumerate(structures):
        same.setdefault(tuple(numbers.tolist()), []).append(i)
    for numbers, rows in same.items():
        result = model.evaluate(
            np.array([numbers] * len(rows)), np.stack([structures[i][1] for i in rows]), member_forces=True
        )
        deviation[rows] = max_force_spread(result.member_forces)  # (what collect computes)
        spread[rows] = np.asarray(result.energy_std) / len(numbers) * HARTREE_IN_KCAL_PER_MOL
    return Candidates(deviation, np.array(batch.molecule), mean_aevs(model, structures), spread)


#: ``--base`` for a student of the bench's own (``--pool md``): a small ensemble
#: pretrained on the teacher's labels of the pool file's conformations (normal modes,
#: near equilibrium), one per seed; each round replays a sample of that data beside its
#: labels, as a real active-learning run retrains on all it has.
STUDENT = "student"
#: A round's replayed pretraining conformations, per labelled one.
REPLAY_PER_LABEL = 2


def _start(base: str, budget: Budget, seed: int, workdir: pathlib.Path, replay) -> pathlib.Path:
    """Where a seed's rounds start from: the base saved as a file, or the bench's own
    student pretrained on ``replay`` (cached per data, budget and seed)."""
    from aniserve.bench.transfer import load_base, pretrain
    from aniserve.modelfile import save_model

    if base == STUDENT:
        return pretrain(replay.path, budget, workdir, seed, (replay.energy_key, replay.forces_key))
    out = workdir / "start.safetensors"
    save_model(load_base(base), out)
    return out


def _round(start_path, strategy: str, labelled, validation, budget: Budget, seed: int, out: pathlib.Path, replay=None):
    """One round: warm-start from ``start_path`` (the base, or the previous round's
    model), train on the labelled set (and twice as many conformations drawn from
    ``replay``, the student's pretraining data, if given), the start competing, validated
    on the fixed validation molecules; the trained (or kept) model, float64, and the
    run's summary."""
    from aniserve.modelfile import load_saved
    from aniserve.training import continue_transfer, train
    from aniserve.training.trainer import fit_self_energies

    model, penalty = continue_transfer(load_saved(start_path), strategy, seed)
    training = labelled
    if replay is not None:
        items = replay.items()
        draw = np.random.default_rng([seed, len(labelled)]).permutation(len(items))
        training = labelled.union(replay.select([items[i] for i in draw[: REPLAY_PER_LABEL * len(labelled)]]))
    # Energy offsets from every label there is: the validation molecules' and all the
    # round trains on (a selection alone may span a handful of compositions).
    fit_self_energies(model, training.union(validation))
    settings = dataclasses.replace(budget.transfer_settings(seed), refit_self_energies=False, start_competes=True)
    summary = train(model, training, out, settings, validation_data=validation, penalty=penalty)
    return load_saved(out).to(torch.float64).eval(), summary


#: ``--level``: the pool file's labels a conformations pool learns (energy, forces keys).
LEVELS = {"ccsd(t)": (HIGH_ENERGY, HIGH_FORCES), "wb97x": (LOW_ENERGY, LOW_FORCES)}


@dataclasses.dataclass
class Pool:
    """Where the labels come from: ``md`` (MD frames of the pool file's molecules
    explored with ``explorer``, by default the base model, and labelled by ``teacher``:
    ``bench.md_pool``) or ``conformations`` (the pool file's own points at ``level``:
    its CCSD(T) points, or every conformation's ωB97X energy and forces)."""

    kind: str = "md"
    teacher: str = "ani-1x"
    steps: int = 200
    interval: int = 10
    #: The model that runs the MD: by default the base, or the teacher when the base is
    #: the bench's own student (one per seed, and too weak to explore stably).
    explorer: str | None = None
    level: str = "ccsd(t)"

    def __post_init__(self):
        if self.kind not in ("conformations", "md"):
            raise ValueError(f"the pool is 'conformations' or 'md', not {self.kind!r}")
        if self.level not in LEVELS:
            raise ValueError(f"the level is one of {', '.join(LEVELS)}, not {self.level!r}")

    @property
    def labels_forces(self) -> bool:
        """Whether every label has forces (the teacher's, or ωB97X's): the figure is
        then the force RMSE, and the epochs are chosen on the validation forces."""
        return self.kind == "md" or self.level == "wb97x"


#: ``--hold-out``'s draw of test formulas: always the same ones; and its share by default.
HOLD_OUT_SEED, HOLD_OUT_SHARE = 1, 0.2


def hold_out(path, share: float, folder) -> tuple[pathlib.Path, pathlib.Path]:
    """(pool, test): ``path``'s conformations split by formula, ``share`` of the formulas
    (drawn with HOLD_OUT_SEED) held out as test molecules, as two ANI files in ``folder``
    (written once): test molecules from the pool's own distribution."""
    from aniserve.qmdata.records import read_h5, write_records

    digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:12]
    stem = f"{pathlib.Path(path).stem}-{digest}-hold-out-{share:g}"
    out = pathlib.Path(folder) / f"{stem}-pool.h5", pathlib.Path(folder) / f"{stem}-test.h5"
    if all(p.exists() for p in out):
        return out
    records = read_h5(path)

    def formula(record) -> tuple:
        return tuple(sorted(collections.Counter(record["numbers"]).items()))

    formulas = sorted({formula(r) for r in records})
    np.random.default_rng(HOLD_OUT_SEED).shuffle(formulas)
    test = set(formulas[: max(1, round(share * len(formulas)))])
    if len(test) == len(formulas):
        raise ValueError(f"--hold-out {share:g} leaves no formula of {path} in the pool")
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    write_records([r for r in records if formula(r) not in test], out[0])
    write_records([r for r in records if formula(r) in test], out[1])
    return out


def run(
    train_path,
    test_path,
    base: str,
    strategy: str,
    budget: Budget,
    workdir,
    arms=None,
    pool_kind: Pool | None = None,
    held_out: float | None = None,
) -> dict:
    """held_out: test on that share of ``train_path``'s formulas (``hold_out``) instead
    of ``test_path``."""
    from aniserve.bench import md_pool
    from aniserve.modelfile import load_saved
    from aniserve.registry import registry
    from aniserve.training import ANIData

    source = pool_kind or Pool()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    given = {"pool": str(train_path), "test": None if held_out is not None else str(test_path)}
    if held_out is not None:
        train_path, test_path = hold_out(train_path, held_out, workdir)
    energy_key, level_forces = LEVELS[source.level]
    forces_key: str | None = level_forces if budget.high_force_weight else None
    temperatures: tuple[float, ...] = ()
    replay = None
    if base == STUDENT:
        normal = md_pool.relabel(train_path, workdir, source.teacher)
        replay = ANIData(normal, md_pool.TEACHER_ENERGY, md_pool.TEACHER_FORCES)
    if source.kind == "md":
        explorer = source.explorer or (source.teacher if base == STUDENT else base)
        train_path, test_path = (
            md_pool.build(path, workdir, explorer, source.teacher, source.steps, source.interval)
            for path in (train_path, test_path)
        )
        energy_key, forces_key = md_pool.TEACHER_ENERGY, md_pool.TEACHER_FORCES
        temperatures = md_pool.TEMPERATURES
    pool, validation = ANIData(train_path, energy_key, forces_key).split(VALIDATION_SHARE, VALIDATION_SEED)
    test = read_test_set(test_path, energy_key, forces_key or HIGH_FORCES)
    items = pool.items()
    arms = list(arms or ARMS)
    if max(budget.ks) > len(items):
        raise ValueError(f"K = {max(budget.ks)} exceeds the pool's {len(items)} high-level conformations")
    log.info(
        f"pool: {len(items)} high-level conformations; validation: {len(validation)} of "
        f"{len(validation.groups)} other molecules; test: {len(test.high)}; K = {list(budget.ks)}; "
        f"arms {', '.join(arms)}; strategy {strategy}; base {base}"
    )
    runs: dict[str, dict[int, list]] = {arm: {k: [] for k in budget.ks} for arm in arms}
    progress = Runs(len(arms) * len(budget.seeds) * len(budget.ks))
    for seed in budget.seeds:
        start = _start(base, budget, seed, workdir, replay)
        for arm in arms:
            selector = registry().get("selection-strategy", arm)()
            rng = np.random.default_rng(seed)
            labelled: list[int] = []
            current, current_path = None, start
            for k in budget.ks:
                committee = current if current is not None else load_saved(start).to(torch.float64).eval()
                taken = set(labelled)
                rest = [i for i in range(len(items)) if i not in taken]
                view = candidates(committee, pool, [items[i] for i in rest])
                chosen = selector.select(view, k - len(labelled), rng)
                labelled += [rest[i] for i in chosen]
                progress.start(f"{arm:8s} K={k}, seed {seed}")
                out = workdir / f"{arm}-k{k}-seed{seed}.safetensors"
                chosen_data = pool.select([items[i] for i in labelled])
                current, summary = _round(current_path, strategy, chosen_data, validation, budget, seed, out, replay)
                current_path = out
                result = _score(current, test, temperatures)
                result.update(
                    seed=seed,
                    labels=len(labelled),
                    selected_force_deviation_kcal_per_a=float(view.force_deviation[chosen].mean())
                    if len(chosen)
                    else None,
                    molecules_labelled=len({pool.groups[items[i][0]].name for i in labelled}),
                    best_epoch=summary["best_epoch"],
                    validation_groups=summary["validation_groups"],
                    labelled_groups=sorted({pool.groups[items[i][0]].name for i in labelled}),
                )
                runs[arm][k].append(result)
                log.info(
                    f"{arm:8s} K={k:4d} seed {seed}: conformer RMSE {result['conformer_rmse_kcal']:.3f}, "
                    f"best epoch {summary['best_epoch']}"
                )
    curves = {arm: [{"k": k, **seed_mean(rs), "runs": rs} for k, rs in by_k.items()] for arm, by_k in runs.items()}
    figure = "force_rmse_kcal_per_a" if source.labels_forces else "conformer_rmse_kcal"
    return {
        "base": str(base),
        "pool_kind": dataclasses.asdict(source),
        "figure": figure,
        "strategy": strategy,
        "budget": dataclasses.asdict(budget),
        # The files as given (the splits and MD pools made from them live in the workdir).
        **given,
        "held_out_share": held_out,
        "pool_size": len(items),
        "validation_groups": sorted({g.name for g in validation.groups}),
        "arms": curves,
        "labels_to_match_random": labels_to_match_random(curves, figure),
    }


def _score(model, test, temperatures) -> dict:
    """The test errors, with ``force_rmse_kcal_per_a`` against the pool's own high level
    (CCSD(T), or the teacher), and per temperature for an MD pool."""
    result = score(model, test)
    if "force_rmse_vs_cc_kcal_per_a" in result:
        result["force_rmse_kcal_per_a"] = result["force_rmse_vs_cc_kcal_per_a"]
    for temperature in temperatures:
        part = score(model, subset(test, [m.endswith(f"@{temperature:g}K") for m in test.molecule]))
        result[f"force_rmse_{temperature:g}K_kcal_per_a"] = part.get("force_rmse_vs_cc_kcal_per_a", float("nan"))
        result[f"conformer_rmse_{temperature:g}K_kcal"] = part["conformer_rmse_kcal"]
    return result


def labels_to_match_random(curves: dict, key: str = "conformer_rmse_kcal") -> dict:
    """For each arm, the fewest labels (as a fraction of random's largest K) at which its
    mean error reaches random's final one; NaN when it never does."""
    if "random" not in curves:
        return {}
    final = curves["random"][-1]
    target, most = final[key], final["k"]
    out = {}
    for arm, rows in curves.items():
        reached = [r["k"] for r in rows if r[key] <= target]
        out[arm] = min(reached) / most if reached else float("nan")
    return out


def table(result: dict) -> str:
    arms = list(result["arms"])
    ks = [row["k"] for row in result["arms"][arms[0]]]
    figures = [f for f in ("force_rmse_kcal_per_a", "conformer_rmse_kcal") if f in result["arms"][arms[0]][0]]
    short = {"force_rmse_kcal_per_a": "force", "conformer_rmse_kcal": "conformer"}
    pool = result.get("pool_kind", {"kind": "conformations"})
    lines = [
        f"base {result['base']}, strategy {result['strategy']}, pool {result['pool_size']} "
        + (
            f"conformations at {pool.get('level', 'ccsd(t)')}"
            if pool["kind"] == "conformations"
            else f"MD frames labelled by {pool['teacher']}"
        )
        + f", validation molecules {len(result['validation_groups'])} (outside the pool)",
        f"{'K':>6s} " + " ".join(f"{arm + ' ' + short[f]:>22s}" for f in figures for arm in arms),
    ]
    for k in ks:
        cells = []
        for f in figures:
            for arm in arms:
                m = next(r for r in result["arms"][arm] if r["k"] == k)
                cells.append(f"{m[f]:.2f}±{m[f + '_std']:.2f}".rjust(22))
        lines.append(f"{k:6d} " + " ".join(cells))
    figure = result.get("figure", "conformer_rmse_kcal")
    match = ", ".join(f"{arm} {fraction:.2f}" for arm, fraction in result["labels_to_match_random"].items())
    lines.append(f"labels needed to reach random's final {short[figure]} RMSE (fraction of its K): {match}")
    lines.append(
        "force RMSE kcal/mol/Å and conformer RMSE kcal/mol, against the pool's high level on the held-out test "
        "molecules; ± over seeds"
    )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = {
        "force_rmse_kcal_per_a": "force RMSE, kcal/mol/Å",
        "conformer_rmse_kcal": "conformer RMSE, kcal/mol",
        "total_rmse_kcal": "total-energy RMSE, kcal/mol",
    }
    shown = [result.get("figure", "conformer_rmse_kcal")]
    shown.append("conformer_rmse_kcal" if shown[0] != "conformer_rmse_kcal" else "total_rmse_kcal")
    for ax, key in zip(axes, shown):
        title = panels[key]
        for arm, rows in result["arms"].items():
            ax.errorbar(
                [r["k"] for r in rows],
                [r[key] for r in rows],
                yerr=[r[key + "_std"] for r in rows],
                marker="o",
                capsize=3,
                label=arm,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled conformations K")
        ax.set_ylabel(f"{title} (test)")
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
    "--quick", is_flag=True, help="K = 8, 16, one seed, a few epochs: minutes on 2 CPU cores (what the tests run)."
)
@click.option(
    "--base",
    default=STUDENT,
    show_default=True,
    help=f"Model every selection is transferred from (a name or a file), or {STUDENT}: a small ensemble "
    "pretrained here on --teacher's labels of --train's conformations, one per seed.",
)
@click.option(
    "--strategy",
    default=None,
    help=f"Transfer strategy used for every selection (default: full, every weight, for --base {STUDENT}; "
    "delta, the best in cross-validation (docs/notebook.md), for a model).",
)
@click.option(
    "--train",
    "train_path",
    default="data/qm-train.h5",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The pool file: its molecules (explored by MD) or its conformations.",
)
@click.option(
    "--test",
    "test_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Test molecules from another file (such as data/qm-test.h5) instead of --hold-out's.",
)
@click.option(
    "--hold-out",
    "held_out_share",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help=f"Test on this share of --train's formulas, held out of the pool: test molecules of the pool's own "
    f"distribution (default {HOLD_OUT_SHARE:g} when --test is not given).",
)
@click.option("--ks", default=None, help="Comma-separated selection sizes (default 32,64,128; quick 8,16).")
@common.seeds_option
@click.option(
    "--epochs",
    default=None,
    type=int,
    help="Transfer epochs per selection (default 40 for the student, 60 for a model; quick 3).",
)
@common.budget_option
@common.workdir_option("bench-active")
@click.option("--arms", default=None, help="Comma-separated selection strategies (default random,top-k,band,band-fps).")
@click.option(
    "--pool",
    "pool_kind",
    type=click.Choice(["md", "conformations"]),
    default="md",
    show_default=True,
    help="The labels: MD frames of --train's molecules (300 and 1,000 K, run by --explorer) labelled by "
    "--teacher, or --train's own conformations at --level.",
)
@click.option(
    "--teacher",
    default="ani-1x",
    show_default=True,
    help="The labeller (energies and forces) of the MD pool and of the student's pretraining.",
)
@click.option(
    "--explorer",
    default=None,
    help=f"The model that runs the MD pool's dynamics (default: --base; the teacher when --base is {STUDENT}).",
)
@click.option("--md-steps", default=200, show_default=True, type=click.IntRange(min=1), help="MD steps a temperature.")
@click.option(
    "--level",
    type=click.Choice(list(LEVELS)),
    default="ccsd(t)",
    show_default=True,
    help="With --pool conformations: the file's labels to learn, its CCSD(T) points (energies) or every "
    "conformation's ωB97X energy and forces (the shipped DFT labels).",
)
@common.json_option()
@common.plot_option("Write the learning curves (PNG).")
def command(
    quick,
    base,
    strategy,
    train_path,
    test_path,
    held_out_share,
    ks,
    seeds,
    epochs,
    budget_items,
    workdir,
    arms,
    pool_kind,
    teacher,
    explorer,
    md_steps,
    level,
    json_out,
    plot_out,
):
    """Selection strategies against each other: K labels in rounds, learning curves on held-out molecules.

    By default a student (a small ensemble pretrained on ANI-1x's labels) learns ANI-1x
    from MD frames of data/qm-train.h5's molecules, tested on a fifth of its formulas
    held out (docs/bench/active.md).

    Example: aniserve bench active --json active.json --plot active.png
    """
    if test_path is not None and held_out_share is not None:
        raise click.UsageError("give --test or --hold-out, not both")
    if test_path is None:
        held_out_share = held_out_share or HOLD_OUT_SHARE
    common.data_files(("--train", train_path), *((("--test", test_path),) if test_path else ()))
    source = Pool(pool_kind, teacher, md_steps, 10, explorer, level)
    items = list(budget_items)
    if ks:
        items.append(f"ks={[int(k) for k in ks.split(',')]}")
    if epochs:
        items.append(f"transfer_epochs={epochs}")
    if source.labels_forces:
        # The forces are labels too, and the epochs are chosen on the validation
        # molecules' forces, the figure: on their energies, a fine-tune whose per-element
        # offsets a few compositions pull never beat its start.
        items[:0] = ["high_force_weight=1.0", "selection=forces"]
    if base == STUDENT:
        preset = ACTIVE_STUDENT_QUICK if quick else ACTIVE_STUDENT
    else:
        preset = ACTIVE_QUICK if quick else ACTIVE
    budget = common.budget_from(preset, seeds, items)
    workdir = workdir or default_workdir()
    chosen = arms.split(",") if arms else None
    strategy = strategy or ("full" if base == STUDENT else "delta")
    result = run(train_path, test_path, base, strategy, budget, workdir, chosen, source, held_out=held_out_share)
    common.report_kept(workdir)
    common.finish(result, table(result), json_out, plot_out, plot)
