"""The arithmetic floor of an ANI evaluation: what the element networks of a case cost
at the machine's own measured matrix-multiply rate.

Per atom and ensemble member, the networks do one forward pass and one pass back to the
input (the gradient that forces need), each ≈ 2 · Σ_layers in·out floating-point
operations, where the first layer's ``in`` counts only the feature columns that can be
nonzero for the species present (``nonzero_columns``: for C, H, O 240 of the 384 AEV
columns of ANI-1x; for water 128).  A Δ model pays for its base and its correction.
The AEV and the neighbour search are left out: the floor is a lower bound, and the
fraction of it reached says how much of a call is spent outside the networks'
arithmetic.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def gemm_gflops(dtype: torch.dtype = torch.float32, size: int = 512, seconds: float = 0.3) -> float:
    """The rate torch's matrix multiply reaches here (GFLOP/s), with the current threads:
    the best of repeated size×size products over about ``seconds``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _layer_sizes(networks) -> list[tuple[int, dict[int, list[int]]]]:
    """Per term (a plain model has one, a Δ model two): its members, and element index
    → layer widths."""
    from aniserve.networks import DeltaNetworks, ElementNetworks

    if isinstance(networks, DeltaNetworks):
        return _layer_sizes(networks.base) + _layer_sizes(networks.correction)
    if isinstance(networks, ElementNetworks):
        return [(networks.ensemble_size, {e: list(mlp.sizes) for e, mlp in enumerate(networks.mlps)})]
    raise ValueError(f"no FLOP count for {type(networks).__name__}")


def network_flops(model, numbers) -> float:
    """Floating-point operations of the networks' forward pass and input gradient for
    the atoms ``numbers`` (any shape; 0 is padding)."""
    numbers = np.asarray(numbers).ravel()
    numbers = numbers[numbers > 0]
    species = model.species_indices(torch.as_tensor(numbers)).tolist()
    present = tuple(sorted(set(species)))
    columns = model.featurizer.nonzero_columns(present) if hasattr(model.featurizer, "nonzero_columns") else None
    counts = np.bincount(species, minlength=len(model.elements))
    total = 0.0
    for members, term in _layer_sizes(model.networks):
        for element, sizes in term.items():
            if not counts[element]:
                continue
            sizes = [len(columns) if columns is not None else sizes[0], *sizes[1:]]
            per_pass = 2 * sum(a * b for a, b in zip(sizes, sizes[1:]))
            total += 2 * per_pass * members * counts[element]  # forward, and back to the input
    return total
