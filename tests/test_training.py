"""Training and transfer learning on small files written here, labelled by the official
ANI-1x model (a smooth, realistic teacher) so that learning is measurable in seconds."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, cached_model, perturbed_molecules

from aniserve.modelfile import load_saved
from aniserve.training import ANIData, DataError, Settings, default_description, new_model, train, transfer_model
from aniserve.training.data import write_ani_h5
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

pytestmark = [pytest.mark.weights]  # the official ANI weights (see conftest)

MOLECULES = ["CH4", "H2O", "NH3", "C2H6", "CH3OH", "HCN", "C2H4", "H2CO", "H3CNH2", "HCOOH", "N2H4", "CH3CHO"]


def teacher_groups(conformations=10, seed=0, shift=0.0):
    """{formula: arrays} with ANI-1x energies/forces (+ ``shift`` Ha per heavy atom as a
    stand-in 'higher level'), atoms ordered by decreasing atomic number per group."""
    model = cached_model("ani-1x", "float64")
    groups = {}
    for formula, _, numbers, pos in perturbed_molecules(MOLECULES, conformations, np.random.default_rng(seed), 0.06):
        result = model.evaluate(np.repeat(numbers[None], conformations, 0), pos)
        energy = result.energy + shift * (numbers > 1).sum() + 0.002 * np.sin(3 * pos[:, 0, 0])
        groups[formula] = {
            "atomic_numbers": numbers,
            "coordinates": pos,
            "wb97x_dz.energy": energy,
            "wb97x_dz.forces": result.forces,
            "ccsd(t)_cbs.energy": energy + 0.001 * pos[:, 0, 1],
        }
    return groups


@pytest.fixture(scope="module")
def dft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dft.h5"
    write_ani_h5(path, teacher_groups())
    return path


def small_model(seed=0):
    return new_model(default_description(hidden=(16, 8, 8), ensemble_size=2), seed)


def quick(**kw):
    return Settings(**{"epochs": 4, "batch_size": 16, "lr": 3e-3, "validation": 0.25, **kw})


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_both_layouts_read_the_same_structures(tmp_path):
    groups = teacher_groups(conformations=3)
    write_ani_h5(tmp_path / "ani.h5", groups)
    torchani_groups = {
        k: {"atomic_numbers": v["atomic_numbers"], "coordinates": v["coordinates"], "energies": v["wb97x_dz.energy"]}
        for k, v in groups.items()
    }
    write_ani_h5(tmp_path / "torchani.h5", torchani_groups, layout="torchani")
    a = list(ANIData(tmp_path / "ani.h5", "wb97x_dz.energy").batches(64))
    b = list(ANIData(tmp_path / "torchani.h5", "energies").batches(64))
    assert sum(len(x) for x in a) == 3 * len(MOLECULES)
    for x, y in zip(a, b):
        assert torch.equal(x.numbers, y.numbers)
        assert torch.equal(x.positions, y.positions)
        assert torch.equal(x.energy, y.energy)


def test_batches_group_similar_sizes_and_skip_missing(tmp_path):
    groups = teacher_groups(conformations=4)
    groups["CH4"]["wb97x_dz.energy"][1] = np.nan
    write_ani_h5(tmp_path / "d.h5", groups)
    data = ANIData(tmp_path / "d.h5", "wb97x_dz.energy")
    assert len(data) == 4 * len(MOLECULES) - 1
    for batch in data.batches(4, seed=1):
        assert torch.isfinite(batch.energy).all()
        sizes = (batch.numbers > 0).sum(1)
        assert int(sizes.max() - sizes.min()) <= 3
    train_part, val_part = data.split(0.25, seed=3)
    assert not {g.name for g in train_part.groups} & {g.name for g in val_part.groups}
    assert [g.name for g in data.split(0.25, seed=3)[1].groups] == [g.name for g in val_part.groups]


def test_training_lowers_validation_rmse_and_saves(dft_file, tmp_path):
    data = ANIData(dft_file, "wb97x_dz.energy", "wb97x_dz.forces")
    model = small_model()
    summary = train(model, data, tmp_path / "m.safetensors", quick(epochs=8))
    history = summary["history"]
    assert history[-1]["energy_rmse_kcal"] < 0.5 * history[0]["energy_rmse_kcal"]
    saved = load_saved(tmp_path / "m.safetensors")
    batch = next(ANIData(dft_file, "wb97x_dz.energy").batches(8))
    from aniserve.training.trainer import predict

    with torch.no_grad():
        a = predict(saved.eval(), batch, False)[0]
        b = predict(model.eval(), batch, False)[0]
    assert torch.allclose(a, b, atol=1e-9)


def test_resume_reproduces_an_uninterrupted_run(dft_file, tmp_path):
    data = ANIData(dft_file, "wb97x_dz.energy", "wb97x_dz.forces")
    train(small_model(), data, tmp_path / "straight.safetensors", quick(epochs=4))
    train(small_model(), data, tmp_path / "broken.safetensors", quick(epochs=2))
    # The run 'killed' after epoch 2 continues from its checkpoint to epoch 4.
    train(small_model(seed=99), data, tmp_path / "broken.safetensors", quick(epochs=4), resume=True)
    a = load_saved(tmp_path / "straight.safetensors").state_dict()
    b = load_saved(tmp_path / "broken.safetensors").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def pretrained(dft_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("pre") / "pre.safetensors"
    train(small_model(), ANIData(dft_file, "wb97x_dz.energy", "wb97x_dz.forces"), path, quick(epochs=3))
    return path


@pytest.mark.parametrize(
    "strategy, frozen",
    [
        ("full", []),
        ("freeze", ["weights.0", "biases.0", "weights.2", "biases.2"]),
        ("delta", ["base."]),
    ],
)
def test_strategy_trains_exactly_what_it_claims(strategy, frozen, pretrained, dft_file, tmp_path):
    model, penalty = transfer_model(load_saved(pretrained), strategy, {}, seed=0)
    names = dict(model.named_parameters())
    is_frozen = {n: any(f in n for f in frozen) for n in names}
    assert {n for n, p in names.items() if not p.requires_grad} == {n for n in names if is_frozen[n]}
    before = {n: digest([p]) for n, p in names.items()}
    train(model, ANIData(dft_file, "ccsd(t)_cbs.energy"), tmp_path / "t.safetensors", quick(epochs=2), penalty=penalty)
    after = {n: digest([p]) for n, p in load_saved(tmp_path / "t.safetensors").named_parameters()}
    for n in names:
        assert (before[n] == after[n]) == is_frozen[n], n


def test_scratch_starts_from_new_weights(pretrained):
    original = load_saved(pretrained)
    fresh, _ = transfer_model(load_saved(pretrained), "scratch", {}, seed=0)
    assert all(p.requires_grad for p in fresh.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(original.parameters(), fresh.parameters()))
    assert [p.shape for p in original.parameters()] == [p.shape for p in fresh.parameters()]


def test_freeze_layers_option_and_range(pretrained):
    model, _ = transfer_model(load_saved(pretrained), "freeze", {"freeze_layers": [1, 2, 3]}, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("weights.3" in n or "biases.3" in n for n in trainable)
    with pytest.raises(ValueError, match="out of range"):
        transfer_model(load_saved(pretrained), "freeze", {"freeze_layers": [7]}, seed=0)


def test_delta_model_starts_equal_and_reloads(pretrained, dft_file, tmp_path):
    # Frozen, as the delta model's base is, so both take the same (written-out) path.
    base = load_saved(pretrained).eval().requires_grad_(False)
    delta, _ = transfer_model(load_saved(pretrained), "delta", {}, seed=0)
    batch = next(ANIData(dft_file, "wb97x_dz.energy").batches(8))
    from aniserve.training.trainer import predict

    with torch.no_grad():
        assert torch.equal(predict(base, batch, False)[0], predict(delta.eval(), batch, False)[0])
    from aniserve.modelfile import save_model

    save_model(delta, tmp_path / "delta.safetensors")
    assert load_saved(tmp_path / "delta.safetensors").description["element_network"]["name"] == "delta"


def test_delta_continue_trains_the_existing_correction(pretrained, tmp_path):
    """Option ``continue``: a delta model's own correction trains on (the second stage of
    ``energies_first``, active learning's rounds); without it a new one is stacked."""
    delta, _ = transfer_model(load_saved(pretrained), "delta", {}, seed=0)
    with torch.no_grad():
        for p in delta.networks.correction.parameters():
            p.add_(0.01)  # a correction that has learnt something
    kept = {k: v.clone() for k, v in delta.networks.correction.state_dict().items()}
    continued, _ = transfer_model(delta, "delta", {"continue": True}, seed=1)
    assert continued is delta and continued.networks.correction.state_dict().keys() == kept.keys()
    assert all(torch.equal(continued.networks.correction.state_dict()[k], v) for k, v in kept.items())
    trainable = {n for n, p in continued.named_parameters() if p.requires_grad}
    assert trainable == {f"networks.correction.{n}" for n, _ in continued.networks.correction.named_parameters()}
    stacked, _ = transfer_model(continued, "delta", {}, seed=1)
    assert stacked.networks.base is continued.networks  # the whole Δ model became the base
    with pytest.raises(ValueError, match="needs a model that delta made; .*'ani-mlp'"):
        transfer_model(load_saved(pretrained), "delta", {"continue": True}, seed=0)


