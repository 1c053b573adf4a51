"""aniserve reproduces TorchANI's energies, forces and strain derivatives of the
official ANI-1x, ANI-1ccx and ANI-2x weights on every reference record."""

import numpy as np
import pytest
from conftest import cached_model, reference

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)

MODELS = ["ani-1x", "ani-1ccx", "ani-2x"]


def records(model):
    return [r for r in reference()["records"] if model in r["models"]]


@pytest.mark.parametrize("model", MODELS)
def test_float64_matches_reference(model):
    potential = cached_model(model, "float64")
    checked = 0
    for record in records(model):
        want = record["models"][model]
        got = potential.evaluate(record["numbers"], record["positions"], record["cell"])
        assert abs(float(got.energy) - want["energy"]) <= 1e-6, record["name"]
        np.testing.assert_allclose(got.forces, want["forces"], atol=1e-5, rtol=0, err_msg=record["name"])
        if "strain_derivative" in want:
            s, ref = got.strain_derivative, np.array(want["strain_derivative"])
            np.testing.assert_allclose((s + s.T) / 2, (ref + ref.T) / 2, atol=1e-5, rtol=0, err_msg=record["name"])
            checked += 1
        if "member_energies" in want:
            np.testing.assert_allclose(got.member_energies, want["member_energies"], atol=1e-6, rtol=0)
            assert abs(float(got.energy_std) - want["energy_std"]) <= 1e-6
    assert checked == 2  # both periodic records carry strain derivatives


@pytest.mark.parametrize("model", MODELS)
def test_float32_within_tolerance(model):
    potential = cached_model(model, "float32")
    for record in records(model):
        got = potential.evaluate(record["numbers"], record["positions"], record["cell"])
        assert abs(float(got.energy) - record["models"][model]["energy"]) <= 5e-4, record["name"]


def test_batch_equals_single_evaluations():
    potential = cached_model("ani-1ccx", "float64")
    chosen = [r for r in records("ani-1ccx") if r["cell"] is None][:12]
    n_max = max(len(r["numbers"]) for r in chosen)
    numbers = np.zeros((len(chosen), n_max), dtype=int)
    positions = np.zeros((len(chosen), n_max, 3))
    for b, r in enumerate(chosen):
        numbers[b, : len(r["numbers"])] = r["numbers"]
        positions[b, : len(r["numbers"])] = r["positions"]
    batch = potential.evaluate(numbers, positions)
    for b, r in enumerate(chosen):
        single = potential.evaluate(r["numbers"], r["positions"])
        assert abs(batch.energy[b] - single.energy) < 1e-9
        np.testing.assert_allclose(batch.forces[b, : len(r["numbers"])], single.forces, atol=1e-9)
        assert not batch.forces[b, len(r["numbers"]) :].any()
