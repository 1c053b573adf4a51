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

A small molecule has a second floor: its few atoms use each weight a handful of times,
so a call that does not find the weights in the caches (any call after a millisecond of
other work on these VMs: an MD integrator's step, a socket read) must stream them from
memory.  ``network_bytes`` counts what the networks of a case read (the same layers,
first layer over the nonzero columns, every member) and ``read_gbps`` measures how fast
the machine streams memory; their quotient is that memory floor.
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


def read_gbps(megabytes: int = 256, repeats: int = 3) -> float:
    """The rate (GB/s) at which torch, with its current threads, reads a buffer far
    larger than any cache: the best of ``repeats`` sums."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best / 1e9


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
    total = 0.0
    for members, count, sizes in _networks_used(model, numbers):
        per_pass = 2 * sum(a * b for a, b in zip(sizes, sizes[1:]))
        total += 2 * per_pass * members * count  # forward, and back to the input
    return total


def network_bytes(model, numbers) -> int:
    """Bytes of weights and biases the networks read for the atoms ``numbers``: every
    layer of each element present, the first over the nonzero columns, every member,
    at the model's precision (each once: what a call must bring from memory)."""
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    total = 0
    for members, _, sizes in _networks_used(model, numbers):
        total += sum(a * b + b for a, b in zip(sizes, sizes[1:])) * members * itemsize
    return total


def _networks_used(model, numbers):
    """(members, atoms, layer widths with the first over the nonzero columns) of each
    element network (of each term of a Δ model) that the atoms ``numbers`` meet."""
    numbers = np.asarray(numbers).ravel()
    numbers = numbers[numbers > 0]
    species = model.species_indices(torch.as_tensor(numbers)).tolist()
    present = tuple(sorted(set(species)))
    columns = model.featurizer.nonzero_columns(present) if hasattr(model.featurizer, "nonzero_columns") else None
    counts = np.bincount(species, minlength=len(model.elements))
    for members, term in _layer_sizes(model.networks):
        for element, sizes in term.items():
            if counts[element]:
                yield members, int(counts[element]), [len(columns) if columns is not None else sizes[0], *sizes[1:]]
