"""Which candidate structures to label: selection strategies for active learning.

A committee's spread ranks candidates, but the top K of a raw ranking concentrates on
a few systems (one molecule's frames all look alike to it) and on whatever the
committee is most wrong about the same way.  So, as DP-GEN does, the strategies here
keep the candidates whose spread lies in a *trust band* — above a level where the
model is already good, below one where the structure is likely unphysical — and choose
inside it at random or by farthest-point sampling on descriptors (as MACE's fine-tuning
selection does), with a cap per group (molecule or trajectory).  Top-K and random stay
as baselines.  Each strategy is a registry component (``aniserve plugins`` lists them).

Inputs (``Candidates``): per candidate its force deviation (the largest over atoms of
the members' force spread, what ``collect`` computes), an optional per-atom energy
spread, its group, and optional descriptors (e.g. the mean AEV of its atoms).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from aniserve.hookspecs import hookimpl


@dataclasses.dataclass
class Candidates:
    force_deviation: np.ndarray  # (n,), any force unit, larger = less certain
    group: np.ndarray  # (n,), a molecule or trajectory label per candidate
    descriptors: np.ndarray | None = None  # (n, d), for farthest-point choice
    energy_std_per_atom: np.ndarray | None = None  # (n,)

    def __post_init__(self):
        self.force_deviation = np.asarray(self.force_deviation, dtype=float)
        self.group = np.asarray(self.group)
        n = len(self.force_deviation)
        if self.force_deviation.ndim != 1 or len(self.group) != n or not np.isfinite(self.force_deviation).all():
            raise ValueError("candidates need one finite force deviation and one group each")
        if self.descriptors is not None:
            self.descriptors = np.asarray(self.descriptors, dtype=float).reshape(n, -1)


def _check(candidates: Candidates, k: int) -> int:
    if k < 0:
        raise ValueError(f"cannot select {k} candidates")
    return min(k, len(candidates.force_deviation))


class RandomSelection:
    description = "k candidates uniformly at random (the baseline every strategy must beat)"

    def select(self, candidates: Candidates, k: int, rng: np.random.Generator, **options) -> np.ndarray:
        k = _check(candidates, k)
        return np.sort(rng.choice(len(candidates.force_deviation), size=k, replace=False))


class TopK:
    description = "the k largest force deviations (a baseline: concentrates on a few systems)"

    def select(self, candidates: Candidates, k: int, rng: np.random.Generator, **options) -> np.ndarray:
        k = _check(candidates, k)
        order = np.argsort(-candidates.force_deviation, kind="stable")
        return np.sort(order[:k])


class TrustBand:
    """Candidates with lower ≤ deviation ≤ upper, chosen inside the band at random
    (``pick='random'``) or by farthest-point sampling on the descriptors
    (``pick='farthest'``), at most ``cap`` per group; without ``cap``, each group in the
    band first gets its fair share (k over the groups, at least 1) and the rest of k is
    filled from the band in the same order.  ``lower``/``upper`` are levels in the deviation's
    unit, or, as ``lower_percentile``/``upper_percentile``, percentiles of the
    candidates' deviations (default 50 and 99).  Fewer than k come back when the band
    holds fewer (that is the answer: the model is already good there)."""

    description = "trust band of force deviation, random or farthest-point choice inside, capped per group"

    def __init__(self, pick: str = "random"):
        if pick not in ("random", "farthest"):
            raise ValueError(f"pick must be random or farthest, got {pick!r}")
        self.pick = pick

    def band(
        self, candidates: Candidates, lower=None, upper=None, lower_percentile=50.0, upper_percentile=99.0
    ) -> np.ndarray:
        deviation = candidates.force_deviation
        lo = np.percentile(deviation, lower_percentile) if lower is None else lower
        hi = np.percentile(deviation, upper_percentile) if upper is None else upper
        if not lo <= hi:
            raise ValueError(f"the trust band's lower level {lo} is above its upper level {hi}")
        return np.nonzero((deviation >= lo) & (deviation <= hi))[0]

    def select(
        self, candidates: Candidates, k: int, rng: np.random.Generator, cap: int | None = None, **band
    ) -> np.ndarray:
        k = _check(candidates, k)
        inside = self.band(candidates, **band)
        if not len(inside) or not k:
            return np.zeros(0, dtype=int)
        groups = candidates.group[inside]
        strict = cap is not None
        if cap is None:
            cap = max(1, -(-k // len(np.unique(groups))))
        if self.pick == "farthest" and candidates.descriptors is None:
            raise ValueError("farthest-point choice needs descriptors")
        order = (
            rng.permutation(len(inside))
            if self.pick == "random"
            else _farthest_first(np.asarray(candidates.descriptors)[inside], rng)
        )
        chosen: list[int] = []
        taken: dict = {}
        for i in order:
            g = groups[i]
            if taken.get(g, 0) < cap:
                chosen.append(i)
                taken[g] = taken.get(g, 0) + 1
                if len(chosen) == k:
                    break
        if not strict and len(chosen) < k:  # a fair share per group first, then the rest of the band in order
            picked = set(chosen)
            chosen += [i for i in order if i not in picked][: k - len(chosen)]
        return np.sort(inside[np.array(chosen, dtype=int)])


class TrustBandFarthest(TrustBand):
    description = "trust band of force deviation, farthest-point choice on descriptors inside, capped per group"

    def __init__(self):
        super().__init__(pick="farthest")


def _farthest_first(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All points in farthest-first order (greedy max-min distance), from a random start."""
    n = len(points)
    order = [int(rng.integers(n))]
    distance = np.linalg.norm(points - points[order[0]], axis=1)
    for _ in range(n - 1):
        distance[order] = -1.0
        nxt = int(np.argmax(distance))
        order.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(points - points[nxt], axis=1))
    return np.array(order)


def mean_aevs(model, structures) -> np.ndarray:
    """Each structure's mean AEV over its atoms (``model``'s featurizer), the descriptor
    farthest-point choice measures distances on; structures: (numbers, positions Å)."""
    import torch

    from aniserve.neighbors import find_pairs

    out = []
    with torch.no_grad():
        for numbers, positions in structures:
            x = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
            pairs = find_pairs(x, model.cutoff)
            vectors = (x[pairs.neighbor] - x[pairs.center]).to(model.dtype)
            species = model.species_indices(torch.as_tensor(np.asarray(numbers)))
            out.append(model.featurizer(species, pairs.center, pairs.neighbor, vectors).mean(0).double().numpy())
    return np.stack(out) if out else np.zeros((0, 1))


@hookimpl
def aniserve_selection_strategies():
    return {"random": RandomSelection, "top-k": TopK, "band": TrustBand, "band-fps": TrustBandFarthest}