def test_cli_train_then_transfer(dft_file, tmp_path):
    from click.testing import CliRunner

    from aniserve.cli import main

    runner = CliRunner()
    pre = tmp_path / "pre.safetensors"
    config = tmp_path / "config.json"
    import json

    config.write_text(json.dumps(default_description(hidden=(16, 8, 8), ensemble_size=2)))
    result = runner.invoke(
        main,
        [
            "train",
            "--data",
            str(dft_file),
            "--energy-key",
            "wb97x_dz.energy",
            "--config",
            str(config),
            "--out",
            str(pre),
            "--epochs",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "cc.safetensors"
    result = runner.invoke(
        main,
        [
            "transfer",
            "--from",
            str(pre),
            "--data",
            str(dft_file),
            "--energy-key",
            "ccsd(t)_cbs.energy",
            "--strategy",
            "freeze",
            "--freeze-layers",
            "1,3",
            "--out",
            str(out),
            "--epochs",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    from aniserve.modelfile import read_description

    training = read_description(out)["training"]
    assert training["transfer"] == {"from": str(pre), "strategy": "freeze", "options": {"freeze_layers": [1, 3]}}


def test_cli_energies_then_forces_trains_one_correction(pretrained, dft_file, tmp_path):
    """docs/training.md's two-stage recipe by hand: ``--option continue=true`` trains the
    first stage's correction on (its weights are the start) instead of stacking another."""
    from click.testing import CliRunner

    from aniserve.cli import main
    from aniserve.modelfile import read_description

    # (the synthetic file's second level has energies only: its forces stand in for them)
    common = ["--data", str(dft_file), "--energy-key", "ccsd(t)_cbs.energy", "--epochs", "2", "--seed", "3"]
    first, second = tmp_path / "stage1.safetensors", tmp_path / "stage2.safetensors"
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["transfer", "--from", str(pretrained), "--strategy", "delta", "--select", "conformer", "--out", str(first)]
        + common,
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["transfer", "--from", str(first), "--strategy", "delta", "--option", "continue=true", "--out", str(second)]
        + common
        + ["--forces-key", "wb97x_dz.forces", "--force-weight", "1", "--select", "all"],
    )
    assert result.exit_code == 0, result.output
    one, two = read_description(first), read_description(second)
    assert two["training"]["transfer"]["options"] == {"continue": True}
    assert two["element_network"]["params"]["base"]["name"] == "ani-mlp"  # not a Δ of a Δ
    assert two["training"]["validation_groups"] == one["training"]["validation_groups"]
    start = two["training"]["validation_start"]["conformer_rmse_kcal"]
    assert start == pytest.approx(one["training"]["validation_conformer_rmse_kcal"], rel=1e-6)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_trend(dft_file, tmp_path):
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps(default_description(hidden=(16, 8, 8), ensemble_size=2)))
    common = [
        "--data",
        str(dft_file),
        "--energy-key",
        "wb97x_dz.energy",
        "--forces-key",
        "wb97x_dz.forces",
        "--config",
        str(config),
        "--epochs",
        "5",
        "--lr",
        "3e-3",
        "--validation",
        "0.25",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "aniserve",
        "train",
        *common,
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "ddp.safetensors"),
    ]
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "aniserve",
            "train",
            *common,
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "one.safetensors"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    from aniserve.modelfile import read_description

    ddp = [h["energy_rmse_kcal"] for h in read_description(tmp_path / "ddp.safetensors")["training"]["history"]]
    one = [h["energy_rmse_kcal"] for h in read_description(tmp_path / "one.safetensors")["training"]["history"]]
    assert len(ddp) == len(one) == 5
    # Same effective batch (2 × 8 vs 16): both fall, and end within a factor of two.
    assert ddp[-1] < 0.7 * ddp[0] and one[-1] < 0.7 * one[0]
    assert 0.5 < ddp[-1] / one[-1] < 2.0


def test_bad_data_is_named(dft_file, tmp_path):
    with pytest.raises(DataError, match=r"no dataset named 'wb97x_631gd.energy'.*wb97x_dz.energy"):
        ANIData(dft_file, "wb97x_631gd.energy")
    broken = tmp_path / "broken.h5"
    broken.write_bytes(dft_file.read_bytes()[:4000])
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        ANIData(broken, "wb97x_dz.energy")
    groups = teacher_groups(conformations=2)
    groups["SH2"] = {
        "atomic_numbers": np.array([16, 1, 1]),
        "coordinates": np.array([[[0.0, 0, 0], [1.34, 0, 0], [0, 1.34, 0]]] * 2),
        "wb97x_dz.energy": np.zeros(2),
    }
    write_ani_h5(tmp_path / "s.h5", groups)
    with pytest.raises(DataError, match=r"does not cover: S \(2 atoms in 2 conformations\)"):
        train(small_model(), ANIData(tmp_path / "s.h5", "wb97x_dz.energy"), tmp_path / "x.safetensors", quick())


def test_several_data_files_train_as_one_set(tmp_path):
    """--data twice: the files read as one set (same batches' content as one merged
    file), a formula in both files is one group for the split, and the CLI trains on it."""
    from click.testing import CliRunner

    from aniserve.cli import main

    groups = teacher_groups(conformations=4)
    names = sorted(groups)
    write_ani_h5(tmp_path / "all.h5", groups)
    write_ani_h5(tmp_path / "a.h5", {k: groups[k] for k in names[:7]})
    # The second file repeats one formula of the first (new conformations of a molecule).
    extra = {k: groups[k] for k in names[7:]}
    extra[names[0]] = {k: (v + 0.01 if k == "coordinates" else v) for k, v in groups[names[0]].items()}
    write_ani_h5(tmp_path / "b.h5", extra)
    both = ANIData([tmp_path / "a.h5", tmp_path / "b.h5"], "wb97x_dz.energy", "wb97x_dz.forces")
    assert len(both) == len(ANIData(tmp_path / "all.h5", "wb97x_dz.energy")) + 4
    train, val = both.split(0.25, seed=0)
    assert not {g.name for g in train.groups} & {g.name for g in val.groups}
    assert len(train) + len(val) == len(both)
    batch = both.read([(len(both.groups) - 1, 0)])
    assert batch.group == [both.groups[-1].name] and torch.isfinite(batch.forces).all()
    out = tmp_path / "m.safetensors"
    config = tmp_path / "config.json"
    import json

    config.write_text(json.dumps(default_description(hidden=(16, 8, 8), ensemble_size=2)))
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(tmp_path / "a.h5"),
            "--data",
            str(tmp_path / "b.h5"),
            "--energy-key",
            "wb97x_dz.energy",
            "--config",
            str(config),
            "--out",
            str(out),
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    from aniserve.modelfile import read_description

    assert read_description(out)["training"]["data"] == [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]


def test_train_refuses_to_overwrite_and_writes_readable_files(dft_file, tmp_path):
    import json
    import os

    from click.testing import CliRunner

    from aniserve.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(default_description(hidden=(16, 8, 8), ensemble_size=2)))
    out = tmp_path / "m.safetensors"
    args = [
        "train",
        "--data",
        str(dft_file),
        "--energy-key",
        "wb97x_dz.energy",
        "--config",
        str(config),
        "--out",
        str(out),
        "--epochs",
        "1",
    ]
    old = os.umask(0o022)
    try:
        assert CliRunner().invoke(main, args).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    before = out.read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "give --overwrite" in again.output and out.read_bytes() == before
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0


