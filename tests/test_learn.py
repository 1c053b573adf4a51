"""``aniserve learn``: the loop explores, collects, labels, fine-tunes and gets better on
its molecule's held-out frames; it resumes where it stopped, even after kill -9 in the
middle of labelling, and loses no finished label."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from aniserve import learn
from aniserve.modelfile import read_description

pytestmark = pytest.mark.weights

STRUCTURE = str(pathlib.Path(__file__).parents[1] / "examples" / "learn" / "formaldoxime.xyz")


def plan(out, **change):
    settings = dict(
        structure=STRUCTURE,
        model="ani-1x",
        out=str(out),
        teacher="ani-1ccx",
        steps=100,
        interval=5,
        per_iteration=10,
        iterations=2,
        epochs=12,
        held_out=6,
    )
    settings.update(change)
    return learn.Plan(**settings)


@pytest.mark.slow
def test_learn_with_a_teacher_gets_better_and_resumes_as_a_no_op(tmp_path):
    summary = learn.run(plan(tmp_path))
    rows = summary["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(0 <= r["collected_fraction"] <= 1 and r["frames"] == 40 for r in rows)
    assert rows[0]["labels"] < rows[1]["labels"] == rows[2]["labels"]
    # the fine-tuned model is better on the held-out MD frames than the base model
    assert rows[-1]["held_out_force_rmse_kcal_per_a"] < 0.8 * rows[0]["held_out_force_rmse_kcal_per_a"]
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert "held-out" in learn.table(summary)
    trained = [tmp_path / f"iter-{i:03d}" / "model.safetensors" for i in (0, 1)]
    stamps = [p.stat().st_mtime_ns for p in trained]
    again = learn.run(plan(tmp_path))  # everything is marked done: nothing is redone
    assert [p.stat().st_mtime_ns for p in trained] == stamps
    assert [r["labels"] for r in again["iterations"]] == [r["labels"] for r in rows]
    # each iteration warm-starts from the last one's model
    assert read_description(trained[1])["training"]["learn"]["from"] == str(trained[0])
    with pytest.raises(ValueError, match="other settings"):
        learn.run(plan(tmp_path, per_iteration=11))


@pytest.mark.slow
def test_learn_from_the_embedded_default_collects_against_its_relative_threshold(tmp_path):
    """The default's members disagree on a molecule's energy zero by ~1 kcal/mol per √atom,
    which its absolute threshold (1.29) includes: against that, frames scored relative to
    the start never exceeded it and the loop stopped at once, with nothing learnt.  Its
    calibration states a threshold for relative ρ too, which learn uses."""
    from aniserve.collect import stated_threshold
    from aniserve.embedded import DEFAULT_MODEL
    from aniserve.models import load_model

    summary = learn.run(plan(tmp_path, model=DEFAULT_MODEL, steps=200, iterations=1))
    rows = summary["iterations"]
    base = load_model(DEFAULT_MODEL)
    assert rows[0]["threshold_kcal"] == pytest.approx(stated_threshold(base, relative=True))
    assert stated_threshold(base, relative=True) < 0.5 * stated_threshold(base)
    assert rows[0]["collected_fraction"] > 0.05 and rows[1]["labels"] > 0
    assert rows[1]["held_out_force_rmse_kcal_per_a"] < 0.8 * rows[0]["held_out_force_rmse_kcal_per_a"]


def test_the_spread_is_measured_relative_to_the_starting_structure():
    """ρ is the members' spread of E(frame) − E(start): members that disagree only on the
    energy zero doubt nothing (ρ = 0), and a frame's ρ does not depend on which other
    frames the exploration visited (it did when taken relative to their mean)."""
    import ase
    import numpy as np

    class Members:  # member m's energy: m Hartree of offset + (m + 1) × 1 mHa per Å of x
        def evaluate(self, numbers, positions, member_forces=False):
            x = positions[:, 0, 0]
            energies = np.arange(4)[None, :] + 1e-3 * x[:, None] * (np.arange(4)[None, :] + 1)
            return type("R", (), {"member_energies": energies, "member_forces": np.zeros((len(x), 4, 2, 3))})

    start = ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    near, far = start.copy(), start.copy()
    far.positions[0, 0] = 0.5
    frames = [near, far]
    learn._score(Members(), frames, 1.0, 0.1, start)
    assert frames[0].info["energy_std_per_sqrt_atom_kcal"] == 0.0 and not frames[0].info["collected"]
    assert frames[1].info["energy_std_per_sqrt_atom_kcal"] > 0.1 and frames[1].info["collected"]
    alone = [far.copy()]
    learn._score(Members(), alone, 1.0, 0.1, start)
    assert alone[0].info["energy_std_per_sqrt_atom_kcal"] == frames[1].info["energy_std_per_sqrt_atom_kcal"]


def test_learn_refuses_a_plan_without_labels_or_with_both(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        plan(tmp_path, teacher=None)
    with pytest.raises(ValueError, match="not both"):
        plan(tmp_path, level="hf/sto-3g")
    with pytest.raises(ValueError, match="at least"):
        plan(tmp_path, steps=0)


@pytest.mark.slow
def test_kill_9_while_labelling_loses_no_label(tmp_path):
    """PySCF labels (HF/STO-3G, fractions of a second each) on a local Dask cluster; the
    whole process group is killed with SIGKILL as soon as the first iteration's first
    label is journaled; the same command then finishes the run, and every label
    finished before the kill is in the result."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "aniserve", "learn", STRUCTURE, "--model", "ani-1x", "--level", "hf/sto-3g"]
    command += ["--out", str(out), "--steps", "200", "--interval", "5", "--held-out", "4", "--per-iteration", "10"]
    command += ["--iterations", "1", "--epochs", "3", "--stop-fraction", "0"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    records = out / "iter-000" / "labels.work" / "records"
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (records.exists() and any(records.glob("*.json"))):
            assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
            assert time.monotonic() < deadline, "no label was journaled in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = {json.loads(p.read_text())["id"] for p in records.glob("*.json")}
    assert before and not (out / "iter-000" / "label.json").exists()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    labelled = {r["id"] for r in learn._records(out / "iter-000" / "labels.h5")}
    assert before <= labelled
    selected = json.loads((out / "iter-000" / "select.json").read_text())["selected"]
    assert len(labelled) == selected >= 3
    if len(before) < selected:  # killed mid-labelling (the usual case): the rest was computed, the rest only
        assert f"{selected} calculations; {len(before)} already done" in finished.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"][0]["labels"] == selected
