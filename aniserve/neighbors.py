"""Neighbour search: directed pairs within a cutoff, linear in the number of atoms.

Pairs are found in float64 without gradients; what they return is integer data (atom
indices and periodic image shifts), from which the potential rebuilds differentiable
displacement vectors.  Periodic cells may be triclinic and shorter than the cutoff,
in which case an atom sees several images of its neighbours and of itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from aniserve import kernels

#: Below this many atoms a dense distance matrix beats a cell list.
_DENSE_LIMIT = 256
#: Queries per chunk of the cell-list search.
_QUERY_CHUNK = 2048


@dataclasses.dataclass
class Pairs:
    """Directed neighbour pairs, sorted by ``center``.

    ``vector = positions[neighbor] - positions[center] + shift @ cell`` (Å), where
    ``shift`` holds integer image offsets in units of the cell's lattice vectors, or is
    None when no pair crosses a periodic boundary.
    """

    center: torch.Tensor  # (P,) int64
    neighbor: torch.Tensor  # (P,) int64
    shift: torch.Tensor | None  # (P, 3) float, integer-valued

    def __len__(self) -> int:
        return len(self.center)


#: Periodic images of the cell that one atom's cutoff sphere may reach, at most: a cell
#: much thinner than the cutoff in some direction would need more (memory and time grow
#: with them), and is refused with this explanation.  16³ allows cells down to ~0.7 Å
#: wide in each direction for ANI-1x's 5.2 Å cutoff — far below any real crystal.
MAX_IMAGES = 16**3


def check_cell(cell: torch.Tensor, cutoff: float) -> None:
    """Refuse, before anything is allocated from it, a cell ((3, 3) or (B, 3, 3) Å, rows
    are lattice vectors) that is not finite, is singular, or is so thin that an atom
    would see more than MAX_IMAGES periodic images within ``cutoff``."""
    cell = cell.detach().to(torch.float64).reshape(-1, 3, 3)
    if not torch.isfinite(cell).all():
        raise ValueError("cell contains NaN or infinite values")
    volume = torch.linalg.det(cell).abs()  # (B,)
    lengths = torch.linalg.norm(cell, dim=-1)
    if (volume <= 1e-8 * lengths.prod(-1)).any() or (lengths == 0).any():
        raise ValueError(
            f"cell is singular (volume {float(volume.min()):.3g} Å³): its lattice vectors must be linearly independent"
        )
    faces = torch.stack(
        [torch.linalg.norm(torch.linalg.cross(cell[:, (a + 1) % 3], cell[:, (a + 2) % 3]), dim=-1) for a in range(3)],
        dim=-1,
    )  # (B, 3) areas of the faces spanned by the other two vectors
    widths = volume[:, None] / faces  # distances between opposite faces, Å
    images = (2 * torch.ceil(cutoff / widths) + 1).prod(-1)
    if (images > MAX_IMAGES).any():
        b = int(torch.argmax(images))
        raise ValueError(
            f"cell too thin for the model's {cutoff:g} Å cutoff: its narrowest width is "
            f"{float(widths[b].min()):.3g} Å, so each atom would see {float(images[b]):.3g} periodic "
            f"images (limit {MAX_IMAGES})"
        )


def find_pairs(positions: torch.Tensor, cutoff: float, cell: torch.Tensor | None = None) -> Pairs:
    """All directed pairs (i, j[, image]) with |r_j + shift·cell − r_i| ≤ cutoff.

    positions: (N, 3) Å.  cell: (3, 3) Å, rows are lattice vectors, periodic in all
    three directions; None for an isolated molecule.
    """
    with torch.no_grad():
        pos = positions.detach().to(torch.float64)
        if not math.isfinite(float(pos.sum())) and not torch.isfinite(pos).all():
            raise ValueError("positions contain NaN or infinite values")
        if cell is None:
            if len(pos) <= _DENSE_LIMIT:
                return _dense_pairs(pos, cutoff)
            center, neighbor = _cell_list(pos, pos, torch.arange(len(pos), device=pos.device), cutoff)
            return Pairs(center, neighbor, None)
        check_cell(cell, cutoff)
        return _periodic_pairs(pos, cell.detach().to(torch.float64), cutoff)


def _dense_pairs(pos: torch.Tensor, cutoff: float) -> Pairs:
    d2 = (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1)
    d2.fill_diagonal_(math.inf)
    center, neighbor = torch.nonzero(d2 <= cutoff * cutoff, as_tuple=True)
    return Pairs(center, neighbor, None)


def _periodic_pairs(pos: torch.Tensor, cell: torch.Tensor, cutoff: float) -> Pairs:
    lib = kernels.library_for(pos)
    if lib is not None:
        # Compiled, without images: bins of the cell itself (kernels/neighbors.cpp); a
        # cell with room for fewer than three bins along a direction comes back here.
        found = kernels.periodic_pairs(lib, pos, cell, cutoff)
        if found is not None:
            center, neighbor, shift = found
            return Pairs(center, neighbor, shift.to(pos.dtype))
    inverse = torch.linalg.inv(cell)
    frac = pos @ inverse
    wrap = -torch.floor(frac)  # integer shift that brings each atom into [0, 1)
    frac = frac + wrap
    # Perpendicular width of the cell along each lattice direction: how many image
    # layers the cutoff reaches.
    volume = torch.abs(torch.linalg.det(cell))
    widths = torch.stack(
        [volume / torch.linalg.norm(torch.cross(cell[(k + 1) % 3], cell[(k + 2) % 3], dim=0)) for k in range(3)]
    )
    reach = cutoff / widths  # in fractional units
    layers = [int(math.ceil(r)) for r in reach.tolist()]
    offsets = torch.tensor(
        list(itertools.product(*[range(-n, n + 1) for n in layers])), dtype=torch.float64, device=pos.device
    )
    # Every image of every atom, kept only if it lies within the cutoff slab around the
    # central cell (a necessary condition for being a neighbour of a central atom).
    image_frac = (frac[None, :, :] + offsets[:, None, :]).reshape(-1, 3)
    image_atom = torch.arange(len(pos), device=pos.device).repeat(len(offsets))
    image_offset = offsets.repeat_interleave(len(pos), dim=0)
    keep = ((image_frac >= -reach) & (image_frac < 1 + reach)).all(dim=1)
    image_frac, image_atom, image_offset = image_frac[keep], image_atom[keep], image_offset[keep]
    center, source = _cell_list(frac @ cell, image_frac @ cell, image_atom, cutoff, central=(image_offset == 0).all(1))
    neighbor = image_atom[source]
    # Back to the caller's (unwrapped) positions: r_j' = r_j + w_j·cell.
    shift = image_offset[source] + wrap[neighbor] - wrap[center]
    return Pairs(center, neighbor, shift.to(pos.dtype))


def _cell_list(
    queries: torch.Tensor,
    sources: torch.Tensor,
    source_atom: torch.Tensor,
    cutoff: float,
    central: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (query q, source s) within cutoff, by binning sources into cubes of side cutoff.

    A source is query q's own atom where ``source_atom[s] == q`` and ``central[s]`` (the
    periodic search's sources are images: only the unshifted one is the atom itself; all
    are central when None); those pairs are left out.  Bins are hashed (sorted unique
    ids), so sparse or far-flung systems need no dense grid.  Returns (query index,
    source index), sorted by query.  On a CPU with the compiled kernels
    (kernels/neighbors.cpp), the same search there.
    """
    lib = kernels.library_for(queries)
    if lib is not None:
        return kernels.cell_list(lib, queries, sources, source_atom, central, cutoff)
    origin = sources.min(dim=0).values
    q_bin = torch.floor((queries - origin) / cutoff).long() + 1  # +1: offsets never go negative
    s_bin = torch.floor((sources - origin) / cutoff).long() + 1
    dims = torch.maximum(q_bin.max(0).values, s_bin.max(0).values) + 2
    stride = torch.stack([torch.ones_like(dims[0]), dims[0], dims[0] * dims[1]])
    s_id = (s_bin * stride).sum(1)
    order = torch.argsort(s_id)
    unique_ids, counts = torch.unique_consecutive(s_id[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    neighbour_offsets = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), device=queries.device)

    def search(q0: int, q1: int):
        """Pairs of queries q0..q1-1 with the sources in the 27 bins around each."""
        target = ((q_bin[q0:q1, None, :] + neighbour_offsets[None]) * stride).sum(-1)  # (Q, 27)
        slot = torch.searchsorted(unique_ids, target).clamp(max=len(unique_ids) - 1)
        count = torch.where(unique_ids[slot] == target, counts[slot], torch.zeros_like(slot)).reshape(-1)
        start = starts[slot].reshape(-1)
        total = int(count.sum())
        query = (
            torch.arange(q0, q1, device=queries.device)
            .repeat_interleave(27)
            .repeat_interleave(count, output_size=total)
        )
        first = torch.cumsum(count, 0) - count
        local = torch.arange(total, device=queries.device) - first.repeat_interleave(count, output_size=total)
        source = order[start.repeat_interleave(count, output_size=total) + local]
        d2 = (sources[source] - queries[query]).pow(2).sum(-1)
        keep = d2 <= cutoff * cutoff
        if central is None:
            keep &= source_atom[source] != query
        else:
            keep &= (source_atom[source] != query) | ~central[source]
        return query[keep], source[keep]

    # Queries in chunks, so the candidate arrays (~400 per query) stay cache-sized and
    # the search linear in atoms.  Results come out sorted by query (stable for triplets).
    chunks = [search(q0, min(len(queries), q0 + _QUERY_CHUNK)) for q0 in range(0, len(queries), _QUERY_CHUNK)]
    found, sources = (torch.cat(parts) for parts in zip(*chunks))
    return found, sources


