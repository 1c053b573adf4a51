"""aniserve's own model file round-trips exactly and never needs pickle."""

import numpy as np
import pytest
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS

import aniserve
from aniserve.modelfile import read_description, save_model

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def test_round_trip_gives_identical_results(tmp_path, ani1ccx):
    path = tmp_path / "ani1ccx.safetensors"
    save_model(ani1ccx, path, name="copy-of-ani-1ccx")
    description = read_description(path)
    assert description["featurizer"]["name"] == "ani-aev"
    assert description["element_network"]["params"]["hidden"]["C"] == [144, 112, 96]
    assert description["ensemble_size"] == 8
    reloaded = aniserve.load_model(path, dtype="float64")
    a = ani1ccx.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    b = reloaded.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    assert a.energy == b.energy
    np.testing.assert_array_equal(a.forces, b.forces)
    # Self energies survive as float64, exactly as read from sae_linfit.dat.
    assert description["self_energies"]["C"] == -38.03750806057356


def test_float64_weights_reload_without_rounding(tmp_path):
    import torch

    from aniserve.modelfile import load_saved
    from aniserve.training.architecture import default_description, new_model

    model = new_model(default_description(["H", "C"], hidden=(8, 4), ensemble_size=2), seed=0, dtype=torch.float64)
    save_model(model, tmp_path / "m.safetensors")
    reloaded = load_saved(tmp_path / "m.safetensors")
    assert reloaded.dtype == torch.float64
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