def test_the_start_competes_with_every_epoch(pretrained, dft_file, tmp_path):
    """A fine-tune that only makes things worse (a learning rate far too high) returns
    the model it started from when the start competes (issue #28: "epoch 0"), and the
    worse trained weights when it does not."""
    data = ANIData(dft_file, "wb97x_dz.energy")
    start = load_saved(pretrained)
    before = digest(start.parameters())
    kept = train(
        load_saved(pretrained), data, tmp_path / "kept.safetensors", quick(epochs=2, lr=5.0, start_competes=True)
    )
    assert kept["best_epoch"] == 0 and digest(load_saved(tmp_path / "kept.safetensors").parameters()) == before
    trained = train(load_saved(pretrained), data, tmp_path / "trained.safetensors", quick(epochs=2, lr=5.0))
    assert trained["best_epoch"] >= 1 and digest(load_saved(tmp_path / "trained.safetensors").parameters()) != before
    assert trained["validation_loss"] > kept["validation_loss"]


def test_selection_on_forces_keeps_the_epoch_with_the_lowest_validation_force_rmse(pretrained, dft_file, tmp_path):
    """``selection="forces"`` (what ``bench active --pool md`` uses: its figure is forces)
    keeps the epoch whose validation force RMSE is lowest, whatever its energies do; it
    needs force labels and a force weight."""
    data = ANIData(dft_file, "wb97x_dz.energy", "wb97x_dz.forces")
    settings = quick(epochs=5, lr=3e-3, force_weight=1.0, selection="forces", early_stop_patience=10)
    summary = train(load_saved(pretrained), data, tmp_path / "forces.safetensors", settings)
    rmse = [row["force_rmse_kcal_per_a"] for row in summary["history"]]
    assert summary["best_epoch"] == 1 + int(np.argmin(rmse))
    assert summary["validation_force_rmse_kcal_per_a"] == pytest.approx(min(rmse))
    with pytest.raises(ValueError, match="selection 'forces' needs force labels"):
        train(load_saved(pretrained), ANIData(dft_file, "wb97x_dz.energy"), tmp_path / "x.safetensors", settings)
    with pytest.raises(ValueError, match="selection must be one of loss, conformer, forces, balanced, all"):
        train(load_saved(pretrained), data, tmp_path / "y.safetensors", quick(selection="energy"))
    from aniserve.cli import main
    from aniserve.training.trainer import SELECTIONS

    for command in ("train", "transfer"):  # the CLI offers every selection (its list is spelt out: no torch import)
        (option,) = [p for p in main.commands[command].params if p.name == "selection"]
        assert tuple(option.type.choices) == SELECTIONS


