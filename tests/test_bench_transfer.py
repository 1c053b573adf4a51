"""``aniserve bench transfer --quick`` end to end on a cut-down stand-in: ANI-1x plays
the DFT level and ANI-1ccx the coupled-cluster level (both official models), small
molecules train and larger ones test, as in the shipped set."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cached_model, perturbed_molecules

from aniserve.cli import main
from aniserve.modelfile import load_saved, read_description
from aniserve.registry import registry
from aniserve.training.data import write_ani_h5

pytestmark = [pytest.mark.weights]  # the official ANI weights (see conftest)

TRAIN = ["CH4", "H2O", "NH3", "C2H6", "CH3OH", "HCN", "C2H4", "H2CO", "H3CNH2", "HCOOH", "N2H4", "CH3CHO"]
TEST = ["CH3COOH", "CH3CH2OH", "CH3CONH2", "CH3ONO"]


def write_levels(path, names, conformations, high_every, seed, high_forces=False):
    """high_forces: also the high level's forces, on half of its conformations."""
    low, high = cached_model("ani-1x", "float64"), cached_model("ani-1ccx", "float64")
    groups = {}
    for formula, name, numbers, pos in perturbed_molecules(names, conformations, np.random.default_rng(seed), 0.05):
        batch = np.repeat(numbers[None], conformations, 0)
        dft = low.evaluate(batch, pos)
        cc = high.evaluate(batch, pos)
        energy = cc.energy.copy()
        energy[np.arange(conformations) % high_every != 0] = np.nan
        groups[formula] = {
            "atomic_numbers": numbers,
            "coordinates": pos,
            "molecule": np.array([name.encode()] * conformations),
            "wb97x_631gd.energy": dft.energy,
            "wb97x_631gd.forces": dft.forces,
            "ccsd(t)_ccpvdz.energy": energy,
        }
        if high_forces:
            forces = cc.forces.copy()
            forces[np.arange(conformations) % (2 * high_every) != 0] = np.nan
            groups[formula]["ccsd(t)_ccpvdz.forces"] = forces
    write_ani_h5(path, groups)


@pytest.mark.slow
def test_quick_transfer_bench_covers_every_strategy(tmp_path):
    write_levels(tmp_path / "train.h5", TRAIN, conformations=8, high_every=2, seed=0)
    write_levels(tmp_path / "test.h5", TEST, conformations=4, high_every=1, seed=1)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "transfer",
            "--quick",
            "--train",
            str(tmp_path / "train.h5"),
            "--test",
            str(tmp_path / "test.h5"),
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "bench.png"),
            "--export-best",
            str(tmp_path / "best.safetensors"),
            "--export-name",
            "demo",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {s["name"] for s in data["strategies"]} == set(registry().names("transfer-strategy"))
    rows = data["strategies"] + list(data["baselines"].values())
    for row in rows:
        for key in ("conformer_rmse_kcal", "conformer_mae_kcal", "total_rmse_kcal"):
            assert np.isfinite(row[key]) and row[key] >= 0, (row, key)
    assert all(np.isfinite(s["force_rmse_vs_dft_kcal_per_a"]) for s in data["strategies"])
    assert data["baselines"]["dft_method"]["test_conformations"] == 16
    # Here the "CC level" is ANI-1ccx and the "DFT level" ANI-1x, so the official-model
    # baselines must reproduce them exactly (a check of their offset fit and scoring).
    assert data["baselines"]["ani-1ccx"]["total_rmse_kcal"] < 1e-6
    assert data["baselines"]["ani-1x"]["force_rmse_vs_dft_kcal_per_a"] < 1e-6
    assert (
        abs(data["baselines"]["ani-1x"]["conformer_rmse_kcal"] - data["baselines"]["dft_method"]["conformer_rmse_kcal"])
        < 1e-6
    )
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "transfer: freeze" in result.output and "official ANI-1ccx" in result.output
    # The exported model is the seed-0 model of the best strategy on validation, named, with its test errors.
    best = min(data["strategies"], key=lambda s: s["validation_conformer_rmse_kcal"])  # chosen without the test set
    description = read_description(tmp_path / "best.safetensors")
    assert description["name"] == "demo" and "history" not in description["training"]
    assert description["benchmark"]["strategy"] == best["name"]
    assert description["benchmark"]["conformer_rmse_kcal"] == best["runs"][0]["conformer_rmse_kcal"]
    exported, source = load_saved(tmp_path / "best.safetensors"), load_saved(best["runs"][0]["model"])
    x = np.random.default_rng(2).normal(0, 1.0, (5, 3))
    assert exported.evaluate([6, 1, 1, 8, 7], x).energy == source.evaluate([6, 1, 1, 8, 7], x).energy
    # The pretrained model is cached: a second run reuses it.
    again = CliRunner().invoke(
        main,
        [
            "bench",
            "transfer",
            "--quick",
            "--strategies",
            "delta",
            "--train",
            str(tmp_path / "train.h5"),
            "--test",
            str(tmp_path / "test.h5"),
            "--workdir",
            str(tmp_path / "work"),
        ],
    )
    assert again.exit_code == 0 and "pretrained model from cache" in again.output
    # Interrupted after its last checkpoint, the pretraining resumes to the same model.
    (pretrained,) = (tmp_path / "work").glob("pretrained-*.safetensors")
    weights = load_saved(pretrained).state_dict()
    pretrained.unlink()
    resumed = CliRunner().invoke(
        main,
        [
            "bench",
            "transfer",
            "--quick",
            "--strategies",
            "delta",
            "--train",
            str(tmp_path / "train.h5"),
            "--test",
            str(tmp_path / "test.h5"),
            "--workdir",
            str(tmp_path / "work"),
        ],
    )
    assert resumed.exit_code == 0 and "resuming from" in resumed.output
    assert all(torch.equal(weights[k], v) for k, v in load_saved(pretrained).state_dict().items())


