"""Element networks: one MLP per element, all ensemble members evaluated together.

The k members of an element are stored stacked — weights (k, in, out), biases (k, out) —
so a whole ensemble runs as one batched matrix product per layer instead of k small
ones.  Hidden layers use CELU(α); the output layer is linear.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from aniserve import kernels
from aniserve.hookspecs import hookimpl


class EnsembleMLP(nn.Module):
    """k stacked MLPs of one element: features (n, in) → atomic energies (k, n)."""

    weights: nn.ParameterList
    biases: nn.ParameterList
    _cache_key: tuple | None

    def __init__(self, sizes: list[int], ensemble_size: int = 1, celu_alpha: float = 0.1):
        super().__init__()
        if (
            len(sizes) < 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)
            or isinstance(ensemble_size, bool)
            or not isinstance(ensemble_size, int)
            or ensemble_size < 1
        ):
            raise ValueError(
                f"layer widths must be positive integers and the ensemble size at least 1, got "
                f"{str(sizes)[:80]} and {ensemble_size!r}"
            )
        if isinstance(celu_alpha, bool) or not isinstance(celu_alpha, (int, float)) or not 0 < celu_alpha < 1e3:
            raise ValueError(f"celu_alpha must be a positive number, got {celu_alpha!r}")
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
        return cast(list, list(self.weights._parameters.values())), cast(list, list(self.biases._parameters.values()))

    def _first_layer(self, columns: torch.Tensor | None) -> torch.Tensor:
        """First-layer weights (k, in, out), only the rows of the input ``columns`` when
        given, by plain (differentiable) indexing."""
        w = self.weights[0]
        return w if columns is None else w.index_select(1, columns)

    def frozen(self) -> bool:
        """Frozen and in eval mode (serving): evaluated with the written-out gradient."""
        weights, biases = self._parameter_tensors()
        return not self.training and not any(p.requires_grad for p in (*weights, *biases))

    def frozen_layers(self, columns: torch.Tensor | None) -> _FrozenLayers:
        """The frozen layers, the first one's rows restricted to ``columns``.

        Selecting rows copies the layer (1–2 MB for an ANI-1ccx element), which costs more
        than the product itself on a small molecule, so it is done once per column set and
        reused until a parameter changes (its version or storage).
        """
        weights, biases = self._parameter_tensors()
        key = tuple((p.data_ptr(), p._version) for p in (*weights, *biases))
        if self._cache_key != key:
            self._cache_key, self._cached_layers = key, {}
        # Keyed by the columns tensor's identity; holding it keeps the id unique.  The
        # featurizer hands out one tensor per species combination, so few are cached.
        cached = self._cached_layers.get(id(columns))
        if cached is None:
            first = weights[0].detach() if columns is None else weights[0].detach().index_select(1, columns)
            cached = (
                columns,
                _FrozenLayers(
                    [first, *(w.detach() for w in weights[1:])], [b.detach() for b in biases], self.celu_alpha
                ),
            )
            if len(self._cached_layers) >= 16:
                self._cached_layers.pop(next(iter(self._cached_layers)))
            self._cached_layers[id(columns)] = cached
        return cached[1]

    def forward(self, features: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """features: (n, in), or (n, len(columns)) holding only those input columns."""
        if self.frozen():
            return frozen_sum(features, [len(features)], [[self]], columns, self)
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
    """Detached weights (k, in, out) and biases (k, 1, out) of a frozen ensemble, the
    tensor version of its forward pass and written-out gradient, and its layout for the
    compiled kernel, made on first use.

    z_l = a_(l−1) W_l + b_l, a_l = CELU(z_l), so ∂E/∂a_(l−1) = (∂E/∂a_l ⊙ CELU'(z_l)) W_lᵀ,
    with CELU'(z) = exp(min(z, 0)/α).
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], alpha: float):
        self.weights = [w.contiguous() for w in weights]
        self.biases = [b.contiguous() for b in biases]
        self.alpha = alpha
        self._kernel: kernels.MLPKernelLayers | None = None

    def kernel(self) -> kernels.MLPKernelLayers:
        if self._kernel is None:
            self._kernel = kernels.MLPKernelLayers(self.weights, self.biases, self.alpha)
        return self._kernel

    def tensor_forward(self, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Member energies (k, n) and the CELU slopes the backward pass needs."""
        weights, biases, alpha = self.weights, self.biases, self.alpha
        x = torch.baddbmm(biases[0], features.expand(weights[0].shape[0], *features.shape), weights[0])
        slopes = []
        for w, b in zip(weights[1:], biases[1:]):
            slopes.append(x.clamp(max=0).mul_(1 / alpha).exp_())
            x = torch.baddbmm(b, F.celu(x, alpha=alpha), w)
        return x.squeeze(-1), slopes

    def tensor_backward(self, grad: torch.Tensor, slopes: list[torch.Tensor]) -> torch.Tensor:
        """The features' gradient (n, in), given that of the member energies (k, n)."""
        g = grad[:, :, None] * self.weights[-1].transpose(1, 2)  # ∂E/∂a of the last hidden layer, (k, n, width)
        for w, slope in zip(reversed(self.weights[:-1]), reversed(slopes)):
            g = torch.bmm(g.mul_(slope), w.transpose(1, 2))
        return g.sum(0)


def frozen_sum(
    features: torch.Tensor,
    counts: list[int],
    terms: list[list[EnsembleMLP]],
    columns: torch.Tensor | None,
    owner: nn.Module,
) -> torch.Tensor:
    """Member energies (k, n) of frozen ensembles over features (n, in) grouped by
    element: the g-th ``counts[g]`` rows go through the networks ``terms[g]`` (one, or a
    base and its Δ correction, with k members each), whose outputs add up.
    ``owner`` keeps the compiled kernel's layout of those networks between calls."""
    return _FrozenNetworks.apply(features, counts, terms, columns, owner)


def _kernel_networks(
    owner: nn.Module, layers: list[list[_FrozenLayers]], columns: torch.Tensor | None
) -> kernels.MLPKernelNetworks:
    """The kernel's layout of these frozen layers, made once per column set (as in
    ``EnsembleMLP.frozen_layers``) and again when any of the layers is replaced."""
    key = tuple(map(tuple, layers))  # _FrozenLayers compare by identity
    cache = owner.__dict__.setdefault("_kernel_networks", {})
    cached = cache.get(id(columns))
    if cached is None or cached[1] != key:
        if cached is None and len(cache) >= 16:
            cache.pop(next(iter(cache)))
        cached = cache[id(columns)] = (
            columns,
            key,
            kernels.MLPKernelNetworks([[fl.kernel() for fl in group] for group in layers]),
        )
    return cached[2]


class _FrozenNetworks(torch.autograd.Function):
    """``frozen_sum``: the networks' energies with the gradient with respect to the
    features written out (``_FrozenLayers``), one autograd node for all elements.

    On a CPU with the compiled kernels (aniserve/kernels/mlp.cpp), one call computes the
    energies and each member's input gradient J (k, n, in) of every group, the terms of
    a group added up — a 9-atom molecule's networks in a fraction of the time of ~20
    library products per network — and the backward pass is Σ_m ∂L/∂E_m J_m.  Otherwise
    the forward pass keeps the CELU slopes and the backward runs one batched product per
    layer.  (Second derivatives, should anyone ask, differentiate ``plain_forward``.)
    """

    @staticmethod
    def forward(ctx, features, counts, terms, columns, owner):
        ctx.counts, ctx.terms, ctx.columns = counts, terms, columns
        layers = [[mlp.frozen_layers(columns) for mlp in group] for group in terms]
        lib = kernels.library_for(features) if features.is_floating_point() else None
        if lib is not None:
            energies, gradients = kernels.mlp(lib, _kernel_networks(owner, layers, columns), features, counts)
            ctx.save_for_backward(features, gradients)
            ctx.lib = lib
            return energies
        ctx.save_for_backward(features)
        ctx.lib, ctx.layers, ctx.slopes = None, layers, []
        parts = []
        for x, group in zip(features.split(counts), layers):
            total = None
            for fl in group:
                energies, slopes = fl.tensor_forward(x)
                ctx.slopes.append(slopes)
                total = energies if total is None else total + energies
            parts.append(total)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @staticmethod
    def backward(ctx, grad):
        features, *saved = ctx.saved_tensors
        nothing = (None,) * 4
        if torch.is_grad_enabled():  # create_graph: through the saved input, whose history autograd kept
            with torch.enable_grad():
                energies = torch.cat(
                    [
                        sum(mlp.plain_forward(x, ctx.columns) for mlp in group)
                        for x, group in zip(features.split(ctx.counts), ctx.terms)
                    ],
                    dim=1,
                )
                return torch.autograd.grad(energies, features, grad, create_graph=True)[0], *nothing
        if ctx.lib is not None:
            return kernels.mlp_backward(ctx.lib, grad, saved[0]), *nothing
        slopes = iter(ctx.slopes)
        parts = [
            sum(fl.tensor_backward(g, next(slopes)) for fl in group)
            for g, group in zip(grad.split(ctx.counts, dim=1), ctx.layers)
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0], *nothing


class ElementNetworks(nn.Module):
    """ANI element MLPs (CELU), ensembles stacked.

    Per-element ensembles: (species (N,), features (N, D)) → atomic energies (k, N).
    With ``columns``, features hold only those input columns (the others being zero)."""

    mlps: Any  # an nn.ModuleList of EnsembleMLP, one per element

    def __init__(
        self,
        elements: list[str],
        hidden: dict[str, list[int]],
        input_width: int,
        ensemble_size: int = 1,
        celu_alpha: float = 0.1,
    ):
        super().__init__()
        self.elements = list(elements)
        self.hidden = {e: list(hidden[e]) for e in self.elements}
        self.input_width = input_width
        self.celu_alpha = celu_alpha
        self.mlps = nn.ModuleList(
            EnsembleMLP([input_width, *self.hidden[e], 1], ensemble_size, celu_alpha) for e in self.elements
        )

    @property
    def ensemble_size(self) -> int:
        return self.mlps[0].ensemble_size

    @classmethod
    def from_config(cls, params: dict) -> ElementNetworks:
        return cls(
            params["elements"],
            params["hidden"],
            params["input_width"],
            params.get("ensemble_size", 1),
            params.get("celu_alpha", 0.1),
        )

    def config(self) -> dict:
        return {
            "elements": self.elements,
            "hidden": self.hidden,
            "input_width": self.input_width,
            "ensemble_size": self.ensemble_size,
            "celu_alpha": self.celu_alpha,
        }

    def layers(self) -> list[list[nn.Parameter]]:
        """Parameters of each linear layer, input layer first, across all elements
        (what the ``freeze`` transfer strategy selects by layer number)."""
        depth = max(len(m.weights) for m in self.mlps)
        return [[p for m in self.mlps if i < len(m.weights) for p in (m.weights[i], m.biases[i])] for i in range(depth)]

    def frozen_terms(self) -> list[list[EnsembleMLP]] | None:
        """Each element's networks, when all are frozen (see ``frozen_sum``), else None."""
        return [[mlp] for mlp in self.mlps] if all(mlp.frozen() for mlp in self.mlps) else None

    def forward(
        self, species: torch.Tensor, features: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        terms = self.frozen_terms()
        if terms is not None:
            return by_element(species, features, terms, columns, self)

        def trainable(grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
            return torch.cat(
                [mlp(x, columns) for mlp, x, count in zip(self.mlps, grouped.split(counts), counts) if count], dim=1
            )

        return _grouped(species, features, len(self.mlps), self.ensemble_size, trainable)


def _grouped(
    species: torch.Tensor, features: torch.Tensor, num_elements: int, ensemble_size: int, evaluate
) -> torch.Tensor:
    """Atomic energies (k, N) in the atoms' order, from ``evaluate(grouped, counts)``,
    which takes the features grouped by element (``counts[e]`` rows of element e, in
    order) and returns their energies (k, N) in that order.  One sort groups them, so
    each element's networks take a contiguous slice."""
    if species.numel() == 0:
        return features.new_zeros(ensemble_size, 0)
    counts = torch.bincount(species, minlength=num_elements).tolist()
    order = torch.argsort(species, stable=True)
    energies = evaluate(features.index_select(0, order), counts)
    return torch.empty_like(energies).index_copy_(1, order, energies)


def by_element(
    species: torch.Tensor,
    features: torch.Tensor,
    terms: list[list[EnsembleMLP]],
    columns: torch.Tensor | None,
    owner: nn.Module,
) -> torch.Tensor:
    """Atomic energies (k, N) of frozen networks: each atom's through its element's
    ``terms`` (``frozen_sum``), all elements in one call."""

    def frozen(grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        present = [e for e, count in enumerate(counts) if count]
        return frozen_sum(grouped, [counts[e] for e in present], [terms[e] for e in present], columns, owner)

    return _grouped(species, features, len(terms), terms[0][0].ensemble_size, frozen)


class DeltaNetworks(nn.Module):
    """A frozen base element network plus a trainable correction: E = E_base + E_corr.

    Registered as the element network ``delta``, so a delta-learned model saves and
    reloads like any other."""

    # Any element-network components (aniserve.contracts.ElementNetwork), plugins' included.
    base: Any
    correction: Any

    def __init__(self, base: Any, correction: Any, base_name: str, correction_name: str):
        super().__init__()
        if correction.ensemble_size not in (1, base.ensemble_size) or list(correction.elements) != list(base.elements):
            raise ValueError("the delta correction must cover the base's elements with 1 or the same number of members")
        widths = {
            w for w in (getattr(base, "input_width", None), getattr(correction, "input_width", None)) if w is not None
        }
        if len(widths) > 1:
            raise ValueError(f"the delta base and correction take different input widths {sorted(widths)}")
        self.base, self.correction = base, correction
        self.names = (base_name, correction_name)
        self.elements = list(base.elements)
        if widths:
            self.input_width = widths.pop()

    @property
    def ensemble_size(self) -> int:
        return self.base.ensemble_size

    @classmethod
    def from_config(cls, params: dict) -> DeltaNetworks:
        from aniserve.registry import registry

        base, correction = (
            registry().get("element-network", params[k]["name"]).from_config(params[k]["params"])
            for k in ("base", "correction")
        )
        return cls(base, correction, params["base"]["name"], params["correction"]["name"])

    def config(self) -> dict:
        return {
            "base": {"name": self.names[0], "params": self.base.config()},
            "correction": {"name": self.names[1], "params": self.correction.config()},
        }

    def frozen_terms(self) -> list[list[EnsembleMLP]] | None:
        """Each element's base and correction networks, when all are frozen and have
        the same number of members (see ``frozen_sum``), else None."""
        base, correction = self.base.frozen_terms(), self.correction.frozen_terms()
        if base is None or correction is None or self.correction.ensemble_size != self.base.ensemble_size:
            return None
        return [b + c for b, c in zip(base, correction)]

    def forward(
        self, species: torch.Tensor, features: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        terms = self.frozen_terms()
        if terms is not None:  # serving: base and correction of an element in one pass
            return by_element(species, features, terms, columns, self)
        return self.base(species, features, columns) + self.correction(species, features, columns)


@hookimpl
def aniserve_element_networks():
    return {"ani-mlp": ElementNetworks, "delta": DeltaNetworks}
