"""The TorchANI references (the shared folder's reference/ani_reference.json) are what TorchANI
computes from the official weights: tests/make_reference.py regenerates records and
gets the same numbers.  TorchANI is a test dependency only; aniserve never imports it."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REFERENCE, ROOT, ZOO, reference

pytestmark = [pytest.mark.weights]


@pytest.mark.slow
def test_regenerated_references_equal_the_committed_ones(tmp_path):
    names = ["CH3CHO~0", "water27-pbc", "methane-tight-pbc"]
    out = tmp_path / "ref.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "make_reference.py"),
            "--zoo",
            str(ZOO),
            "--reference",
            str(REFERENCE),
            "--records",
            *names,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"TORCHANI_NO_WARN_EXTENSIONS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    committed = {r["name"]: r for r in reference()["records"]}
    regenerated = json.loads(out.read_text())["records"]
    assert [r["name"] for r in regenerated] == names
    for record in regenerated:
        assert set(record["models"]) == set(committed[record["name"]]["models"])
        for model, values in record["models"].items():
            want = committed[record["name"]]["models"][model]
            assert set(values) == set(want)
            for field, value in values.items():
                np.testing.assert_allclose(
                    value, want[field], rtol=0, atol=1e-10, err_msg=f"{record['name']} {model} {field}"
                )
