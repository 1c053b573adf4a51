"""What a TorchANI user expects: differentiable torch outputs (energies, per-atom
energies, forces by autograd, Hessians), a TorchScript file that plain PyTorch loads and
calls as TorchANI's models are called, and TorchANI's model names."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, ROOT, cached_model

import aniserve
from aniserve.embedded import DEFAULT_MODEL
from aniserve.models import canonical_name


def test_energies_and_forces_are_differentiable_torch_tensors_equal_to_evaluate():
    model = cached_model(DEFAULT_MODEL, "float64")
    numbers, x = torch.tensor(ETHANOL_NUMBERS), torch.tensor(ETHANOL_POSITIONS, dtype=torch.float64, requires_grad=True)
    energy = model.energies(numbers, x)
    assert isinstance(energy, torch.Tensor) and energy.requires_grad
    forces = -torch.autograd.grad(energy, x)[0]
    want = model.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    assert abs(float(energy.detach()) - float(want.energy)) < 1e-10
    np.testing.assert_allclose(forces.numpy(), want.forces, atol=1e-10)
    e2, f2 = model.energy_and_forces(numbers, x.detach())
    np.testing.assert_allclose(f2.numpy(), forces.numpy(), atol=1e-12)
    atomic = model.atomic_energies(numbers, x.detach())
    assert atomic.shape == (9,) and abs(float(atomic.sum()) - float(want.energy)) < 1e-10
    # A padded batch: each row is its own structure, padding contributes nothing.
    batch_numbers = torch.tensor([ETHANOL_NUMBERS, ETHANOL_NUMBERS[:5] + [0] * 4])
    batch_x = torch.tensor([ETHANOL_POSITIONS, ETHANOL_POSITIONS[:5] + [[0.0] * 3] * 4], dtype=torch.float64)
    energies = model.energies(batch_numbers, batch_x)
    alone = model.evaluate(ETHANOL_NUMBERS[:5], ETHANOL_POSITIONS[:5]).energy
    assert abs(float(energies[0]) - float(want.energy)) < 1e-10 and abs(float(energies[1]) - float(alone)) < 1e-10
    assert float(model.atomic_energies(batch_numbers, batch_x)[1, 5:].abs().sum()) == 0.0


def test_periodic_energies_match_evaluate():
    from test_physics import water_box  # noqa: E402 (a test helper)

    model = cached_model(DEFAULT_MODEL, "float64")
    numbers, positions, cell = water_box()
    energy, forces = model.energy_and_forces(torch.tensor(numbers), torch.tensor(positions), torch.tensor(cell))
    want = model.evaluate(numbers, positions, cell)
    assert abs(float(energy) - float(want.energy)) < 1e-9
    np.testing.assert_allclose(forces.numpy(), want.forces, atol=1e-9)


def test_the_hessian_matches_finite_differences_of_the_forces():
    model = cached_model(DEFAULT_MODEL, "float64")
    numbers, x = torch.tensor(ETHANOL_NUMBERS), torch.tensor(ETHANOL_POSITIONS, dtype=torch.float64)
    hessian = model.hessian(numbers, x)
    assert hessian.shape == (27, 27)
    torch.testing.assert_close(hessian, hessian.T, atol=1e-10, rtol=0)
    # A small step: ANI's energy is smooth to first order only where a CELU input or a
    # pair distance crosses 0 or a cutoff, and there the second derivative jumps (at
    # 1e-5 Å one oxygen row here straddles such a point and reads 4e-4 off).
    step = 1e-6
    for atom, axis in ((0, 0), (2, 1), (7, 2)):
        plus, minus = x.clone(), x.clone()
        plus[atom, axis] += step
        minus[atom, axis] -= step
        numeric = -(model.energy_and_forces(numbers, plus)[1] - model.energy_and_forces(numbers, minus)[1]) / (2 * step)
        torch.testing.assert_close(numeric.reshape(-1), hessian[3 * atom + axis], atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", [DEFAULT_MODEL, pytest.param("ani-2x", marks=pytest.mark.weights)])
def test_torchscript_file_runs_in_plain_pytorch_like_a_torchani_model(name, tmp_path):
    """Exported by the CLI, loaded in a fresh process that never imports aniserve:
    energies within 1e-6 Ha (float64; here ~1e-12) and forces by autograd."""
    out = tmp_path / "model.pt"
    run = subprocess.run(
        [sys.executable, "-m", "aniserve", "export", name, str(out), "--torchscript"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    water = [[0.0, 0.0, 0.12], [0.0, 0.76, -0.48], [0.0, -0.76, -0.48]]
    numbers = [ETHANOL_NUMBERS, [8, 1, 1] + [0] * 6]
    coordinates = [ETHANOL_POSITIONS, water + [[0.0] * 3] * 6]
    probe = f"""
import json, sys, torch
module = torch.jit.load({str(out)!r})
numbers = torch.tensor({numbers})
coordinates = torch.tensor({coordinates}, dtype=torch.float64, requires_grad=True)
species, energies = module((numbers, coordinates))
forces = -torch.autograd.grad(energies.sum(), coordinates)[0]
print(json.dumps({{"energies": energies.tolist(), "forces": forces.tolist(), "species": species.tolist(),
                  "aniserve_imported": "aniserve" in sys.modules}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert not got["aniserve_imported"] and got["species"] == numbers
    model = cached_model(name, "float64")
    for b, count in enumerate((9, 3)):
        want = model.evaluate(numbers[b][:count], coordinates[b][:count])
        assert abs(got["energies"][b] - float(want.energy)) < 1e-6
        np.testing.assert_allclose(np.array(got["forces"][b])[:count], want.forces, atol=1e-8)
        assert not np.array(got["forces"][b])[count:].any()


@pytest.mark.parametrize("spelling", ["ANI1x", "ANI-1x", "ani1x", "ANI_1X", "ani-1x"])
def test_torchani_model_names_are_understood(spelling):
    assert canonical_name(spelling) == "ani-1x"
    assert canonical_name("ANI2x") == "ani-2x" and canonical_name("ANI1ccx") == "ani-1ccx"
    assert canonical_name(DEFAULT_MODEL) == DEFAULT_MODEL


@pytest.mark.weights
def test_torchani_spellings_load_the_official_models():
    assert aniserve.load_model("ANI1ccx").description["name"] == "ani-1ccx"
    with pytest.raises(LookupError, match="Did you mean 'ani-1x'"):
        aniserve.load_model("ANI-1xx")


def test_arrays_are_accepted_where_tensors_are():
    model = cached_model(DEFAULT_MODEL, "float64")
    energy, forces = model.energy_and_forces(np.array(ETHANOL_NUMBERS), np.array(ETHANOL_POSITIONS))
    want = model.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    assert abs(float(energy) - float(want.energy)) < 1e-10
    np.testing.assert_allclose(forces.numpy(), want.forces, atol=1e-10)
    assert model.hessian(ETHANOL_NUMBERS, ETHANOL_POSITIONS).shape == (27, 27)
    assert abs(float(model.energies(ETHANOL_NUMBERS, ETHANOL_POSITIONS)) - float(want.energy)) < 1e-10
