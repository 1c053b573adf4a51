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
from typing import Any

import torch
from torch import nn

from aniserve import kernels
from aniserve.hookspecs import hookimpl


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

    #: Bounds checked on construction (a model file is untrusted): lengths in Å.  Every
    #: released ANI model is far inside them (cutoffs ≤ 5.2 Å, ≤ 16 shifts, 7 elements).
    MAX_CUTOFF = 20.0
    MAX_SHIFTS = 64
    MAX_WIDTH = 1 << 16

    def __post_init__(self):
        def fail(field, problem):
            raise ValueError(f"AEV parameter {field} {problem}")

        from aniserve.elements import NUMBERS

        if (
            not isinstance(self.elements, tuple)
            or not 1 <= len(self.elements) <= len(NUMBERS) - 1
            or not all(isinstance(e, str) and NUMBERS.get(e, 0) > 0 for e in self.elements)
            or len(set(self.elements)) != len(self.elements)
        ):
            fail("elements", f"must be distinct element symbols, got {str(self.elements)[:80]}")
        for field in ("Rcr", "Rca"):
            value = getattr(self, field)
            if not _real(value) or not 0 < value <= self.MAX_CUTOFF:
                fail(field, f"must be a cutoff in (0, {self.MAX_CUTOFF}] Å, got {value!r}")
        for field in ("EtaR", "ShfR", "EtaA", "Zeta", "ShfA", "ShfZ"):
            values = getattr(self, field)
            if not isinstance(values, tuple) or not 1 <= len(values) <= self.MAX_SHIFTS:
                fail(field, f"must list 1 to {self.MAX_SHIFTS} numbers, got {str(values)[:80]}")
            if not all(_real(v) for v in values):
                fail(field, f"must hold finite numbers, got {str(values)[:80]}")
        for field in ("EtaR", "EtaA", "Zeta"):
            if len(getattr(self, field)) != 1:
                fail(field, f"must hold one value (every ANI model does), got {str(getattr(self, field))[:80]}")
            if not all(v > 0 for v in getattr(self, field)):
                fail(field, f"must be positive, got {getattr(self, field)}")
        for field in ("ShfR", "ShfA"):
            if not all(0 <= v <= self.MAX_CUTOFF for v in getattr(self, field)):
                fail(field, f"must lie in [0, {self.MAX_CUTOFF}] Å, got {str(getattr(self, field))[:80]}")
        if not all(abs(v) <= 2 * math.pi for v in self.ShfZ):
            fail("ShfZ", f"must be angles within ±2π, got {str(self.ShfZ)[:80]}")
        n = len(self.elements)
        width = n * len(self.ShfR) + n * (n + 1) // 2 * len(self.ShfA) * len(self.ShfZ)
        if width > self.MAX_WIDTH:
            fail("lists", f"make an AEV {width} wide, more than {self.MAX_WIDTH}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AEVParameters:
        if not isinstance(data, dict):
            raise ValueError(f"AEV parameters must be an object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - fields, fields - set(data)
        if unknown or missing:
            raise ValueError(f"AEV parameters: unknown {sorted(unknown)}, missing {sorted(missing)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cosine_cutoff(distance: torch.Tensor, cutoff: float) -> torch.Tensor:
    return 0.5 * torch.cos(distance * (math.pi / cutoff)) + 0.5


def ani1x_aev(elements) -> dict:
    """ANI-1x's AEV parameters for ``elements``, as JSON (``AEVParameters.from_json``):
    Rcr 5.2 Å, Rca 3.5 Å, 16 radial and 4 × 8 angular terms; 384 features for H, C, N, O.
    The preset new models start from (what TorchANI calls ``like_1x``)."""
    return {
        "elements": list(elements),
        "Rcr": 5.2,
        "Rca": 3.5,
        "EtaR": [16.0],
        "ShfR": [0.9 + 0.26875 * i for i in range(16)],
        "EtaA": [8.0],
        "Zeta": [32.0],
        "ShfA": [0.9, 1.55, 2.2, 2.85],
        "ShfZ": [math.pi / 16 + k * math.pi / 8 for k in range(8)],
    }


class AEVFeaturizer(nn.Module):
    """ANI atomic environment vectors (radial + angular, NeuroChem layout).

    Species and neighbour geometry → ANI AEVs, (N, output_width).

    Inputs are the model's species indices (N,) and directed neighbour pairs sorted by
    center, given as their displacement vectors (P, 3) in Å; pairs beyond Rcr are
    ignored, so the pair list may have been built with a skin.
    """

    # Buffers (registered in __init__), declared for type checkers.
    ShfR: torch.Tensor
    ShfA: torch.Tensor
    ShfZ: torch.Tensor
    pair_index: torch.Tensor

    def __init__(self, params: AEVParameters):
        super().__init__()
        self.params = params
        self.num_species = len(params.elements)
        self.cutoff = max(params.Rcr, params.Rca)

        # TorchANI keeps the constants as float32; rounding them the same way makes
        # float64 results agree with the references to ~1e-10 rather than ~1e-7.
        def constant(values):
            return torch.tensor(values, dtype=torch.float32).to(torch.float64)

        self.EtaR, self.EtaA, self.Zeta = (float(constant(getattr(params, k))) for k in ("EtaR", "EtaA", "Zeta"))
        # Constants follow from the parameters (saved in the model's config), so they are
        # not part of the state dict.
        self.register_buffer("ShfR", constant(params.ShfR).reshape(1, -1), persistent=False)
        self.register_buffer("ShfA", constant(params.ShfA).reshape(1, -1), persistent=False)
        self.register_buffer("ShfZ", constant(params.ShfZ).reshape(1, -1), persistent=False)
        self.Rcr = float(constant([params.Rcr]))
        self.Rca = float(constant([params.Rca]))
        self.radial_width = len(params.ShfR)
        self.angular_width = len(params.ShfA) * len(params.ShfZ)
        n = self.num_species
        pair_index = torch.zeros(n, n, dtype=torch.long)
        upper = torch.triu_indices(n, n)
        pair_index[upper[0], upper[1]] = torch.arange(upper.shape[1])
        pair_index[upper[1], upper[0]] = torch.arange(upper.shape[1])
        self.register_buffer("pair_index", pair_index, persistent=False)
        self.num_pairs = upper.shape[1]
        self._columns: dict[tuple, torch.Tensor] = {}
        self._kernel_constants: kernels.AEVKernelConstants | None = None

    @classmethod
    def from_config(cls, params: dict, elements: list[str] | None = None) -> AEVFeaturizer:
        parsed = AEVParameters.from_json(params)
        if elements is not None and list(parsed.elements) != list(elements):
            raise ValueError(f"AEV elements {parsed.elements} differ from the model's {elements}")
        return cls(parsed)

    def config(self) -> dict:
        return self.params.to_json()

    @property
    def output_width(self) -> int:
        return self.num_species * self.radial_width + self.num_pairs * self.angular_width

    def nonzero_columns(self, present: tuple[int, ...]) -> torch.Tensor | None:
        """The AEV columns that can be nonzero when only the species indices ``present``
        occur — their radial blocks and the angular blocks of their pairs — or None when
        every column can.  The others are zero whatever the geometry, so networks may
        skip their weights: for water (H, O) two thirds of the first layer.  One tensor
        per species combination and device (networks cache weights by its identity)."""
        if len(present) == self.num_species:
            return None
        key = (tuple(sorted(present)), self.pair_index.device)
        if key not in self._columns:
            radial = [s * self.radial_width + i for s in key[0] for i in range(self.radial_width)]
            start = self.num_species * self.radial_width
            pairs = sorted({int(self.pair_index[s, t]) for s in key[0] for t in key[0]})
            angular = [start + p * self.angular_width + i for p in pairs for i in range(self.angular_width)]
            self._columns[key] = torch.tensor(radial + angular, dtype=torch.long, device=self.pair_index.device)
        return self._columns[key]

    def forward(
        self, species: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        # Serving on a CPU: the compiled kernel (same terms, one pass, see
        # aniserve/kernels).  Training differentiates twice, which only the tensor
        # version below can.
        if not self.training:
            lib = kernels.library_for(vectors)
            if lib is not None and self.kernel_constants().fits:
                return _AEVKernel.apply(vectors, species, center, neighbor, self, lib)
        return self.tensor_forward(species, center, neighbor, vectors)

    def kernel_constants(self) -> kernels.AEVKernelConstants:
        if self._kernel_constants is None:
            as_list = lambda buffer: buffer.detach().double().cpu().flatten().tolist()  # noqa: E731
            self._kernel_constants = kernels.AEVKernelConstants(
                self.num_species,
                self.num_pairs,
                self.Rcr,
                self.Rca,
                self.EtaR,
                self.EtaA,
                self.Zeta,
                as_list(self.ShfR),
                as_list(self.ShfA),
                as_list(self.ShfZ),
                self.pair_index,
            )
        return self._kernel_constants

    def tensor_forward(
        self, species: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        """The AEVs by tensor operations: any device, differentiable to every order."""
        n_atoms = species.shape[0]
        distance = vectors.norm(dim=-1)
        neighbor_species = species.index_select(0, neighbor)

        # Radial terms, one row per pair within Rcr.  (index_select rather than fancy
        # indexing throughout: its backward is an index_add, several times cheaper.)
        in_radial = torch.nonzero(distance <= self.Rcr).squeeze(1)
        d = distance.index_select(0, in_radial)
        scale = 0.25 * _cosine_cutoff(d, self.Rcr)
        radial = torch.exp(-self.EtaR * (d[:, None] - self.ShfR) ** 2) * scale[:, None]
        radial_index = center.index_select(0, in_radial) * self.num_species + neighbor_species.index_select(
            0, in_radial
        )
        radial_aev = vectors.new_zeros(n_atoms * self.num_species, self.radial_width)
        radial_aev.index_add_(0, radial_index, radial)

        # Angular terms, one row per pair of pairs (j < k) sharing a center, within Rca.
        # What a triplet needs of each of its two pairs — unit vector, distance, cutoff
        # — is computed once per pair and gathered in one index_select.
        in_angular = torch.nonzero(distance <= self.Rca).squeeze(1)
        first, second = _triplets(center.index_select(0, in_angular))
        d = distance.index_select(0, in_angular)
        per_pair = torch.cat(
            [vectors.index_select(0, in_angular) / d[:, None], d[:, None], _cosine_cutoff(d, self.Rca)[:, None]], dim=1
        )
        a, b = per_pair.index_select(0, first), per_pair.index_select(0, second)
        pair_center = center.index_select(0, in_angular)
        pair_species = neighbor_species.index_select(0, in_angular)
        angular_index = (
            pair_center.index_select(0, first) * self.num_pairs
            + self.pair_index[pair_species.index_select(0, first), pair_species.index_select(0, second)]
        )
        # (cos/sin of ShfZ here, not as buffers: ShfZ is exact in float32, its cosine is
        # not, and a float64 model may have passed through float32 on loading.)
        constants = _AngularConstants(torch.cos(self.ShfZ), torch.sin(self.ShfZ), self.ShfA, self.EtaA, self.Zeta)
        # Training on forces differentiates twice: there autograd's own graph of the plain
        # composition serves both orders; otherwise the written-out derivative is cheaper.
        angular = _angular_terms if self.training else _AngularTerms.apply
        angular_aev = angular(a, b, angular_index, n_atoms * self.num_pairs, constants)

        return torch.cat([radial_aev.reshape(n_atoms, -1), angular_aev.reshape(n_atoms, -1)], dim=1)


class _AEVKernel(torch.autograd.Function):
    """The AEVs by the compiled kernel, with its written-out gradient.  A second
    derivative (create_graph) differentiates the tensor version instead, so every order
    stays exact."""

    @staticmethod
    def forward(ctx, vectors, species, center, neighbor, featurizer, lib):
        ctx.save_for_backward(vectors, species, center, neighbor)
        ctx.featurizer, ctx.lib = featurizer, lib
        return kernels.aev_forward(
            lib, featurizer.kernel_constants(), *_kernel_inputs(vectors, species, center, neighbor)
        )

    @staticmethod
    def backward(ctx, grad):
        vectors, species, center, neighbor = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: through the saved input, whose history autograd kept
            with torch.enable_grad():
                aev = ctx.featurizer.tensor_forward(species, center, neighbor, vectors)
                return torch.autograd.grad(aev, vectors, grad, create_graph=True)[0], None, None, None, None, None
        return (
            kernels.aev_backward(
                ctx.lib, ctx.featurizer.kernel_constants(), *_kernel_inputs(vectors, species, center, neighbor), grad
            ),
            None,
            None,
            None,
            None,
            None,
        )


def _kernel_inputs(vectors, species, center, neighbor):
    """What the kernel reads: contiguous int64 indices and vectors (no copy when they are already)."""
    return species.long().contiguous(), center.long().contiguous(), neighbor.long().contiguous(), vectors.contiguous()


@dataclasses.dataclass(frozen=True)
class _AngularConstants:
    cos_z: torch.Tensor  # (1, len ShfZ)
    sin_z: torch.Tensor
    shf_a: torch.Tensor  # (1, len ShfA)
    eta_a: float
    zeta: float


def _angular_factors(a: torch.Tensor, b: torch.Tensor, k: _AngularConstants):
    """Per triplet, from its two pairs' [unit vector, distance, cutoff function] (a, b:
    (T, 5)): cos θ', sin θ', x = (1 + cos(θ' − ShfZ))/2, factor1 = x^ζ (T, ShfZ),
    s = mean distance − ShfA, g = exp(−η s²), factor2 = 2 g c_j c_k (T, ShfA).

    θ' = arccos(0.95 cos θ), so cos(θ' − ShfZ) = cos θ'·cos ShfZ + sin θ'·sin ShfZ without
    arccos; sin θ' ≥ √(1 − 0.95²) keeps every derivative finite.
    """
    cos_t = 0.95 * (a[:, :3] * b[:, :3]).sum(-1)
    sin_t = torch.sqrt(1 - cos_t * cos_t)
    x = (1 + cos_t[:, None] * k.cos_z + sin_t[:, None] * k.sin_z) / 2
    s = (a[:, 3:4] + b[:, 3:4]) / 2 - k.shf_a
    g = torch.exp(-k.eta_a * s * s)
    return cos_t, sin_t, x, x**k.zeta, s, g, g * (2 * a[:, 4:5] * b[:, 4:5])


def _angular_terms(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, rows: int, k: _AngularConstants):
    """The angular AEV rows by plain differentiable operations (see ``_AngularTerms``):
    (T, ShfA, ShfZ) flattened, ShfA-major, ShfZ-minor, as NeuroChem lays it out."""
    *_, factor1, _, _, factor2 = _angular_factors(a, b, k)
    return _OuterIndexAdd.apply(factor2, factor1, index, rows)


class _AngularTerms(torch.autograd.Function):
    """``_angular_terms`` with its first derivative written out.

    Per triplet, with x_z = (1 + cos θ'·cos ShfZ_z + sin θ'·sin ShfZ_z)/2,
    f1_z = x_z^ζ, s_a = (R_ij + R_ik)/2 − ShfA_a, g_a = exp(−η s_a²), f2_a = 2 g_a c_j c_k,
    and G the incoming gradient of the (a, z) terms:
        ∂/∂cos θ  = 0.95 ζ/2 · Σ_z (Σ_a G_az f2_a) f1_z / x_z · (cos ShfZ_z − sin ShfZ_z cos θ'/sin θ')
        ∂/∂R_ij   = ∂/∂R_ik = −η Σ_a (Σ_z G_az f1_z) f2_a s_a
        ∂/∂c_j    = 2 c_k Σ_a (Σ_z G_az f1_z) g_a
    which takes half the passes over the (T, 32) arrays that autograd's chain does (the
    angular terms are most of a large system's featurizer cost).  Should a second
    derivative be wanted all the same (the featurizer uses ``_angular_terms`` itself in
    training mode), the backward differentiates ``_angular_terms``, so every order stays
    exact.
    """

    @staticmethod
    def forward(ctx, a, b, index, rows, k: _AngularConstants):
        cos_t, sin_t, x, factor1, s, g, factor2 = _angular_factors(a, b, k)
        ctx.save_for_backward(a, b, index, cos_t, sin_t, x, factor1, s, g, factor2)
        ctx.rows, ctx.constants = rows, k
        width = factor2.shape[1] * factor1.shape[1]
        outer = (factor2[:, :, None] * factor1[:, None, :]).reshape(len(a), width)
        return a.new_zeros(rows, width).index_add_(0, index, outer)

    @staticmethod
    def backward(ctx, grad):
        a, b, index, cos_t, sin_t, x, factor1, s, g, factor2 = ctx.saved_tensors
        k = ctx.constants
        if torch.is_grad_enabled():  # create_graph: differentiate the plain composition
            wanted = [t for t, needed in zip((a, b), ctx.needs_input_grad) if needed]
            grads = iter(torch.autograd.grad(_angular_terms(a, b, index, ctx.rows, k), wanted, grad, create_graph=True))
            return *(next(grads) if needed else None for needed in ctx.needs_input_grad[:2]), None, None, None
        g_terms = grad.index_select(0, index).reshape(len(a), factor2.shape[1], factor1.shape[1])
        g_f2 = torch.bmm(g_terms, factor1[:, :, None])[:, :, 0]
        h = torch.bmm(factor2[:, None, :], g_terms)[:, 0, :].mul_(factor1).div_(x)
        h_cos, h_sin = (h * k.cos_z).sum(1), (h * k.sin_z).sum(1)
        g_cos = (0.95 * k.zeta / 2) * (h_cos - cos_t / sin_t * h_sin)
        g_distance = (-k.eta_a * (g_f2 * factor2 * s).sum(1))[:, None]
        g_cutoff = 2 * (g_f2 * g).sum(1)[:, None]
        ga = torch.cat([g_cos[:, None] * b[:, :3], g_distance, g_cutoff * b[:, 4:5]], dim=1)
        gb = torch.cat([g_cos[:, None] * a[:, :3], g_distance, g_cutoff * a[:, 4:5]], dim=1)
        return ga, gb, None, None, None


class _OuterIndexAdd(torch.autograd.Function):
    """out[index[t]] += outer(a[t], b[t]) flattened (a-major), out of ``rows`` rows.

    The same as index_add_ of ``(a[:, :, None] * b[:, None, :]).reshape(T, -1)``, with a
    backward by batched products that reads the (T, A·B) gradient once instead of four
    times (2.4× faster for the angular AEV terms).  Twice differentiable, as training
    on forces needs.
    """

    @staticmethod
    def forward(ctx, a, b, index, rows):
        ctx.save_for_backward(a, b, index)
        outer = (a[:, :, None] * b[:, None, :]).reshape(len(a), a.shape[1] * b.shape[1])
        return a.new_zeros(rows, outer.shape[1]).index_add_(0, index, outer)

    @staticmethod
    def backward(ctx, grad):
        a, b, index = ctx.saved_tensors
        g = grad.index_select(0, index).reshape(len(a), a.shape[1], b.shape[1])
        return torch.bmm(g, b[:, :, None])[:, :, 0], torch.bmm(a[:, None, :], g)[:, 0, :], None, None


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


@hookimpl
def aniserve_featurizers():
    return {"ani-aev": AEVFeaturizer}
