"""TorchScript export of an ANI model, callable as TorchANI's models are.

``TorchScriptANI(potential)`` is a self-contained ``nn.Module`` that ``torch.jit.script``
compiles: ``module((numbers, coordinates))`` with atomic numbers (B, N) (0 or a negative
number marks padding) and positions (B, N, 3) in Å returns ``(numbers, energies)``,
energies (B,) in Hartree, the ensemble mean, differentiable with respect to the
coordinates (forces by autograd).  Saved with ``torch.jit.save`` (``aniserve export
--torchscript``), it loads with ``torch.jit.load`` where aniserve is not installed:
OpenMM-Torch, LAMMPS front ends, plain PyTorch.  Molecules only (no periodic cell).

It holds the ANI AEV constants and the element networks' weights (a Δ model's base and
correction both), and computes exactly the featurizer's terms (``aniserve.aev``) with
all pairs of a structure found by distance, so it is meant for molecules of up to a few
thousand atoms (the pair search is quadratic in atoms).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from aniserve.aev import AEVFeaturizer, _triplets
from aniserve.networks import DeltaNetworks, ElementNetworks


class _Layer(nn.Module):
    """One layer of an element's ensemble: weight (k, in, out), bias (k, 1, out), and
    CELU after it unless it is the output layer."""

    if TYPE_CHECKING:  # buffers, for type checkers (TorchScript cannot read these annotations)
        weight: torch.Tensor
        bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, alpha: float, last: bool):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.alpha, self.last = alpha, last

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.baddbmm(self.bias, h.expand(self.weight.shape[0], -1, -1), self.weight)
        return h if self.last else torch.nn.functional.celu(h, self.alpha)


class _MLP(nn.Module):
    """One element's ensemble: (n, in) → mean over members of the atomic energies (n,)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], alpha: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [_Layer(w, b, alpha, i + 1 == len(weights)) for i, (w, b) in enumerate(zip(weights, biases))]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0)
        for layer in self.layers:
            h = layer(h)
        return h[:, :, 0].mean(0)


def _element_terms(networks: nn.Module) -> list[list[_MLP]]:
    """Per element, the networks whose member means add up to its atomic energy."""
    if isinstance(networks, DeltaNetworks):
        return [b + c for b, c in zip(_element_terms(networks.base), _element_terms(networks.correction))]
    if isinstance(networks, ElementNetworks):
        return [[_MLP(list(m.weights), list(m.biases), networks.celu_alpha)] for m in networks.mlps]
    raise ValueError(
        f"TorchScript export covers ANI element networks (ani-mlp, delta of them), not {type(networks).__name__}"
    )


