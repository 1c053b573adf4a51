"""Element networks served frozen: every element, and a Δ model's base and correction,
in one pass (``networks.frozen_sum``), against the plain differentiable composition."""

import pytest
import torch

from aniserve import kernels
from aniserve.networks import DeltaNetworks, ElementNetworks

ELEMENTS = ["H", "C", "N", "O"]
# H fills two kernel tasks (more than 48 rows), N is absent, the order is mixed.
SPECIES = torch.tensor([0] * 30 + [1] * 7 + [3] * 3 + [0] * 25 + [1, 3, 1])


def delta_model(correction_members: int, dtype: torch.dtype) -> DeltaNetworks:
    torch.manual_seed(3)
    base = ElementNetworks(
        ELEMENTS, {"H": [16, 12, 9], "C": [14, 10, 8], "N": [12, 8, 6], "O": [13, 10, 8]}, 20, ensemble_size=3
    )
    correction = ElementNetworks(ELEMENTS, {e: [6, 4] for e in ELEMENTS}, 20, ensemble_size=correction_members)
    return DeltaNetworks(base, correction, "ani-mlp", "ani-mlp").to(dtype)


def energies_and_gradients(model, features, columns, grad_out):
    f = features.clone().requires_grad_(True)
    energies = model(SPECIES, f, columns)
    (gradient,) = torch.autograd.grad(energies, f, grad_out, retain_graph=True)
    (graph,) = torch.autograd.grad(energies, f, grad_out, create_graph=True)
    (second,) = torch.autograd.grad((graph**2).sum(), f)  # through the frozen path: autograd's own
    return energies, gradient, second


@pytest.mark.parametrize("backend", ["compiled", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("correction_members", [3, 1])
def test_frozen_delta_networks_equal_the_plain_composition(backend, dtype, correction_members):
    model = delta_model(correction_members, dtype)
    columns = torch.tensor([0, 1, 3, 4, 6, 7, 8, 11, 12, 15, 17, 19])
    features = torch.randn(len(SPECIES), len(columns), dtype=dtype) * 2
    grad_out = torch.rand(3, len(SPECIES), dtype=dtype)
    with kernels.using(backend):
        model.requires_grad_(False).eval()
        # One pass for base and correction where their member counts match.
        assert (model.frozen_terms() is not None) == (correction_members == 3)
        frozen = energies_and_gradients(model, features, columns, grad_out)
        separate = model.base(SPECIES, features, columns) + model.correction(SPECIES, features, columns)
        model.requires_grad_(True)
        assert model.frozen_terms() is None
        plain = energies_and_gradients(model, features, columns, grad_out)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(frozen[0], plain[0], **tolerance)
    torch.testing.assert_close(frozen[0], separate, **tolerance)
    # autograd's CELU derivative scales by 1/α rounded to float32 (see test_kernels)
    torch.testing.assert_close(
        frozen[1], plain[1], **(tolerance if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-9))
    )
    torch.testing.assert_close(
        frozen[2], plain[2], **(tolerance if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-9))
    )


def test_frozen_element_networks_without_atoms():
    model = delta_model(3, torch.float64).requires_grad_(False).eval()
    energies = model(torch.zeros(0, dtype=torch.long), torch.zeros(0, 20, dtype=torch.float64))
    assert energies.shape == (3, 0)