@pytest.mark.parametrize(
    "selection, summed",
    [
        ("balanced", ("conformer_rmse_kcal", "force_rmse_kcal_per_a")),
        ("all", ("energy_rmse_kcal", "conformer_rmse_kcal", "force_rmse_kcal_per_a")),
    ],
)
def test_relative_selections_weigh_each_error_against_the_start(selection, summed, pretrained, dft_file, tmp_path):
    """``selection="balanced"`` (multi-fidelity transfer, issue #32) keeps the epoch with
    the lowest sum of the validation conformer and force RMSE, each divided by the
    starting model's; "all" adds the total-energy RMSE likewise.  Both need force labels
    like ``forces``."""
    data = ANIData(dft_file, "wb97x_dz.energy", "wb97x_dz.forces")
    settings = quick(epochs=5, lr=3e-3, force_weight=1.0, selection=selection, early_stop_patience=10)
    summary = train(load_saved(pretrained), data, tmp_path / f"{selection}.safetensors", settings)
    start = summary["validation_start"]
    score = [sum(row[k] / start[k] for k in summed) for row in summary["history"]]
    assert summary["best_epoch"] == 1 + int(np.argmin(score))
    with pytest.raises(ValueError, match=f"selection '{selection}' needs force labels"):
        train(load_saved(pretrained), ANIData(dft_file, "wb97x_dz.energy"), tmp_path / "x.safetensors", settings)