class NeighborList:
    """Pairs within ``cutoff + skin``, rebuilt only when needed (the molecular-dynamics case).

    While no atom has moved more than skin/2 since the last build (and the atom count is
    unchanged), no pair can have come within ``cutoff`` that the list lacks, so the old
    list serves; consumers ignore the extra pairs beyond ``cutoff``.  A changed cell
    (constant-pressure runs) is allowed for by its deformation, below.  Positions must be
    given the same way each call (no re-wrapping into the cell: an atom that jumps by a
    lattice vector simply triggers a rebuild).
    """

    def __init__(self, cutoff: float, skin: float = 1.0):
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.cutoff, self.skin = cutoff, skin
        self.builds = 0
        self._pairs: Pairs | None = None
        self._positions: torch.Tensor | None = None
        self._cell: torch.Tensor | None = None

    def pairs(self, positions: torch.Tensor, cell: torch.Tensor | None = None) -> Pairs:
        """Pairs for these positions ((N, 3) Å) and cell ((3, 3) Å or None)."""
        positions = positions.detach().to(torch.float64)
        cell = None if cell is None else cell.detach().to(torch.float64)
        if self._needs_rebuild(positions, cell):
            self._pairs = find_pairs(positions, self.cutoff + self.skin, cell)
            self._positions, self._cell = positions.clone(), None if cell is None else cell.clone()
            self.builds += 1
        assert self._pairs is not None
        return self._pairs

    def _needs_rebuild(self, positions: torch.Tensor, cell: torch.Tensor | None) -> bool:
        if self._pairs is None or self._positions is None or positions.shape != self._positions.shape:
            return True
        if (cell is None) != (self._cell is None):
            return True
        if not len(positions):
            return False
        allowed, unstrained = self.skin / 2, positions
        if cell is not None and self._cell is not None and not torch.equal(cell, self._cell):
            # Write the new cell as the old one deformed, h = h₀F.  A pair vector is then
            # (d₀ + e_j − e_i)F, where d₀ is its vector at the build and e the atoms'
            # displacements with the deformation taken out, u = rF⁻¹ − r₀.  It stays
            # beyond the cutoff while σ_min(F)·(cutoff + skin − 2 max|e|) > cutoff.
            deform = torch.linalg.solve(self._cell, cell)
            smallest = float(torch.linalg.svdvals(deform).min())
            if smallest <= 0:
                return True
            allowed = (self.cutoff + self.skin - self.cutoff / smallest) / 2
            if allowed < 0:
                return True
            unstrained = torch.linalg.solve(deform.T, positions.T).T
        if unstrained.is_cpu:  # numpy: ~15 µs for a molecule, where four tensor operations take ~45
            d = unstrained.numpy() - self._positions.numpy()
            return bool((d * d).sum(1).max() > allowed**2)
        return bool((unstrained - self._positions).pow(2).sum(-1).max() > allowed**2)


