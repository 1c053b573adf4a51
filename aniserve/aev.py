"""ANI atomic environment vectors (Smith, Isayev, Roitberg, Chem. Sci. 8, 3192, 2017).

Radial block for neighbour species s, one value per ShfR:
    Σ_j∈s 0.25 · exp(−EtaR (R_ij − ShfR)²) · f_C(R_ij; Rcr)
Angular block for the unordered species pair (s, t), one value per (ShfA, ShfZ), ShfA-major:
    Σ_{j<k} 2 · ((1 + cos(θ'_ijk − ShfZ)) / 2)^Zeta · exp(−EtaA ((R_ij + R_ik)/2 − ShfA)²)
            · f_C(R_ij; Rca) · f_C(R_ik; Rca),     θ' = arccos(0.95 cos θ_ijk)
with f_C(R; Rc) = 0.5 cos(πR/Rc) + 0.5.  The 0.25 prefactor and the 0.95 squeeze are
NeuroChem's, not the paper's equations; they are needed to reproduce the released models.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class AEVParameters:
    """The constants of an ANI ``.params`` file; lengths in Å, angles in radians."""

    elements: tuple[str, ...]
    Rcr: float
    Rca: float
    EtaR: tuple[float, ...]
    ShfR: tuple[float, ...]
    EtaA: tuple[float, ...]
    Zeta: tuple[float, ...]
    ShfA: tuple[float, ...]
    ShfZ: tuple[float, ...]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "AEVParameters":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _cosine_cutoff(distance: torch.Tensor, cutoff: float) -> torch.Tensor:
    return 0.5 * torch.cos(distance * (math.pi / cutoff)) + 0.5


class AEVFeaturizer(nn.Module):
    """ANI atomic environment vectors (radial + angular, NeuroChem layout).

    Species and neighbour geometry → ANI AEVs, (N, output_width).

    Inputs are the model's species indices (N,) and directed neighbour pairs sorted by
    center, given as their displacement vectors (P, 3) in Å; pairs beyond Rcr are
    ignored, so the pair list may have been built with a skin.
    """

    def __init__(self, params: AEVParameters):
        super().__init__()
        self.params = params
        self.num_species = len(params.elements)
        self.cutoff = max(params.Rcr, params.Rca)

        # TorchANI keeps the constants as float32; rounding them the same way makes
        # float64 results agree with the references to ~1e-10 rather than ~1e-7.
        def constant(values):
            return torch.tensor(values, dtype=torch.float32).to(torch.float64)

        for name in ("EtaR", "EtaA", "Zeta"):
            if len(getattr(params, name)) != 1:
                raise ValueError(f"AEV parameter {name} must hold one value (every ANI model does), "
                                 f"got {getattr(params, name)}")
        self.EtaR, self.EtaA, self.Zeta = (float(constant(getattr(params, k))) for k in ("EtaR", "EtaA", "Zeta"))
        self.register_buffer("ShfR", constant(params.ShfR).reshape(1, -1))
        self.register_buffer("ShfA", constant(params.ShfA).reshape(1, -1, 1))
        self.register_buffer("ShfZ", constant(params.ShfZ).reshape(1, 1, -1))
        self.Rcr = float(constant([params.Rcr]))
        self.Rca = float(constant([params.Rca]))
        self.radial_width = len(params.ShfR)
        self.angular_width = len(params.ShfA) * len(params.ShfZ)
        n = self.num_species
        pair_index = torch.zeros(n, n, dtype=torch.long)
        upper = torch.triu_indices(n, n)
        pair_index[upper[0], upper[1]] = torch.arange(upper.shape[1])
        pair_index[upper[1], upper[0]] = torch.arange(upper.shape[1])
        self.register_buffer("pair_index", pair_index)
        self.num_pairs = upper.shape[1]

    @classmethod
    def from_config(cls, params: dict, elements: list[str] | None = None) -> "AEVFeaturizer":
        parsed = AEVParameters.from_json(params)
        if elements is not None and list(parsed.elements) != list(elements):
            raise ValueError(f"AEV elements {parsed.elements} differ from the model's {elements}")
        return cls(parsed)

    def config(self) -> dict:
        return self.params.to_json()

    @property
    def output_width(self) -> int:
        return self.num_species * self.radial_width + self.num_pairs * self.angular_width

    def forward(self, species: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                vectors: torch.Tensor) -> torch.Tensor:
        n_atoms = species.shape[0]
        distance = vectors.norm(dim=-1)

        in_radial = distance <= self.Rcr
        d = distance[in_radial]
        radial = 0.25 * torch.exp(-self.EtaR * (d[:, None] - self.ShfR) ** 2) * _cosine_cutoff(d, self.Rcr)[:, None]
        radial_index = center[in_radial] * self.num_species + species[neighbor[in_radial]]
        radial_aev = vectors.new_zeros(n_atoms * self.num_species, self.radial_width)
        radial_aev.index_add_(0, radial_index, radial)

        in_angular = torch.nonzero(distance <= self.Rca).squeeze(1)
        first, second = _triplets(center[in_angular])
        p, q = in_angular[first], in_angular[second]
        v1, v2 = vectors[p], vectors[q]
        d1, d2 = distance[p], distance[q]
        cos_angle = 0.95 * (v1 * v2).sum(-1) / (d1 * d2)
        angle = torch.acos(cos_angle)
        factor1 = ((1 + torch.cos(angle[:, None, None] - self.ShfZ)) / 2) ** self.Zeta
        factor2 = torch.exp(-self.EtaA * ((d1 + d2)[:, None, None] / 2 - self.ShfA) ** 2)
        fc = _cosine_cutoff(d1, self.Rca) * _cosine_cutoff(d2, self.Rca)
        # (T, ShfA, ShfZ) flattened: ShfA-major, ShfZ-minor, as NeuroChem lays it out.
        angular = 2 * factor1 * factor2 * fc[:, None, None]
        angular_index = center[p] * self.num_pairs + self.pair_index[species[neighbor[p]], species[neighbor[q]]]
        angular_aev = vectors.new_zeros(n_atoms * self.num_pairs, self.angular_width)
        angular_aev.index_add_(0, angular_index, angular.reshape(len(p), self.angular_width))

        return torch.cat([radial_aev.reshape(n_atoms, -1), angular_aev.reshape(n_atoms, -1)], dim=1)


def _triplets(center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All (p, q), p < q, of pair positions that share a center (center sorted)."""
    if len(center) == 0:
        empty = center.new_zeros(0)
        return empty, empty
    _, counts = torch.unique_consecutive(center, return_counts=True)
    start = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    group_size = counts.repeat_interleave(counts)
    local = torch.arange(len(center), device=center.device) - start
    after = group_size - 1 - local  # partners following each pair in its group
    total = int(after.sum())
    first = torch.arange(len(center), device=center.device).repeat_interleave(after, output_size=total)
    begin = torch.cumsum(after, 0) - after
    second = first + 1 + torch.arange(total, device=center.device) - begin.repeat_interleave(after, output_size=total)
    return first, second