def test_element_offsets_of_two_files_are_those_of_their_union(tmp_path):
    import h5py

    from aniserve.bench.scoring import element_offsets, read_test_set

    write_levels(tmp_path / "a.h5", TRAIN[:5], conformations=4, high_every=2, seed=0)
    write_levels(tmp_path / "b.h5", TRAIN[5:], conformations=4, high_every=2, seed=2)
    write_levels(tmp_path / "test.h5", TEST[:2], conformations=2, high_every=1, seed=1)
    union = {}
    for part in ("a.h5", "b.h5"):
        with h5py.File(tmp_path / part, "r") as f:
            union.update({name: {k: v[()] for k, v in g.items()} for name, g in f.items()})
    write_ani_h5(tmp_path / "union.h5", union)
    test = read_test_set(tmp_path / "test.h5")
    two = element_offsets([tmp_path / "a.h5", tmp_path / "b.h5"], test)
    assert np.allclose(two, element_offsets(tmp_path / "union.h5", test), rtol=0, atol=1e-9)
    assert not np.allclose(two, element_offsets(tmp_path / "a.h5", test), rtol=0, atol=1e-6)  # b.h5 counted


def test_test_set_reads_only_high_level_conformations(tmp_path):
    from aniserve.bench.scoring import read_test_set

    water = np.array([8, 1, 1])
    pos = np.random.default_rng(0).normal(size=(3, 3, 3))
    write_ani_h5(
        tmp_path / "t.h5",
        {
            "H2O": {
                "atomic_numbers": water,
                "coordinates": pos,
                "wb97x_631gd.energy": np.array([-76.0, -76.1, -76.2]),
                "ccsd(t)_ccpvdz.energy": np.array([-76.2, np.nan, -76.4]),
            },
            "H2": {"atomic_numbers": np.array([1, 1]), "coordinates": pos[:, :2], "wb97x_631gd.energy": -np.ones(3)},
        },
    )
    test = read_test_set(tmp_path / "t.h5")
    assert list(test.high) == [-76.2, -76.4] and list(test.low) == [-76.0, -76.2]
    assert np.array_equal(test.positions[1], pos[2]) and list(test.molecule) == ["H2O", "H2O"]
    write_ani_h5(
        tmp_path / "dft-only.h5",
        {"H2": {"atomic_numbers": np.array([1, 1]), "coordinates": pos[:, :2], "wb97x_631gd.energy": -np.ones(3)}},
    )
    with pytest.raises(ValueError, match=r"no conformation has ccsd\(t\)_ccpvdz.energy"):
        read_test_set(tmp_path / "dft-only.h5")