def batch_pairs(numbers: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor | None, cutoff: float) -> Pairs:
    """Pairs of a padded batch (numbers (B, N), 0 = padding; positions (B, N, 3) Å;
    cell None or (B, 3, 3)), indexing the real atoms in row-major order."""
    if cell is None and numbers.shape[1] <= _DENSE_LIMIT:
        return Pairs(*molecule_pairs(numbers, positions, cutoff), None)
    real = numbers > 0
    counts = real.sum(1).tolist()
    return concatenate(
        [find_pairs(positions[b][real[b]], cutoff, None if cell is None else cell[b]) for b in range(len(counts))],
        _starts(counts),
    )


def _starts(counts: list[int]) -> list[int]:
    return list(itertools.accumulate([0, *counts[:-1]]))


def concatenate(pairs: list[Pairs], starts: list[int]) -> Pairs:
    """One pair list for a batch: structure b's atom indices offset by ``starts[b]``."""
    if len(pairs) == 1 and starts[0] == 0:
        return pairs[0]
    # One offset tensor for all: two additions, not two per structure (a 64-structure
    # batch would spend half a millisecond on them).
    device = pairs[0].center.device
    offset = torch.repeat_interleave(
        torch.tensor(starts, dtype=torch.long, device=device),
        torch.tensor([len(p) for p in pairs], dtype=torch.long, device=device),
    )
    center = torch.cat([p.center for p in pairs]) + offset
    neighbor = torch.cat([p.neighbor for p in pairs]) + offset
    shift = None
    if any(p.shift is not None for p in pairs):
        shift = torch.cat(
            [
                p.shift if p.shift is not None else torch.zeros(len(p), 3, dtype=torch.float64, device=p.center.device)
                for p in pairs
            ]
        )
    return Pairs(center, neighbor, shift)


def molecule_pairs(numbers: torch.Tensor, positions: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed pairs within ``cutoff`` for a padded batch of isolated molecules at once.

    numbers (B, N) with 0 for padding; positions (B, N, 3).  Returns (center, neighbor)
    indexing the real atoms in row-major order (``positions[numbers > 0]``), sorted by
    center.  One dense (B, N, N) pass: the fast path for many small molecules.
    """
    with torch.no_grad():
        real = numbers > 0
        padded = not bool(real.all())
        pos = positions.detach()
        diff = pos[:, :, None, :] - pos[:, None, :, :]
        close = (diff * diff).sum(-1) <= cutoff * cutoff
        if padded:
            close &= real[:, :, None] & real[:, None, :]
        close.diagonal(dim1=1, dim2=2).fill_(False)
        b, i, j = torch.nonzero(close, as_tuple=True)
        if not padded:  # real atoms in row-major order: b·N + i
            if len(numbers) == 1:
                return i, j
            return b * numbers.shape[1] + i, b * numbers.shape[1] + j
        flat = torch.cumsum(real.reshape(-1), 0).reshape(real.shape) - 1
        return flat[b, i], flat[b, j]
