"""The gaussian-embedding featurizer: invariances, gradients, registration, and a model
built on it trained on aniserve's shipped DFT data, saved, reloaded and served."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from aniserve import exits
from aniserve.modelfile import load_saved
from aniserve.neighbors import find_pairs
from aniserve.registry import Registry
from aniserve_gaussian import GaussianEmbeddingFeaturizer

REPO = pathlib.Path(__file__).resolve().parents[3]
ELEMENTS = ["H", "C", "N", "O"]


def features(featurizer, species, positions):
    pairs = find_pairs(positions, featurizer.cutoff)
    return featurizer(species, pairs.center, pairs.neighbor, positions[pairs.neighbor] - positions[pairs.center])


def test_invariant_to_rotation_translation_and_permutation():
    torch.manual_seed(0)
    f = GaussianEmbeddingFeaturizer(ELEMENTS).double()
    species = torch.tensor([1, 1, 3, 0, 0, 0, 0, 0, 0])
    pos = torch.randn(9, 3, dtype=torch.float64) * 1.3
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    a = features(f, species, pos)
    b = features(f, species, pos @ q.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(a, b)
    perm = torch.tensor([1, 0, 2, 3, 5, 4, 6, 8, 7])
    torch.testing.assert_close(features(f, species[perm], pos[perm]), a[perm])
    assert a.shape == (9, f.output_width) and torch.isfinite(a).all()
    # Angular information: bending a triatomic changes the l=1 channel, not the radial one.
    tri = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0.0, 1.0, 0]], dtype=torch.float64)
    bent = tri.clone()
    bent[2] = torch.tensor([-1.0, 0, 0], dtype=torch.float64)
    s = torch.tensor([3, 0, 0])
    fa, fb = features(f, s, tri), features(f, s, bent)
    half = f.output_width // 2
    torch.testing.assert_close(fa[0, :half], fb[0, :half])
    assert (fa[0, half:] - fb[0, half:]).abs().max() > 1e-3


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    f = GaussianEmbeddingFeaturizer(ELEMENTS, num_basis=6, embedding_dim=3).double()
    species = torch.tensor([1, 3, 0, 0])
    pos = (torch.randn(4, 3, dtype=torch.float64) * 1.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: features(f, species, p).sum(1), (pos,))


@pytest.mark.slow
def test_registered_through_its_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "aniserve", "plugins", "--json"], capture_output=True, text=True, check=True
    )
    rows = {(r["kind"], r["name"]): r for r in json.loads(out.stdout)}
    row = rows[("featurizer", "gaussian-embedding")]
    assert row["plugin"] == "aniserve-gaussian" and row["version"] == "0.1.0" and row["description"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from aniserve.training import ANIData, Settings, new_model, train

    data = ANIData(REPO / "data" / "qm-train.h5", "wb97x_631gd.energy", "wb97x_631gd.forces")
    data = data.select([(g, c) for g, c in data.items() if c % 4 == 0])  # a quarter: enough to see it train
    description = {
        "elements": ELEMENTS,
        "featurizer": {
            "name": "gaussian-embedding",
            "params": {"elements": ELEMENTS, "num_basis": 8, "embedding_dim": 4},
        },
        "element_network": {
            "name": "ani-mlp",
            "params": {
                "elements": ELEMENTS,
                "input_width": 64,
                "ensemble_size": 2,
                "hidden": {e: [32, 16] for e in ELEMENTS},
            },
        },
    }
    path = tmp_path_factory.mktemp("gauss") / "gauss.safetensors"
    summary = train(
        new_model(description, seed=0), data, path, Settings(epochs=6, batch_size=16, lr=3e-3, validation=0.2)
    )
    return path, summary


@pytest.mark.slow
def test_model_trains_saves_and_reloads(trained):
    path, summary = trained
    history = summary["history"]
    assert min(h["energy_rmse_kcal"] for h in history) < history[0]["energy_rmse_kcal"]
    model = load_saved(path)
    assert model.description["featurizer"]["name"] == "gaussian-embedding"
    assert model.description["featurizer"]["plugin"] == "aniserve-gaussian"
    embedding = model.featurizer.embedding
    assert not torch.equal(embedding, GaussianEmbeddingFeaturizer(ELEMENTS, num_basis=8, embedding_dim=4).embedding)


@pytest.mark.slow
def test_model_serves_under_aniserve_drive(trained):
    from ase.build import molecule

    from aniserve.testing import assert_drive_matches_in_process

    assert_drive_matches_in_process(str(trained[0]), molecule("CH3CH2OH"))


@pytest.mark.slow
def test_masked_plugin_gives_a_clear_error(trained):
    env = {**os.environ, "ANISERVE_BLOCK_PLUGINS": "gaussian"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aniserve",
            "eval",
            str(REPO / "examples/molecules/ethanol.xyz"),
            "--model",
            str(trained[0]),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == exits.BAD_MODEL  # a model that cannot be loaded (aniserve.exits)
    assert "no featurizer named 'gaussian-embedding'" in out.stderr
    assert "plugin aniserve-gaussian 0.1.0" in out.stderr
    assert "Traceback" not in out.stderr
    assert "gaussian-embedding" not in Registry(entry_points=False).names("featurizer")
