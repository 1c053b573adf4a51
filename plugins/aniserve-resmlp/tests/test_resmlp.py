"""The residual-mlp element network and the l2sp strategy: registration, training,
transfer with the penalty, save/reload, serving, and the duplicate-name rule."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from aniserve.aev import ani1x_aev
from aniserve.modelfile import load_saved
from aniserve.training import ANIData, Settings, new_model, train, transfer_model
from aniserve_resmlp import ResidualElementNetworks

REPO = pathlib.Path(__file__).resolve().parents[3]
ELEMENTS = ["H", "C", "N", "O"]
DATA = REPO / "data" / "qm-train.h5"


def description():
    return {
        "elements": ELEMENTS,
        "featurizer": {"name": "ani-aev", "params": ani1x_aev(ELEMENTS)},
        "element_network": {
            "name": "residual-mlp",
            "params": {"elements": ELEMENTS, "input_width": 384, "width": 24, "blocks": 2, "ensemble_size": 2},
        },
    }


@pytest.mark.slow
def test_registered_through_its_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "aniserve", "plugins", "--json"], capture_output=True, text=True, check=True
    )
    rows = {(r["kind"], r["name"]): r for r in json.loads(out.stdout)}
    for key in [("element-network", "residual-mlp"), ("transfer-strategy", "l2sp")]:
        assert rows[key]["plugin"] == "aniserve-resmlp" and rows[key]["version"] == "0.1.0"
    # Built-ins are listed through the same hooks.
    assert rows[("transfer-strategy", "freeze")]["plugin"] == "aniserve"


def test_members_are_independent_networks():
    torch.manual_seed(0)
    net = ResidualElementNetworks(ELEMENTS, input_width=10, width=8, blocks=2, ensemble_size=3)
    species = torch.tensor([0, 1, 1, 3])
    x = torch.randn(4, 10, requires_grad=True)
    out = net(species, x)
    assert out.shape == (3, 4)
    (grad,) = torch.autograd.grad(out[1].sum(), [net.nets[1].w_out])
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def _every_fourth(data):
    """A quarter of the conformations of every molecule: enough to see training work."""
    return data.select([(g, c) for g, c in data.items() if c % 4 == 0])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("res") / "res.safetensors"
    summary = train(
        new_model(description(), seed=0),
        _every_fourth(ANIData(DATA, "wb97x_631gd.energy", "wb97x_631gd.forces")),
        path,
        Settings(epochs=6, batch_size=16, lr=3e-3, validation=0.2),
    )
    return path, summary


@pytest.mark.slow
def test_residual_model_trains_and_reloads(pretrained):
    path, summary = pretrained
    history = summary["history"]
    assert min(h["energy_rmse_kcal"] for h in history) < history[0]["energy_rmse_kcal"]
    model = load_saved(path)
    assert model.description["element_network"]["plugin"] == "aniserve-resmlp"
    assert isinstance(model.networks, ResidualElementNetworks)


@pytest.mark.slow
def test_l2sp_transfers_and_stays_near_the_pretrained_weights(pretrained, tmp_path):
    data = ANIData(DATA, "ccsd(t)_ccpvdz.energy")
    settings = Settings(epochs=3, batch_size=8, lr=3e-3, validation=0.2)
    reference = load_saved(pretrained[0])
    distance = {}
    for strategy, options in [("l2sp", {"l2sp_weight": 10.0}), ("full", {})]:
        model, penalty = transfer_model(load_saved(pretrained[0]), strategy, options, seed=0)
        assert all(p.requires_grad for p in model.parameters())
        assert (penalty is None) == (strategy == "full")
        if penalty is not None:
            assert float(penalty(model).detach()) == 0.0
        train(model, data, tmp_path / f"{strategy}.safetensors", settings, penalty=penalty)
        moved = load_saved(tmp_path / f"{strategy}.safetensors")
        distance[strategy] = sum(
            float((a - b).detach().pow(2).sum()) for a, b in zip(moved.parameters(), reference.parameters())
        )
    assert 0 < distance["l2sp"] < distance["full"]


def test_freeze_strategy_works_on_residual_blocks(pretrained):
    model, _ = transfer_model(load_saved(pretrained[0]), "freeze", {"freeze_layers": [1, 2]}, seed=0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if ".w_in" in n or ".b_in" in n or n.endswith(".0")}


@pytest.mark.slow
def test_model_serves_under_aniserve_drive(pretrained):
    from ase.build import molecule

    from aniserve.testing import assert_drive_matches_in_process

    assert_drive_matches_in_process(str(pretrained[0]), molecule("CH3CONH2"))


def test_a_duplicate_name_is_rejected_naming_both(tmp_path, monkeypatch):
    from aniserve import hookimpl
    from aniserve.registry import Registry, RegistryError

    clash = tmp_path / "clashing_plugin.py"
    clash.write_text(
        "from aniserve import hookimpl\n\n@hookimpl\ndef aniserve_transfer_strategies():\n    return {'l2sp': object}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError, match=r"'l2sp' is registered twice: by ") as caught:
        Registry(("clashing_plugin",))
    assert "aniserve-resmlp" in str(caught.value) and "clashing_plugin" in str(caught.value)
    assert hookimpl  # the public marker plugins use
