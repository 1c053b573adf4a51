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
        self._packed: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

    @property
    def ensemble_size(self) -> int:
        return self.weights[0].shape[0]

    def _first_layer(self, w: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        """First-layer weights of all members side by side, (in, k·out), for one wide
        GEMM; only the rows of the input ``columns`` when given.

        Packing copies the layer (2 MB for an ANI-1ccx element), which costs more than
        the product itself on a small molecule, so a frozen layer (serving, or the
        ``freeze`` strategy) is packed once per column set and reused until its values
        change.
        """
        k, fan_in, fan_out = w.shape
        if w.requires_grad and torch.is_grad_enabled():  # in the graph: gradients reach w
            rows = w if columns is None else w.index_select(1, columns)
            return rows.permute(1, 0, 2).reshape(-1, k * fan_out)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._packed_key != key:
            self._packed_key, self._packed = key, {}
        # Keyed by the columns tensor's identity; holding it keeps the id unique.  The
        # featurizer hands out one tensor per species combination, so few are cached.
        cached = self._packed.get(id(columns))
        if cached is None:
            rows = w.detach() if columns is None else w.detach().index_select(1, columns)
            cached = (columns, rows.permute(1, 0, 2).reshape(-1, k * fan_out).contiguous())
            if len(self._packed) >= 16:
                self._packed.pop(next(iter(self._packed)))
            self._packed[id(columns)] = cached
        return cached[1]

    def forward(self, features: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """features: (n, in), or (n, len(columns)) holding only those input columns."""
        layers = iter(zip(self.weights, self.biases))  # (slicing a ParameterList builds a new Module)
        w0, b0 = next(layers)
        k, _, fan_out = w0.shape
        x = (features @ self._first_layer(w0, columns)).reshape(-1, k, fan_out).transpose(0, 1) + b0
        for w, b in layers:
            x = torch.baddbmm(b, F.celu(x, alpha=self.celu_alpha), w)
        return x.squeeze(-1)


class ElementNetworks(nn.Module):
    """ANI element MLPs (CELU), ensembles stacked.

    Per-element ensembles: (species (N,), features (N, D)) → atomic energies (k, N).
    With ``columns``, features hold only those input columns (the others being zero)."""

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

    def forward(self, species: torch.Tensor, features: torch.Tensor,
                columns: torch.Tensor | None = None) -> torch.Tensor:
        energies = features.new_zeros(self.ensemble_size, species.shape[0])
        for index, mlp in enumerate(self.mlps):
            atoms = torch.nonzero(species == index).squeeze(1)
            if len(atoms):
                energies = energies.index_copy(1, atoms, mlp(features.index_select(0, atoms), columns))
        return energies