@pytest.mark.slow
def test_quick_bench_from_an_official_base(tmp_path):
    """``--base ani-1x`` on a cut-down set: every strategy starts from the official
    ANI-1x (8 members), the base itself is a baseline, reaction-energy errors are scored,
    and the JSON says which base it used.  The training data come as two files (``--train``
    twice), read as one set; the first has high-level forces for some conformations, the
    second none (multi-fidelity transfer, ``high_force_weight``)."""
    write_levels(tmp_path / "train.h5", TRAIN[:8], conformations=8, high_every=2, seed=0, high_forces=True)
    write_levels(tmp_path / "more.h5", TRAIN[8:], conformations=8, high_every=2, seed=2)
    write_levels(tmp_path / "test.h5", TEST, conformations=4, high_every=1, seed=1)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "transfer",
            "--base",
            "ani-1x",
            "--quick",
            "--strategies",
            "delta,freeze",
            "--train",
            str(tmp_path / "train.h5"),
            "--train",
            str(tmp_path / "more.h5"),
            "--test",
            str(tmp_path / "test.h5"),
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--export-best",
            str(tmp_path / "best.safetensors"),
            "--budget",
            "high_force_weight=1.0",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["base"] == "ani-1x" and "dft_model" not in data["baselines"]
    assert data["budget"]["high_force_weight"] == 1.0
    assert data["train"] == f"{tmp_path / 'train.h5'}, {tmp_path / 'more.h5'}"
    assert "data: 96 low-level and 48 high-level training conformations" in result.output
    base = data["baselines"]["base_model"]
    # The base plus offsets is the official ANI-1x scored the same way, and its reaction
    # errors are the published ones (shared/benchmarks/reactions/README: 19.65 and 4.63).
    assert abs(base["conformer_rmse_kcal"] - data["baselines"]["ani-1x"]["conformer_rmse_kcal"]) < 1e-9
    assert abs(base["reactions"]["HC7-11"]["mae_kcal"] - 19.65) < 0.01
    assert abs(base["reactions"]["ISOL6"]["mae_kcal"] - 4.63) < 0.01
    assert data["baselines"]["dft_method"]["reactions"]["HC7-11"]["reactions"] == 7
    for strategy in data["strategies"]:
        run = strategy["runs"][0]
        trained = load_saved(run["model"])
        assert trained.ensemble_size == 8 and read_description(run["model"])["training"]["forces_key"] == (
            "ccsd(t)_ccpvdz.forces"
        )
        assert trained.uncertainty["energy_std_scale"] > 0  # calibrated on its validation molecules
        assert np.isfinite(run["validation_conformer_rmse_kcal"]) and set(run["reactions"]) == {"HC7-11", "ISOL6"}
    assert "base: ani-1x" in result.output and "base ani-1x (+ offsets)" in result.output
    chosen = min(data["strategies"], key=lambda s: s["validation_conformer_rmse_kcal"])
    assert read_description(tmp_path / "best.safetensors")["benchmark"]["strategy"] == chosen["name"]


@pytest.mark.slow
def test_energies_first_trains_the_same_correction_on_with_forces(tmp_path):
    """``energies_first``: each run first trains on energies alone (epochs by conformer
    RMSE), then the *same* correction trains on with forces, on the same validation
    molecules: the second stage starts where the first stopped, and its record says so."""
    write_levels(tmp_path / "train.h5", TRAIN, conformations=8, high_every=2, seed=0, high_forces=True)
    write_levels(tmp_path / "test.h5", TEST, conformations=4, high_every=1, seed=1)
    work = tmp_path / "work"
    result = CliRunner().invoke(
        main,
        ["bench", "transfer", "--base", "ani-1x", "--quick", "--strategies", "delta"]
        + ["--train", str(tmp_path / "train.h5"), "--test", str(tmp_path / "test.h5")]
        + ["--workdir", str(work), "--json", str(tmp_path / "bench.json")]
        + ["--budget", "high_force_weight=1.0", "--budget", 'selection="all"', "--budget", "energies_first=true"],
    )
    assert result.exit_code == 0, result.output
    first = read_description(work / "delta-seed0-energies.safetensors")["training"]
    second = read_description(work / "delta-seed0.safetensors")
    # Stage one scored no forces (weight 0); stage two did, from stage one's weights.
    assert all("force_rmse_kcal_per_a" not in epoch for epoch in first["history"])
    assert all("force_rmse_kcal_per_a" in epoch for epoch in second["training"]["history"])
    assert second["training"]["validation_groups"] == first["validation_groups"]
    start = second["training"]["validation_start"]
    assert start["conformer_rmse_kcal"] == pytest.approx(first["validation_conformer_rmse_kcal"], rel=1e-6)
    assert second["training"]["transfer"]["energies_first"] == "delta-seed0-energies.safetensors"
    # One correction, not two stacked: the model is still base + one correction network.
    assert second["element_network"]["params"]["base"]["name"] == "ani-mlp"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(registry().names("transfer-strategy")))