class TorchScriptANI(nn.Module):
    if TYPE_CHECKING:  # buffers, for type checkers (TorchScript cannot read these annotations)
        ShfR: torch.Tensor
        ShfA: torch.Tensor
        cos_z: torch.Tensor
        sin_z: torch.Tensor
        pair_index: torch.Tensor
        species_of_number: torch.Tensor
        self_energies: torch.Tensor
        elements: list[list[_MLP]]  # a ModuleList of ModuleLists

    def __init__(self, potential, dtype: torch.dtype = torch.float64):
        super().__init__()
        featurizer = potential.featurizer
        if not isinstance(featurizer, AEVFeaturizer):
            raise ValueError(f"TorchScript export covers the ANI AEV featurizer, not {type(featurizer).__name__}")
        self.num_species = featurizer.num_species
        self.num_pairs = featurizer.num_pairs
        self.Rcr, self.Rca = featurizer.Rcr, featurizer.Rca
        self.EtaR, self.EtaA, self.Zeta = featurizer.EtaR, featurizer.EtaA, featurizer.Zeta
        self.register_buffer("ShfR", featurizer.ShfR.detach().to(torch.float64).reshape(1, -1).clone())
        self.register_buffer("ShfA", featurizer.ShfA.detach().to(torch.float64).reshape(1, -1).clone())
        shf_z = featurizer.ShfZ.detach().to(torch.float64).reshape(1, -1)
        self.register_buffer("cos_z", torch.cos(shf_z))
        self.register_buffer("sin_z", torch.sin(shf_z))
        self.register_buffer("pair_index", featurizer.pair_index.detach().clone())
        self.register_buffer("species_of_number", potential.species_of_number.detach().clone())
        self.register_buffer("self_energies", potential.self_energies.detach().to(torch.float64).clone())
        terms = _element_terms(potential.networks)
        self.elements = cast(Any, nn.ModuleList([nn.ModuleList(term) for term in terms]))
        self.to(dtype)
        self.self_energies = self.self_energies.to(torch.float64)

    def forward(self, species_coordinates: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        numbers, coordinates = species_coordinates
        dtype = self.ShfR.dtype
        real = numbers > 0
        flat = coordinates[real].to(dtype)
        species = self.species_of_number[numbers[real].clamp(0, 119)]
        if bool((species < 0).any()):
            raise ValueError("an atomic number this model does not cover")
        structure = torch.nonzero(real)[:, 0]
        # All pairs of a structure within the cutoff (directed, sorted by center).
        cutoff = max(self.Rcr, self.Rca)
        with torch.no_grad():
            d = torch.cdist(flat.detach(), flat.detach())
            same = structure[:, None] == structure[None, :]
            eye = torch.eye(len(flat), dtype=torch.bool, device=flat.device)
            pairs = torch.nonzero(same & ~eye & (d <= cutoff))
        center, neighbor = pairs[:, 0], pairs[:, 1]
        vectors = flat.index_select(0, neighbor) - flat.index_select(0, center)
        features = self._aev(species, center, neighbor, vectors)
        atomic = torch.zeros(len(flat), dtype=dtype, device=flat.device)
        for e, networks in enumerate(self.elements):
            rows = torch.nonzero(species == e)[:, 0]
            x = features.index_select(0, rows)  # (no atoms of this element: zero rows, which is fine)
            total = torch.zeros(len(rows), dtype=dtype, device=flat.device)
            for network in networks:
                total = total + network(x)
            atomic = atomic.index_copy(0, rows, total)
        per_atom = atomic.to(torch.float64) + self.self_energies[species]
        energies = torch.zeros(numbers.shape[0], dtype=torch.float64, device=flat.device).index_add(
            0, structure, per_atom
        )
        return numbers, energies

    def _aev(
        self, species: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        """``aniserve.aev.AEVFeaturizer.tensor_forward``'s terms, written for TorchScript."""
        n_atoms = species.shape[0]
        distance = torch.linalg.vector_norm(vectors, dim=-1)
        neighbor_species = species.index_select(0, neighbor)
        in_radial = torch.nonzero(distance <= self.Rcr).squeeze(1)
        d = distance.index_select(0, in_radial)
        scale = 0.25 * (0.5 * torch.cos(d * (torch.pi / self.Rcr)) + 0.5)
        radial = torch.exp(-self.EtaR * (d[:, None] - self.ShfR) ** 2) * scale[:, None]
        radial_index = center.index_select(0, in_radial) * self.num_species + neighbor_species.index_select(
            0, in_radial
        )
        radial_aev = vectors.new_zeros(n_atoms * self.num_species, self.ShfR.shape[1]).index_add(
            0, radial_index, radial
        )

        in_angular = torch.nonzero(distance <= self.Rca).squeeze(1)
        pair_center = center.index_select(0, in_angular)
        first, second = _triplets(pair_center)
        d = distance.index_select(0, in_angular)
        unit = vectors.index_select(0, in_angular) / d[:, None]
        cut = 0.5 * torch.cos(d * (torch.pi / self.Rca)) + 0.5
        pair_species = neighbor_species.index_select(0, in_angular)
        cos_t = 0.95 * (unit.index_select(0, first) * unit.index_select(0, second)).sum(-1)
        sin_t = torch.sqrt(1 - cos_t * cos_t)
        x = (1 + cos_t[:, None] * self.cos_z + sin_t[:, None] * self.sin_z) / 2
        s = (d.index_select(0, first) + d.index_select(0, second))[:, None] / 2 - self.ShfA
        cutoffs = 2 * cut.index_select(0, first) * cut.index_select(0, second)
        factor2 = torch.exp(-self.EtaA * s * s) * cutoffs[:, None]
        outer = (factor2[:, :, None] * (x**self.Zeta)[:, None, :]).reshape(len(first), -1)
        angular_index = (
            pair_center.index_select(0, first) * self.num_pairs
            + self.pair_index[pair_species.index_select(0, first), pair_species.index_select(0, second)]
        )
        angular_aev = vectors.new_zeros(n_atoms * self.num_pairs, outer.shape[1]).index_add(0, angular_index, outer)
        return torch.cat([radial_aev.reshape(n_atoms, -1), angular_aev.reshape(n_atoms, -1)], dim=1)


def export_torchscript(potential, path, dtype: torch.dtype = torch.float64) -> None:
    """Compile ``potential`` with ``torch.jit.script`` and save it to ``path``."""
    module = torch.jit.script(TorchScriptANI(potential, dtype).eval())
    torch.jit.save(module, str(path))
