"""The active-learning example runs as written (shortened), and single-molecule data
trains (its validation split falls back to conformations)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from aniserve.training import ANIData
from aniserve.training.data import write_ani_h5

pytestmark = [pytest.mark.weights]  # the official ANI weights (see conftest)


@pytest.mark.slow
def test_example_loop_runs_shortened(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "active-learning" / "run.py"),
            str(tmp_path),
            "--steps",
            "40",
            "--rounds",
            "1",
            "--threshold",
            "0.0001",
            "--every",
            "5",
            "--level",
            "hf/6-31g",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert rows[0][1] == "ani-1x" and rows[1][1] == "model-1.safetensors"
    collected = int(rows[0][3])
    assert 8 <= collected <= 9  # 40 MD steps (41 evaluations), at most one structure every 5
    labelled = ANIData(tmp_path / "labels.h5", "hf_631g.energy")
    assert len(labelled) == collected and bool(torch.isfinite(labelled.read([(0, 0)]).energy).all())
    assert (tmp_path / "model-1.safetensors").exists() and (tmp_path / "collected-1.extxyz").exists()


def test_single_molecule_data_splits_by_conformation(tmp_path):
    rng = np.random.default_rng(0)
    write_ani_h5(
        tmp_path / "one.h5",
        {
            "H2O": {
                "atomic_numbers": np.array([8, 1, 1]),
                "coordinates": rng.normal(size=(20, 3, 3)),
                "e.energy": rng.normal(size=20),
            }
        },
    )
    data = ANIData(tmp_path / "one.h5", "e.energy")
    train, val = data.split(0.15, seed=0)
    assert len(train) == 17 and len(val) == 3
    assert not set(train.items()) & set(val.items())