def test_transfer_from_ani2x_trains_on_chno_data(strategy, tmp_path):
    """ANI-2x has seven elements; data with four of them still trains (self energies of
    the absent ones are kept), with every registered strategy."""
    write_levels(tmp_path / "train.h5", TRAIN[:6], conformations=4, high_every=1, seed=0)
    out = tmp_path / "cc.safetensors"
    result = CliRunner().invoke(
        main,
        [
            "transfer",
            "--from",
            "ani-2x",
            "--data",
            str(tmp_path / "train.h5"),
            "--energy-key",
            "ccsd(t)_ccpvdz.energy",
            "--strategy",
            strategy,
            "--epochs",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    model = load_saved(out)
    assert model.elements == ["H", "C", "N", "O", "S", "F", "Cl"] and model.ensemble_size == 8
    official = cached_model("ani-2x", "float64")
    assert float(model.self_energies[model.elements.index("S")]) == float(
        official.self_energies[official.elements.index("S")]
    )


def test_an_md_pool_trajectory_ends_where_it_collapses(monkeypatch, tmp_path):
    """ANI-1x's N₂ fuses in MD: the pool keeps a trajectory up to its last frame with all
    atoms at least MIN_DISTANCE apart, and none of a trajectory that starts collapsed."""
    from aniserve.bench import md_pool
    from aniserve.qmdata.records import read_h5

    write_levels(tmp_path / "starts.h5", TRAIN[:2], conformations=2, high_every=1, seed=0)
    gap = [1.1, 1.0, 0.3, 1.1]  # the third frame has collapsed: it and all after it go

    def frames(model, numbers, positions, temperature, steps, interval, seed, timestep_fs=0.5):
        x = np.asarray(positions, float)
        out = []
        for d in gap:
            y = x.copy()
            y[1] = y[0] + [d, 0, 0]
            out.append(y)
        return out

    monkeypatch.setattr("aniserve.learn.langevin_frames", frames)
    out = md_pool.build(tmp_path / "starts.h5", tmp_path / "pool", "ani-1x", "ani-1x", 40, 10)
    records = read_h5(out)
    assert len(records) == 2 * len(md_pool.TEMPERATURES) * 2  # 2 molecules × 2 temperatures × 2 frames
    assert min(md_pool.closest_distance(r["positions"]) for r in records) >= md_pool.MIN_DISTANCE
    assert md_pool.closest_distance([[0, 0, 0], [0, 0, 0.25], [3, 0, 0]]) == pytest.approx(0.25)


def md_bench_arguments(tmp_path, out, *extra) -> list[str]:
    """A quick ``bench active --pool md`` on small files written here (K = 4, 8; two arms)."""
    write_levels(tmp_path / "train.h5", TRAIN, conformations=8, high_every=2, seed=0)
    write_levels(tmp_path / "test.h5", TEST, conformations=4, high_every=1, seed=1)
    arguments = ["bench", "active", "--quick", "--pool", "md", "--md-steps", "30", *extra]
    arguments += ["--ks", "4,8", "--arms", "random,band", "--epochs", "2", "--train", str(tmp_path / "train.h5")]
    return arguments + ["--test", str(tmp_path / "test.h5"), "--workdir", str(tmp_path / "work"), "--json", str(out)]


@pytest.mark.slow
def test_active_bench_on_an_md_pool_scores_forces_against_the_teacher(tmp_path):
    """--pool md: MD frames (300 and 1,000 K) of the pool file's molecules, explored with
    the base model and labelled by the teacher; the arms are scored by force RMSE against
    the teacher, per temperature too, and the validation molecules stay outside."""
    out = tmp_path / "active.json"
    result = CliRunner().invoke(main, md_bench_arguments(tmp_path, out, "--base", "ani-1x", "--teacher", "ani-1ccx"))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["pool_kind"]["kind"] == "md" and data["figure"] == "force_rmse_kcal_per_a"
    assert data["pool_size"] > 0 and "MD frames labelled by ani-1ccx" in result.output
    validation = set(data["validation_groups"])
    from aniserve.qmdata.records import read_h5

    frames = read_h5(next((tmp_path / "work").glob("md-train-*.h5")))
    assert {r["molecule"].rsplit("@", 1)[1] for r in frames} == {"300K", "1000K"}
    assert all("teacher" in r["levels"] and r["levels"]["teacher"]["forces"] is not None for r in frames)
    for arm, rows in data["arms"].items():
        assert [r["k"] for r in rows] == [4, 8], arm
        for row in rows:
            for key in ("force_rmse_kcal_per_a", "force_rmse_300K_kcal_per_a", "force_rmse_1000K_kcal_per_a"):
                assert np.isfinite(row[key]) and row[key] > 0, (arm, key)
            for run in row["runs"]:
                assert not validation & set(run["labelled_groups"])
    assert set(data["labels_to_match_random"]) == {"random", "band"}


@pytest.mark.slow
def test_active_bench_with_its_own_student_replays_the_pretraining_data(tmp_path):
    """--base student: a small ensemble pretrained on the teacher's labels of the pool
    file's conformations, one per seed; every round trains on its labels and a replayed
    sample of that data (twice as many).  It is the default (and so is the full
    strategy for it); --test and --hold-out together are refused."""
    from aniserve.bench import active

    out = tmp_path / "active.json"
    result = CliRunner().invoke(main, md_bench_arguments(tmp_path, out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["base"] == "student" and data["budget"]["pretrain_epochs"] > 0 and data["strategy"] == "full"
    students = list((tmp_path / "work").glob("pretrained-*.safetensors"))
    assert len(students) == 1 and load_saved(students[0]).ensemble_size == data["budget"]["ensemble_size"]
    for row in data["arms"]["random"]:
        (run,) = row["runs"]
        trained = read_description(tmp_path / "work" / f"random-k{row['k']}-seed0.safetensors")["training"]
        # the labels plus twice as many replayed conformations of the student's own data
        assert len(trained["data"]) == 2
        assert np.isfinite(run["force_rmse_kcal_per_a"])
    assert f"on {4 + active.REPLAY_PER_LABEL * 4} conformations" in result.output
    assert f"on {8 + active.REPLAY_PER_LABEL * 8} conformations" in result.output
    both = ["--train", str(tmp_path / "train.h5"), "--test", str(tmp_path / "test.h5"), "--hold-out", "0.2"]
    wrong = CliRunner().invoke(main, ["bench", "active", "--quick", *both])
    assert wrong.exit_code != 0 and "give --test or --hold-out, not both" in wrong.output


@pytest.mark.slow
def test_active_bench_learns_the_shipped_dft_labels_of_every_conformation(tmp_path):
    """The second task: --pool conformations --level wb97x, the pool file's ωB97X
    energies and forces of every conformation (not only those with CCSD(T)), learnt by
    the student and scored on forces of held-out formulas' conformations."""
    write_levels(tmp_path / "train.h5", TRAIN, conformations=8, high_every=2, seed=0)
    out = tmp_path / "active.json"
    arguments = ["bench", "active", "--quick", "--pool", "conformations", "--level", "wb97x", "--hold-out", "0.25"]
    arguments += ["--ks", "4,8", "--arms", "random,band", "--epochs", "2", "--train", str(tmp_path / "train.h5")]
    result = CliRunner().invoke(main, [*arguments, "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["figure"] == "force_rmse_kcal_per_a" and data["pool_kind"]["level"] == "wb97x"
    assert data["pool"] == str(tmp_path / "train.h5") and data["test"] is None  # as given, not the workdir's split
    assert "conformations at wb97x" in result.output
    formulas = len(TRAIN) - round(0.25 * len(TRAIN))  # (the pool's, validation included)
    validation = set(data["validation_groups"])
    assert data["pool_size"] == 8 * (formulas - len(validation))  # every conformation, not the 4 with CCSD(T)
    for rows in data["arms"].values():
        for row in rows:
            assert np.isfinite(row["force_rmse_kcal_per_a"]) and row["force_rmse_kcal_per_a"] > 0
            for run in row["runs"]:
                assert not validation & set(run["labelled_groups"])


def test_hold_out_splits_the_pool_file_by_formula_the_same_way_every_time(tmp_path):
    """--hold-out: test molecules from the pool file's own distribution, whole formulas,
    none left in the pool, the same draw every time; a share that leaves no pool is refused."""
    from aniserve.bench.active import hold_out
    from aniserve.qmdata.records import read_h5

    write_levels(tmp_path / "train.h5", TRAIN, conformations=4, high_every=1, seed=0)
    pool, test = hold_out(tmp_path / "train.h5", 0.3, tmp_path / "a")

    def formulas(path):
        return {tuple(sorted(r["numbers"])) for r in read_h5(path)}

    assert formulas(pool) and formulas(test) and not formulas(pool) & formulas(test)
    assert formulas(pool) | formulas(test) == formulas(tmp_path / "train.h5")
    assert len(read_h5(pool)) + len(read_h5(test)) == len(read_h5(tmp_path / "train.h5"))
    again = hold_out(tmp_path / "train.h5", 0.3, tmp_path / "b")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in (pool, test)]
    with pytest.raises(ValueError, match="leaves no formula"):
        hold_out(tmp_path / "train.h5", 0.99, tmp_path / "c")


def test_relabelled_copies_of_one_file_are_the_same_bytes_wherever_they_lie(tmp_path):
    """The student's cache key is its data file's hash: the teacher's labels of two
    byte-identical files (two --hold-out runs' splits, in different workdirs) must be
    byte-identical too, so the second run reuses the first's students."""
    import shutil

    from aniserve.bench import md_pool
    from aniserve.embedded import DEFAULT_MODEL

    write_levels(tmp_path / "train.h5", TRAIN[:3], conformations=2, high_every=1, seed=0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "train.h5", tmp_path / name / "pool.h5")
    a, b = (md_pool.relabel(tmp_path / name / "pool.h5", tmp_path / name / "work", DEFAULT_MODEL) for name in "ab")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_two_views_of_ani_data_join_into_one_set(tmp_path):
    """ANIData.union: the conformations of both views, each read from its own file."""
    from aniserve.training import ANIData

    write_levels(tmp_path / "a.h5", TRAIN[:3], conformations=4, high_every=1, seed=0)
    write_levels(tmp_path / "b.h5", TRAIN[3:5], conformations=4, high_every=1, seed=1)
    a = ANIData(tmp_path / "a.h5", "wb97x_631gd.energy")
    b = ANIData(tmp_path / "b.h5", "wb97x_631gd.energy")
    joined = a.select(a.items()[:5]).union(b)
    assert len(joined) == 5 + len(b)
    batch = joined.read(joined.items())
    both = np.concatenate([a.read(a.items()[:5]).energy.numpy(), b.read(b.items()).energy.numpy()])
    assert np.array_equal(np.sort(batch.energy.numpy()), np.sort(both))
    assert len(a.union(a.select(a.items()[:2])).paths) == 1  # one file read by both: listed once
    # Views of other targets join, each read under its own keys; forces on one side only do not.
    high = ANIData(tmp_path / "b.h5", "ccsd(t)_ccpvdz.energy")
    mixed = a.select(a.items()[:5]).union(high)
    energies = np.sort(mixed.read(mixed.items()).energy.numpy())
    both = np.concatenate([a.read(a.items()[:5]).energy.numpy(), high.read(high.items()).energy.numpy()])
    assert np.array_equal(energies, np.sort(both)) and mixed.energy_key == "wb97x_631gd.energy"
    with pytest.raises(ValueError, match="forces on one side only"):
        a.union(ANIData(tmp_path / "b.h5", "wb97x_631gd.energy", "wb97x_631gd.forces"))


@pytest.mark.slow
def test_quick_active_bench_runs_every_arm_without_a_selection_leak(tmp_path):
    """Every arm labels K = 8 then 16 in rounds; the epochs are chosen on validation
    molecules that are fixed, the same for every arm, and never in the pool or any
    selection (the old loop validated on a split of the selection itself)."""
    write_levels(tmp_path / "train.h5", TRAIN, conformations=8, high_every=2, seed=0)
    write_levels(tmp_path / "test.h5", TEST, conformations=4, high_every=1, seed=1)
    out = tmp_path / "active.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "active",
            "--quick",
            "--pool",
            "conformations",
            "--base",
            "ani-1x",
            "--epochs",
            "2",
            "--train",
            str(tmp_path / "train.h5"),
            "--test",
            str(tmp_path / "test.h5"),
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "active.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["arms"]) == {"random", "top-k", "band", "band-fps"}
    validation = set(data["validation_groups"])
    assert validation and data["pool_size"] + 4 * len(validation) == 48  # 12 formulas × 4 CCSD(T) points
    for arm, rows in data["arms"].items():
        assert [r["k"] for r in rows] == [8, 16], arm
        assert all(np.isfinite(r["conformer_rmse_kcal"]) for r in rows)
        for row in rows:
            for run in row["runs"]:
                assert set(run["validation_groups"]) == validation  # fixed, and outside every selection:
                assert not validation & set(run["labelled_groups"]), (arm, run["labelled_groups"])
                assert run["labels"] == row["k"] and run["best_epoch"] >= 0
    assert set(data["labels_to_match_random"]) == set(data["arms"]) and data["labels_to_match_random"]["random"] <= 1
    # Query by committee's first round takes the start committee's largest force deviations.
    from aniserve.bench.active import VALIDATION_SEED, VALIDATION_SHARE, candidates
    from aniserve.modelfile import load_saved
    from aniserve.training import ANIData

    pool, _ = ANIData(tmp_path / "train.h5", "ccsd(t)_ccpvdz.energy").split(VALIDATION_SHARE, VALIDATION_SEED)
    start = load_saved(tmp_path / "work" / "start.safetensors").to(torch.float64).eval()
    deviation = candidates(start, pool, pool.items()).force_deviation
    first = data["arms"]["top-k"][0]["runs"][0]["selected_force_deviation_kcal_per_a"]
    assert abs(first - np.sort(deviation)[-8:].mean()) < 1e-6
    assert (tmp_path / "active.png").stat().st_size > 1000


def test_forces_are_scored_against_ccsd_t_where_the_test_set_has_them(tmp_path):
    """bench transfer's force column against coupled cluster: only conformations with
    CCSD(T) forces count, by element too; the DFT method's own forces are scored the same way."""
    from aniserve.bench.scoring import cc_force_errors, metrics, read_test_set
    from aniserve.units import HARTREE_IN_KCAL_PER_MOL

    water = np.array([8, 1, 1])
    pos = np.random.default_rng(1).normal(size=(3, 3, 3))
    cc_forces = np.full((3, 3, 3), np.nan)
    cc_forces[0] = 0.01
    write_ani_h5(
        tmp_path / "t.h5",
        {
            "H2O": {
                "atomic_numbers": water,
                "coordinates": pos,
                "wb97x_631gd.energy": np.array([-76.0, -76.1, -76.2]),
                "wb97x_631gd.forces": np.zeros((3, 3, 3)),
                "ccsd(t)_ccpvdz.energy": np.array([-76.2, -76.3, -76.4]),
                "ccsd(t)_ccpvdz.forces": cc_forces,
            }
        },
    )
    test = read_test_set(tmp_path / "t.h5")
    predicted = [np.full((3, 3), 0.01), np.full((3, 3), 0.01), np.full((3, 3), 0.01)]
    predicted[0][0] = [0.04, 0.01, 0.01]  # the oxygen off by 0.03 in x in the one CC conformation
    out = metrics(test.high, test, predicted)
    assert out["cc_force_conformations"] == 1
    assert out["force_rmse_vs_cc_kcal_per_a"] == pytest.approx(np.sqrt(0.03**2 / 9) * HARTREE_IN_KCAL_PER_MOL)
    assert out["force_rmse_vs_cc_by_element"]["O"] == pytest.approx(np.sqrt(0.03**2 / 3) * HARTREE_IN_KCAL_PER_MOL)
    assert out["force_rmse_vs_cc_by_element"]["H"] == 0.0
    assert out["force_rmse_vs_dft_kcal_per_a"] > out["force_rmse_vs_cc_kcal_per_a"]  # all three against zeros
    assert cc_force_errors(test.low_forces, test)["force_rmse_vs_cc_kcal_per_a"] == pytest.approx(
        0.01 * HARTREE_IN_KCAL_PER_MOL
    )


def test_cc_force_errors_are_broken_down_by_molecule(tmp_path):
    """Two molecules with CCSD(T) forces: each gets its own force RMSE, and the overall
    figure is the atom-weighted mean of their squares."""
    from aniserve.bench.scoring import cc_force_errors, read_test_set

    rng = np.random.default_rng(2)
    groups = {}
    for name, numbers in (("H2O", [8, 1, 1]), ("CH4", [6, 1, 1, 1, 1])):
        n = len(numbers)
        groups[name] = {
            "atomic_numbers": np.array(numbers),
            "coordinates": rng.normal(size=(2, n, 3)),
            "ccsd(t)_ccpvdz.energy": np.array([-1.0, -1.1]),
            "ccsd(t)_ccpvdz.forces": np.zeros((2, n, 3)),
        }
    write_ani_h5(tmp_path / "t.h5", groups)
    test = read_test_set(tmp_path / "t.h5")
    forces = [np.full((len(n), 3), 0.01 if test.molecule[i] == "H2O" else 0.02) for i, n in enumerate(test.numbers)]
    out = cc_force_errors(forces, test)
    by_molecule = out["force_rmse_vs_cc_by_molecule"]
    assert by_molecule["H2O"] == pytest.approx(0.01 * 627.5094740631)
    assert by_molecule["CH4"] == pytest.approx(0.02 * 627.5094740631)
    overall = np.sqrt((3 * by_molecule["H2O"] ** 2 + 5 * by_molecule["CH4"] ** 2) / 8)
    assert out["force_rmse_vs_cc_kcal_per_a"] == pytest.approx(overall)


def test_budget_overrides_name_unknown_fields_and_can_pick_the_seeds():
    """--budget KEY=VALUE: a known field changes, seeds=[3, 4] runs those seeds (more
    seeds of a finished run, without repeating it), an unknown field is named."""
    from aniserve.bench.budget import ACTIVE_STUDENT

    assert ACTIVE_STUDENT.with_changes(2).seeds == (0, 1)
    more = ACTIVE_STUDENT.with_changes(None, {"seeds": [3, 4], "ks": [64, 32]})
    assert more.seeds == (3, 4) and more.ks == (32, 64)
    with pytest.raises(ValueError, match=r"unknown budget field\(s\) \['epoch'\]"):
        ACTIVE_STUDENT.with_changes(None, {"epoch": 3})


def test_energies_first_budget_needs_forces_and_its_first_stage_trains_energies_alone():
    """The first stage of ``energies_first`` trains energies only, epochs by conformer RMSE,
    on the same seed (so the same validation molecules) as the second; without a force
    weight there is no second stage to add, and the budget says so."""
    from aniserve.bench.budget import FROM_BASE

    budget = FROM_BASE.with_changes(None, {"high_force_weight": 2.0, "selection": "all", "energies_first": True})
    first, second = budget.energies_stage_settings(seed=1), budget.transfer_settings(seed=1)
    assert (first.force_weight, first.selection) == (0.0, "conformer")
    assert (second.force_weight, second.selection) == (2.0, "all")
    assert first.seed == second.seed == 1 and first.validation == second.validation
    with pytest.raises(ValueError, match="energies_first .* needs high_force_weight above 0"):
        FROM_BASE.with_changes(None, {"energies_first": True})


def test_budget_gives_the_transfer_runs_their_own_optimiser_settings_without_touching_pretraining():
    """transfer_lr and transfer_weight_decay reach the transfer runs' trainer settings and
    stay out of the pretrained model's cache key (a cached pretraining stays valid)."""
    from aniserve.bench.budget import ACTIVE_STUDENT

    changed = ACTIVE_STUDENT.with_changes(None, {"transfer_lr": 1e-4, "transfer_weight_decay": 0.5})
    settings = changed.transfer_settings(seed=2)
    assert (settings.lr, settings.weight_decay, settings.seed) == (1e-4, 0.5, 2)
    assert changed.pretraining() == ACTIVE_STUDENT.pretraining()
    assert changed.pretrain_settings(0).weight_decay == ACTIVE_STUDENT.pretrain_settings(0).weight_decay