def test_self_energies_move_only_as_far_as_the_data_determines(tmp_path):
    """One composition (one molecule's labels, as ``aniserve learn`` has) fixes only the
    sum of its self energies: the fit changes them by the least it can and matches the
    sum; with enough compositions it is the ordinary least-squares fit, wherever it starts."""
    from aniserve.models import load_model
    from aniserve.training.trainer import fit_self_energies

    groups = teacher_groups(conformations=4)
    write_ani_h5(tmp_path / "one.h5", {"CH4O": groups["CH4O"]})
    write_ani_h5(tmp_path / "many.h5", groups)
    model = load_model("ani-1x", dtype="float64")
    before = model.self_energies.clone()
    fitted = fit_self_energies(model, ANIData(tmp_path / "one.h5", "ccsd(t)_cbs.energy"))
    change = model.self_energies - before
    counts = torch.tensor([4.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # H, C, N, O of CH3OH
    assert fitted["N"] == float(before[2])  # no nitrogen in the data
    assert float(change.abs().max()) < 0.02  # no element moved far (fitted absolutely, H went to −42 Ha)
    assert float((change - change @ counts / counts.pow(2).sum() * counts).abs().max()) < 1e-12  # least norm
    many = ANIData(tmp_path / "many.h5", "ccsd(t)_cbs.energy")
    first = fit_self_energies(model, many)
    with torch.no_grad():
        model.self_energies.copy_(before + 0.3)
    assert fit_self_energies(model, many) == pytest.approx(first, abs=1e-8)


def test_forces_may_exist_for_part_of_the_data(tmp_path):
    """Coupled-cluster forces exist for some conformations only: a file without the forces
    key still trains on its energies (NaN forces), and a key no file holds is an error."""
    groups = teacher_groups(conformations=4)
    names = sorted(groups)
    write_ani_h5(tmp_path / "with.h5", {k: groups[k] for k in names[:6]})
    write_ani_h5(
        tmp_path / "without.h5",
        {k: {f: v for f, v in groups[k].items() if f != "wb97x_dz.forces"} for k in names[6:]},
    )
    both = ANIData([tmp_path / "with.h5", tmp_path / "without.h5"], "wb97x_dz.energy", "wb97x_dz.forces")
    assert len(both) == 4 * len(names)
    last = both.read([(len(both.groups) - 1, 0)])
    first = both.read([(0, 0)])
    assert torch.isnan(last.forces).all() and torch.isfinite(last.energy).all()
    assert torch.isfinite(first.forces[0, : int((first.numbers > 0).sum())]).all()
    with pytest.raises(DataError, match="no dataset named 'wb97x_dz.forcez'"):
        ANIData([tmp_path / "with.h5", tmp_path / "without.h5"], "wb97x_dz.energy", "wb97x_dz.forcez")
    with pytest.raises(DataError, match="without.h5: no dataset named 'wb97x_dz.forces'"):
        ANIData(tmp_path / "without.h5", "wb97x_dz.energy", "wb97x_dz.forces")


def test_training_calibrates_the_spread_on_validation_molecules(dft_file, tmp_path):
    """The saved model carries a spread calibration fitted on the run's validation
    molecules: energy_std is the members' std times the scale, the scale makes the
    spread's RMS equal the error's RMS there, and the threshold flags 5 % of them."""
    from aniserve.training.calibration import spread_and_error

    data = ANIData(dft_file, "wb97x_dz.energy")
    out = tmp_path / "m.safetensors"
    summary = train(small_model(), data, out, quick(epochs=3))
    saved = load_saved(out).to(torch.float64)
    u = saved.uncertainty
    assert u["energy_std_scale"] > 0 and u["collect_threshold_kcal"] > 0
    validation = data.subset(summary["validation_groups"])
    spread, error, atoms = spread_and_error(saved, validation)
    assert np.sqrt(np.mean((u["energy_std_scale"] * spread) ** 2)) == pytest.approx(np.sqrt(np.mean(error**2)), 1e-3)
    rho = u["energy_std_scale"] * spread / np.sqrt(atoms)
    assert np.mean(rho > u["collect_threshold_kcal"]) <= 0.05 + 1 / len(rho)
    # Relative to each molecule's lowest-energy conformation (as ``aniserve learn`` scores
    # frames against its start): the members' common offset cancels; by hand here.
    rows = [
        (saved.evaluate(b.numbers.numpy(), b.positions.numpy()).member_energies[0], b.molecule[0], float(b.energy[0]))
        for b in validation.batches(1)
    ]
    counts = [int((b.numbers > 0).sum()) for b in validation.batches(1)]
    by_hand = []
    for molecule in {m for _, m, _ in rows}:
        index = [i for i, row in enumerate(rows) if row[1] == molecule]
        start = min(index, key=lambda i: rows[i][2])
        by_hand += [
            np.std(rows[i][0] - rows[start][0]) * HARTREE_IN_KCAL_PER_MOL / np.sqrt(counts[i])
            for i in index
            if i != start
        ]
    rho_relative = u["energy_std_scale"] * np.array(by_hand)
    assert len(rho_relative) == len(rho) - len({m for _, m, _ in rows})
    assert 0 < u["collect_threshold_relative_kcal"] < u["collect_threshold_kcal"]
    assert np.mean(rho_relative > u["collect_threshold_relative_kcal"]) <= 0.05 + 1 / len(rho_relative)
    assert np.mean(rho_relative > u["collect_threshold_relative_kcal"]) > 0
    from aniserve.training.calibration import calibrate

    with pytest.raises(ValueError, match="at least two validation conformations .*; there is 1$"):
        calibrate(saved, validation.select(validation.items()[:1]))  # (aniserve learn's first fine-tunes)
    _, _, numbers, positions = next(perturbed_molecules(["CH3OH"], 1, np.random.default_rng(1), 0.05))
    result = saved.evaluate(numbers, positions[0])
    assert result.energy_std == pytest.approx(u["energy_std_scale"] * np.std(result.member_energies), 1e-9)
