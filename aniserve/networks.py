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

from aniserve import kernels
from aniserve.hookspecs import hookimpl


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
        self._cache_key = None
        self._cached_layers: dict[int, tuple] = {}

    @property
    def ensemble_size(self) -> int:
        return self.weights[0].shape[0]

    def _parameter_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # The ParameterLists' own dicts: indexing a ParameterList goes through
        # Module.__getattr__, microseconds each, which a small molecule notices.
        return list(self.weights._parameters.values()), list(self.biases._parameters.values())

    def _first_layer(self, columns: torch.Tensor | None) -> torch.Tensor:
        """First-layer weights (k, in, out), only the rows of the input ``columns`` when
        given, by plain (differentiable) indexing."""
        w = self.weights[0]
        return w if columns is None else w.index_select(1, columns)

    def _frozen_layers(self, columns: torch.Tensor | None, weights: list[torch.Tensor],
                       biases: list[torch.Tensor]) -> "_FrozenLayers":
        """The frozen layers, the first one's rows restricted to ``columns``.

        Selecting rows copies the layer (1–2 MB for an ANI-1ccx element), which costs more
        than the product itself on a small molecule, so it is done once per column set and
        reused until a parameter changes (its version or storage).
        """
        key = tuple((p.data_ptr(), p._version) for p in (*weights, *biases))
        if self._cache_key != key:
            self._cache_key, self._cached_layers = key, {}
        # Keyed by the columns tensor's identity; holding it keeps the id unique.  The
        # featurizer hands out one tensor per species combination, so few are cached.
        cached = self._cached_layers.get(id(columns))
        if cached is None:
            first = weights[0].detach() if columns is None else weights[0].detach().index_select(1, columns)
            cached = (columns, _FrozenLayers([first, *(w.detach() for w in weights[1:])],
                                             [b.detach() for b in biases]))
            if len(self._cached_layers) >= 16:
                self._cached_layers.pop(next(iter(self._cached_layers)))
            self._cached_layers[id(columns)] = cached
        return cached[1]

    def forward(self, features: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """features: (n, in), or (n, len(columns)) holding only those input columns."""
        weights, biases = self._parameter_tensors()
        if not self.training and not any(p.requires_grad for p in (*weights, *biases)):
            # Frozen, in eval mode (serving): the written-out gradient.
            return _FrozenMLP.apply(features, self._frozen_layers(columns, weights, biases), self, columns)
        return self.plain_forward(features, columns)

    def plain_forward(self, features: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The forward pass by plain operations, differentiable in everything."""
        layers = iter(zip(self.weights, self.biases))  # (slicing a ParameterList builds a new Module)
        _, b0 = next(layers)
        w0 = self._first_layer(columns)
        # All k members in one batched product; the expanded input is a view, not a copy.
        x = torch.baddbmm(b0, features.expand(w0.shape[0], *features.shape), w0)
        for w, b in layers:
            x = torch.baddbmm(b, F.celu(x, alpha=self.celu_alpha), w)
        return x.squeeze(-1)


class _FrozenLayers:
    """Detached weights (k, in, out) and biases (k, 1, out), and their layout for the
    compiled kernel, made on first use."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor]):
        self.weights = [w.contiguous() for w in weights]
        self.biases = [b.contiguous() for b in biases]
        self._kernel = None

    def kernel(self) -> kernels.MLPKernelLayers:
        if self._kernel is None:
            self._kernel = kernels.MLPKernelLayers(self.weights, self.biases)
        return self._kernel


class _FrozenMLP(torch.autograd.Function):
    """``EnsembleMLP.plain_forward`` of a frozen network, with the gradient with respect
    to the features written out: z_l = a_(l−1) W_l + b_l, a_l = CELU(z_l), so
    ∂E/∂a_(l−1) = (∂E/∂a_l ⊙ CELU'(z_l)) W_lᵀ, with CELU'(z) = exp(min(z, 0)/α).

    On a CPU with the compiled kernels (aniserve/kernels/mlp.cpp), one call computes the
    energies and each member's input gradient J (k, n, in) — a 9-atom molecule's networks
    in a fraction of the time of ~20 library products — and the backward pass is
    Σ_m ∂L/∂E_m J_m.  Otherwise the forward pass keeps the CELU slopes and the backward
    runs one batched product per layer.  (Second derivatives, should anyone ask,
    differentiate ``plain_forward`` instead.)
    """

    @staticmethod
    def forward(ctx, features, layers, mlp, columns):
        ctx.mlp, ctx.columns = mlp, columns
        lib = kernels.library_for(features) if features.is_floating_point() else None
        if lib is not None:
            energies, gradients = kernels.mlp(lib, layers.kernel(), features, mlp.celu_alpha)
            ctx.save_for_backward(features, gradients)
            ctx.lib = lib
            return energies
        weights, biases, alpha = layers.weights, layers.biases, mlp.celu_alpha
        x = torch.baddbmm(biases[0], features.expand(weights[0].shape[0], *features.shape), weights[0])
        slopes = []
        for w, b in zip(weights[1:], biases[1:]):
            slopes.append(x.clamp(max=0).mul_(1 / alpha).exp_())
            x = torch.baddbmm(b, F.celu(x, alpha=alpha), w)
        ctx.save_for_backward(features, *slopes)
        ctx.lib, ctx.weights = None, weights
        return x.squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        features, *saved = ctx.saved_tensors
        nothing = (None,) * 3
        if torch.is_grad_enabled():  # create_graph: through the saved input, whose history autograd kept
            with torch.enable_grad():
                energies = ctx.mlp.plain_forward(features, ctx.columns)
                return torch.autograd.grad(energies, features, grad, create_graph=True)[0], *nothing
        if ctx.lib is not None:
            return kernels.mlp_backward(ctx.lib, grad, saved[0]), *nothing
        weights = ctx.weights
        g = grad[:, :, None] * weights[-1].transpose(1, 2)  # ∂E/∂a of the last hidden layer, (k, n, width)
        for w, slope in zip(reversed(weights[:-1]), reversed(saved)):
            g = torch.bmm(g.mul_(slope), w.transpose(1, 2))
        return g.sum(0), *nothing


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
        # Atoms grouped by element with one sort, so each element's networks take a
        # contiguous slice (a few operations in all, rather than a few per element).
        counts = torch.bincount(species, minlength=len(self.mlps)).tolist()
        order = torch.argsort(species, stable=True)
        grouped = features.index_select(0, order)
        parts, start = [], 0
        for mlp, count in zip(self.mlps, counts):
            if count:
                parts.append(mlp(grouped[start:start + count], columns))
            start += count
        if not parts:
            return features.new_zeros(self.ensemble_size, 0)
        energies = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return torch.empty_like(energies).index_copy_(1, order, energies)


class DeltaNetworks(nn.Module):
    """A frozen base element network plus a trainable correction: E = E_base + E_corr.

    Registered as the element network ``delta``, so a delta-learned model saves and
    reloads like any other."""

    def __init__(self, base: nn.Module, correction: nn.Module, base_name: str, correction_name: str):
        super().__init__()
        if correction.ensemble_size not in (1, base.ensemble_size) or list(correction.elements) != list(base.elements):
            raise ValueError("the delta correction must cover the base's elements with 1 or the same number of members")
        self.base, self.correction = base, correction
        self.names = (base_name, correction_name)
        self.elements = list(base.elements)

    @property
    def ensemble_size(self) -> int:
        return self.base.ensemble_size

    @classmethod
    def from_config(cls, params: dict) -> "DeltaNetworks":
        from aniserve.registry import registry

        parts = [registry().get("element-network", params[k]["name"]).from_config(params[k]["params"])
                 for k in ("base", "correction")]
        return cls(*parts, params["base"]["name"], params["correction"]["name"])

    def config(self) -> dict:
        return {"base": {"name": self.names[0], "params": self.base.config()},
                "correction": {"name": self.names[1], "params": self.correction.config()}}

    def forward(self, species: torch.Tensor, features: torch.Tensor,
                columns: torch.Tensor | None = None) -> torch.Tensor:
        return self.base(species, features, columns) + self.correction(species, features, columns)


@hookimpl
def aniserve_element_networks():
    return {"ani-mlp": ElementNetworks, "delta": DeltaNetworks}
