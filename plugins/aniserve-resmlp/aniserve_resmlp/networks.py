"""Residual MLPs with layer norm, one per element, k ensemble members stacked.

Per element and member:  x = W_in·f + b_in;  x ← x + SiLU(W·LN(x) + b) for each block;
E = w_out·SiLU(x) + b_out.  The skip connections keep deep networks trainable and layer
norm makes them insensitive to the scale of the features.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _uniform(k, fan_in, fan_out):
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(k, fan_in, fan_out).uniform_(-bound, bound))


class _ResidualEnsemble(nn.Module):
    def __init__(self, input_width: int, width: int, blocks: int, k: int):
        super().__init__()
        self.w_in, self.b_in = _uniform(k, input_width, width), nn.Parameter(torch.zeros(k, 1, width))
        self.gamma = nn.ParameterList(nn.Parameter(torch.ones(k, 1, width)) for _ in range(blocks))
        self.beta = nn.ParameterList(nn.Parameter(torch.zeros(k, 1, width)) for _ in range(blocks))
        self.w = nn.ParameterList(_uniform(k, width, width) for _ in range(blocks))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(k, 1, width)) for _ in range(blocks))
        self.w_out, self.b_out = _uniform(k, width, 1), nn.Parameter(torch.zeros(k, 1, 1))

    def forward(self, features, columns=None):
        w_in = self.w_in if columns is None else self.w_in.index_select(1, columns)
        x = torch.einsum("nd,kdw->knw", features, w_in) + self.b_in
        for gamma, beta, w, b in zip(self.gamma, self.beta, self.w, self.b):
            normed = F.layer_norm(x, x.shape[-1:]) * gamma + beta
            x = x + F.silu(torch.baddbmm(b, normed, w))
        return torch.baddbmm(self.b_out, F.silu(x), self.w_out).squeeze(-1)


class ResidualElementNetworks(nn.Module):
    """Residual layer-norm MLP per element (SiLU), ensembles stacked."""

    def __init__(self, elements, input_width: int, width: int = 64, blocks: int = 2, ensemble_size: int = 1):
        super().__init__()
        self.elements = list(elements)
        self.input_width, self.width, self.blocks = int(input_width), int(width), int(blocks)
        self.nets = nn.ModuleList(_ResidualEnsemble(input_width, width, blocks, ensemble_size) for _ in self.elements)

    @property
    def ensemble_size(self) -> int:
        return self.nets[0].w_in.shape[0]

    @classmethod
    def from_config(cls, params: dict) -> ResidualElementNetworks:
        return cls(
            params["elements"],
            params["input_width"],
            params.get("width", 64),
            params.get("blocks", 2),
            params.get("ensemble_size", 1),
        )

    def config(self) -> dict:
        return {
            "elements": self.elements,
            "input_width": self.input_width,
            "width": self.width,
            "blocks": self.blocks,
            "ensemble_size": self.ensemble_size,
        }

    def layers(self) -> list[list[nn.Parameter]]:
        """Input layer, each residual block, output layer (for the freeze strategy)."""
        layers = [[p for n in self.nets for p in (n.w_in, n.b_in)]]
        for i in range(self.blocks):
            layers.append([p for n in self.nets for p in (n.gamma[i], n.beta[i], n.w[i], n.b[i])])
        layers.append([p for n in self.nets for p in (n.w_out, n.b_out)])
        return layers

    def forward(self, species, features, columns=None):
        energies = features.new_zeros(self.ensemble_size, species.shape[0])
        for index, net in enumerate(self.nets):
            atoms = torch.nonzero(species == index).squeeze(1)
            if len(atoms):
                energies[:, atoms] = net(features[atoms], columns)
        return energies
