"""Element networks: one MLP per element, all ensemble members evaluated together.

The k members of an element are stored stacked — weights (k, in, out), biases (k, out) —
so a whole ensemble runs as one batched matrix product per layer instead of k small
ones.  Hidden layers use CELU(α); the output layer is linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class EnsembleMLP(nn.Module):
    """k stacked MLPs of one element: features (n, in) → atomic energies (k, n)."""

    def __init__(self, sizes: list[int], ensemble_size: int = 1, celu_alpha: float = 0.1):
        super().__init__()
        self.sizes = list(sizes)
        self.celu_alpha = celu_alpha
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # Kaiming-uniform, like nn.Linear, for models trained from scratch.
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(ensemble_size, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(ensemble_size, 1, fan_out).uniform_(-bound, bound)))
        self._packed_key = None
        self._packed_weights = None

    @property
    def ensemble_size(self) -> int:
        return self.weights[0].shape[0]

    def _packed(self, w: torch.Tensor) -> torch.Tensor:
        """First-layer weights of all members side by side, (in, k·out), for one wide GEMM.

        Packing copies the whole layer (2 MB for an ANI-1ccx element), which costs more
        than the product itself on a small molecule, so a frozen layer (serving, or the
        ``freeze`` strategy) is packed once and reused until its values change.
        """
        k, fan_in, fan_out = w.shape
        if w.requires_grad and torch.is_grad_enabled():
            return w.permute(1, 0, 2).reshape(fan_in, k * fan_out)  # in the graph: gradients reach w
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._packed_key != key:
            self._packed_weights = w.detach().permute(1, 0, 2).reshape(fan_in, k * fan_out).contiguous()
            self._packed_key = key
        return self._packed_weights

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        layers = iter(zip(self.weights, self.biases))  # (slicing a ParameterList builds a new Module)
        w0, b0 = next(layers)
        k, _, fan_out = w0.shape
        x = (features @ self._packed(w0)).reshape(-1, k, fan_out).transpose(0, 1) + b0
        for w, b in layers:
            x = torch.baddbmm(b, F.celu(x, alpha=self.celu_alpha), w)
        return x.squeeze(-1)


class ElementNetworks(nn.Module):
    """ANI element MLPs (CELU), ensembles stacked.

    Per-element ensembles: (species (N,), features (N, D)) → atomic energies (k, N)."""

    def __init__(self, elements: list[str], hidden: dict[str, list[int]], input_width: int,
                 ensemble_size: int = 1, celu_alpha: float = 0.1):
        super().__init__()
        self.elements = list(elements)
        self.hidden = {e: list(hidden[e]) for e in self.elements}
        self.input_width = input_width
        self.celu_alpha = celu_alpha
        self.mlps = nn.ModuleList(
            EnsembleMLP([input_width, *self.hidden[e], 1], ensemble_size, celu_alpha) for e in self.elements)

    @property
    def ensemble_size(self) -> int:
        return self.mlps[0].ensemble_size

    @classmethod
    def from_config(cls, params: dict) -> "ElementNetworks":
        return cls(params["elements"], params["hidden"], params["input_width"],
                   params.get("ensemble_size", 1), params.get("celu_alpha", 0.1))

    def config(self) -> dict:
        return {"elements": self.elements, "hidden": self.hidden, "input_width": self.input_width,
                "ensemble_size": self.ensemble_size, "celu_alpha": self.celu_alpha}

    def layers(self) -> list[list[nn.Parameter]]:
        """Parameters of each linear layer, input layer first, across all elements
        (what the ``freeze`` transfer strategy selects by layer number)."""
        depth = max(len(m.weights) for m in self.mlps)
        return [[p for m in self.mlps if i < len(m.weights) for p in (m.weights[i], m.biases[i])]
                for i in range(depth)]

    def forward(self, species: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        energies = features.new_zeros(self.ensemble_size, species.shape[0])
        for index, mlp in enumerate(self.mlps):
            atoms = torch.nonzero(species == index).squeeze(1)
            if len(atoms):
                energies = energies.index_copy(1, atoms, mlp(features.index_select(0, atoms)))
        return energies
