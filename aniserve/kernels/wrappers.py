"""The compiled kernels' calls, from tensors: checks of what is handed over, the
constants and weights in the kernels' layouts, and the ctypes calls themselves."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from aniserve.kernels.build import Constants

#: The longest AEV constant arrays (ShfR; ShfA and ShfZ) the kernel takes; every ANI
#: model's fit.  Others run on the tensor version.
MAX_RADIAL_SHIFTS, MAX_ANGULAR_SHIFTS = 16, 8


class AEVKernelConstants:
    """The AEV constants in the kernel's layout (arrays kept alive with the struct)."""

    def __init__(
        self,
        num_species: int,
        num_pairs: int,
        Rcr: float,
        Rca: float,
        EtaR: float,
        EtaA: float,
        Zeta: float,
        ShfR,
        ShfA,
        ShfZ,
        pair_index: torch.Tensor,
    ):
        as_array = lambda values: np.ascontiguousarray(np.asarray(values, dtype=np.float64).ravel())  # noqa: E731
        shf_z = as_array(ShfZ)
        self._arrays = [as_array(ShfR), as_array(ShfA), np.cos(shf_z), np.sin(shf_z)]
        self._pair_index = np.ascontiguousarray(pair_index.cpu().numpy(), dtype=np.int64)
        double_p = ctypes.POINTER(ctypes.c_double)
        self.struct = Constants(
            num_species,
            len(self._arrays[0]),
            len(self._arrays[1]),
            len(shf_z),
            num_pairs,
            Rcr,
            Rca,
            EtaR,
            EtaA,
            Zeta,
            *(a.ctypes.data_as(double_p) for a in self._arrays),
            self._pair_index.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
        )
        self.width = num_species * len(self._arrays[0]) + num_pairs * len(self._arrays[1]) * len(shf_z)
        self.fits = (
            len(self._arrays[0]) <= MAX_RADIAL_SHIFTS and max(len(self._arrays[1]), len(shf_z)) <= MAX_ANGULAR_SHIFTS
        )


def _suffix(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.float64:
        return "f64"
    raise TypeError(f"the AEV kernel computes in float32 or float64, not {dtype}")


def aev_forward(
    lib: ctypes.CDLL,
    constants: AEVKernelConstants,
    species: torch.Tensor,
    center: torch.Tensor,
    neighbor: torch.Tensor,
    vectors: torch.Tensor,
) -> torch.Tensor:
    """AEVs (N, width) from species (N,), pairs sorted by center (P,), vectors (P, 3) Å."""
    out = vectors.new_zeros(len(species), constants.width)
    status = getattr(lib, f"aev_forward_{_suffix(vectors.dtype)}")(
        ctypes.byref(constants.struct),
        len(species),
        len(center),
        species.data_ptr(),
        center.data_ptr(),
        neighbor.data_ptr(),
        vectors.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise ValueError("AEV constant arrays longer than the compiled kernel allows")
    return out


def pack_panels(weights: torch.Tensor) -> torch.Tensor:
    """(k, K, N) → (k, K·N) in mlp.cpp's column panels: panels of two vectors' width,
    then at most one of one vector, then single columns (a vector: 8 float32 or 4
    float64), each panel's K rows stored one after another."""
    width = 32 // weights.element_size()
    N = weights.shape[2]
    wide, narrow = N - N % (2 * width), N - N % width
    edges = [*range(0, wide, 2 * width), *range(wide, narrow, width), *range(narrow, N + 1)]
    return torch.cat([weights[:, :, a:b].reshape(weights.shape[0], -1) for a, b in zip(edges, edges[1:])], dim=1)


class MLPKernelLayers:
    """A frozen ensemble's layers as the MLP kernel reads them: each hidden layer's
    weights (k, in, out) and their transpose, packed in column panels
    (``pack_panels``), the output layer's (k, in, 1) and the biases (k, 1, out) as they
    are, and arrays of their addresses (the tensors are kept alive here)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], alpha: float):
        hidden = weights[:-1]
        packed = [pack_panels(w) for w in hidden] + [weights[-1].contiguous()]
        transposed = [pack_panels(w.transpose(1, 2)) for w in hidden]
        self.tensors = [*packed, *transposed, *(b.contiguous() for b in biases)]
        layers = len(weights)
        self.weights = (ctypes.c_void_p * layers)(*(t.data_ptr() for t in packed))
        self.transposed = (ctypes.c_void_p * max(1, len(transposed)))(*(t.data_ptr() for t in transposed))
        self.biases = (ctypes.c_void_p * layers)(*(t.data_ptr() for t in self.tensors[-layers:]))
        self.sizes = np.array([weights[0].shape[1], *(w.shape[2] for w in weights)], dtype=np.int64)
        self.layers, self.members, self.dtype, self.alpha = layers, weights[0].shape[0], weights[0].dtype, alpha
        self.first = (weights[0], biases[0])  # (as they are: a shared first layer is made from them)


class FirstLayer(ctypes.Structure):
    # The layout of ``FirstLayer`` in mlp.cpp.
    _fields_ = [
        ("weights", ctypes.c_void_p),
        ("transposed", ctypes.c_void_p),
        ("biases", ctypes.c_void_p),
        ("width", ctypes.c_int64),
        ("column", ctypes.c_int64),
    ]


def _shared_first_layer(group: list[MLPKernelLayers]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """The group's first layers side by side (weights (k, in, Σout) and its transpose,
    packed; biases (k, 1, Σout)), and each network's (width, first column) in it."""
    weights = torch.cat([net.first[0] for net in group], dim=2)
    biases = torch.cat([net.first[1] for net in group], dim=2).contiguous()
    columns = np.cumsum([0, *(int(net.sizes[1]) for net in group)])
    tensors = [pack_panels(weights), pack_panels(weights.transpose(1, 2)), biases]
    return tensors, [(int(columns[-1]), int(c)) for c in columns[:-1]]


class MLPKernelNetworks:
    """Several frozen ensembles as one MLP kernel call reads them: ``groups[g]`` lists
    the networks (``MLPKernelLayers``, the same member count, dtype and input width)
    whose outputs add up to the energies of the g-th group of rows."""

    def __init__(self, groups: list[list[MLPKernelLayers]]):
        networks = [net for group in groups for net in group]
        if len({(net.members, net.dtype, int(net.sizes[0])) for net in networks}) != 1:
            raise ValueError("the networks of one kernel call differ in members, dtype or input width")
        self.groups, self.networks = groups, networks
        self.members, self.dtype, self.width = networks[0].members, networks[0].dtype, int(networks[0].sizes[0])
        self.group_of = [g for g, group in enumerate(groups) for _ in group]
        count, array = len(networks), ctypes.c_void_p * len(networks)
        self.layers = np.array([net.layers for net in networks], dtype=np.int64)
        self.alphas = torch.tensor([net.alpha for net in networks], dtype=self.dtype)
        self.arrays = [
            array(*(net.sizes.ctypes.data for net in networks)),
            array(*(ctypes.addressof(net.weights) for net in networks)),
            array(*(ctypes.addressof(net.transposed) for net in networks)),
            array(*(ctypes.addressof(net.biases) for net in networks)),
        ]
        # (numpy's .ctypes costs ~50 µs a call: the addresses are taken once)
        # A group of several networks (a Δ model's base and correction) reads its
        # features through one first layer holding theirs side by side (mlp.cpp).
        self.first = (FirstLayer * count)()
        self.shared: list[torch.Tensor] = []  # (kept alive here)
        j = 0
        for group in groups:
            if len(group) > 1 and all(net.layers >= 2 for net in group):
                tensors, placement = _shared_first_layer(group)
                self.shared += tensors
                for width, column in placement:
                    self.first[j] = FirstLayer(*(t.data_ptr() for t in tensors), width, column)
                    j += 1
            else:
                j += len(group)
        self.arguments = (
            count,
            self.members,
            self.layers.ctypes.data,
            *(ctypes.addressof(a) for a in self.arrays),
            self.alphas.data_ptr(),
            ctypes.addressof(self.first),
        )


def mlp(
    lib: ctypes.CDLL, networks: MLPKernelNetworks, features: torch.Tensor, counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Member energies (k, n) and input gradients ∂E_mi/∂x_i (k, n, in) of features
    (n, in) whose rows come in groups of ``counts[g]``, each through ``networks.groups[g]``."""
    features = features.to(networks.dtype).contiguous()
    if features.dim() != 2 or features.shape[1] != networks.width:
        raise ValueError(f"features of shape {tuple(features.shape)} for networks of input width {networks.width}")
    n = features.shape[0]
    if sum(counts) != n or len(counts) != len(networks.groups) or min(counts, default=0) < 0:
        raise ValueError(f"row counts {counts} do not match {n} feature rows in {len(networks.groups)} groups")
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    # Each network's first row and row count, as one int64 array (a tensor: its address is cheap).
    rows = torch.tensor([starts[g] for g in networks.group_of] + [counts[g] for g in networks.group_of])
    energies = features.new_empty(networks.members, n)
    gradients = features.new_empty(networks.members, n, features.shape[1])
    status = getattr(lib, f"mlp_{_suffix(networks.dtype)}")(
        *networks.arguments,
        rows.data_ptr(),
        rows.data_ptr() + 8 * len(networks.group_of),
        n,
        features.shape[1],
        features.data_ptr(),
        energies.data_ptr(),
        gradients.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise ValueError(
            f"the MLP kernel refused features of shape {tuple(features.shape)}: a network's widths do not match them"
        )
    return energies, gradients


def mlp_backward(lib: ctypes.CDLL, grad: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Σ_m grad[m, i] gradients[m, i, :]: the features' gradient (n, in), given that of
    the member energies (k, n) and ``mlp``'s input gradients (k, n, in)."""
    grad = grad.to(gradients.dtype).contiguous()
    k, n, width = gradients.shape
    if tuple(grad.shape) != (k, n) or not gradients.is_contiguous():
        raise ValueError(f"gradient of shape {tuple(grad.shape)} for input gradients of shape {(k, n, width)}")
    out = gradients.new_empty(n, width)
    getattr(lib, f"mlp_backward_{_suffix(gradients.dtype)}")(
        k, n, width, grad.data_ptr(), gradients.data_ptr(), out.data_ptr()
    )
    return out


def aev_backward(
    lib: ctypes.CDLL,
    constants: AEVKernelConstants,
    species: torch.Tensor,
    center: torch.Tensor,
    neighbor: torch.Tensor,
    vectors: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """The gradient (P, 3) with respect to the vectors, given that of the AEVs (N, width)."""
    grad = grad.to(vectors.dtype).contiguous()
    out = torch.zeros_like(vectors)
    status = getattr(lib, f"aev_backward_{_suffix(vectors.dtype)}")(
        ctypes.byref(constants.struct),
        len(species),
        len(center),
        species.data_ptr(),
        center.data_ptr(),
        neighbor.data_ptr(),
        vectors.data_ptr(),
        grad.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise ValueError("AEV constant arrays longer than the compiled kernel allows")
    return out


def cell_list(
    lib: ctypes.CDLL,
    queries: torch.Tensor,
    sources: torch.Tensor,
    source_atom: torch.Tensor,
    central: torch.Tensor | None,
    cutoff: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, source) index pairs within ``cutoff``, sorted by query, without a query's
    own atom (``source_atom[s] == q`` where ``central[s]``; all sources central when
    None).  queries (Q, 3), sources (S, 3) Å, float64 on the CPU."""
    queries, sources = queries.to(torch.float64).contiguous(), sources.to(torch.float64).contiguous()
    source_atom = source_atom.long().contiguous()
    central = torch.ones(len(sources), dtype=torch.uint8) if central is None else central.to(torch.uint8).contiguous()
    found = ctypes.POINTER(ctypes.c_int64)()
    total = lib.neighbors_cell_list(
        len(queries),
        queries.data_ptr(),
        len(sources),
        sources.data_ptr(),
        source_atom.data_ptr(),
        central.data_ptr(),
        cutoff,
        torch.get_num_threads(),
        ctypes.byref(found),
    )
    pairs = _taken_rows(lib, found, 2, total)
    return pairs[0], pairs[1]


def _taken_rows(lib: ctypes.CDLL, found, rows: int, total: int) -> torch.Tensor:
    """The search's malloc'ed (rows, total) int64 result as a tensor, the C array freed."""
    try:
        if total < 0:
            raise MemoryError("out of memory in the neighbour search")
        if not total:
            return torch.zeros(rows, 0, dtype=torch.long)
        return torch.from_numpy(np.ctypeslib.as_array(found, shape=(rows, total)).copy())
    finally:
        lib.neighbors_free(found)  # (a null pointer when nothing was allocated: free ignores it)


def periodic_pairs(
    lib: ctypes.CDLL, positions: torch.Tensor, cell: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(center, neighbor, shift) of every pair within ``cutoff`` in a periodic ``cell``
    (rows are lattice vectors; positions (N, 3) Å, float64 on the CPU, finite: the
    caller checks), sorted by center; None when the cell has room for fewer than three
    cutoff-wide bins along some direction (the caller then builds images)."""
    positions = positions.to(torch.float64).contiguous()
    cell = cell.to(torch.float64).contiguous()
    inverse = torch.linalg.inv(cell).contiguous()
    found = ctypes.POINTER(ctypes.c_int64)()
    total = lib.neighbors_periodic(
        len(positions),
        positions.data_ptr(),
        cell.data_ptr(),
        inverse.data_ptr(),
        cutoff,
        torch.get_num_threads(),
        ctypes.byref(found),
    )
    if total == -3:
        return None
    if total == -2:
        raise ValueError("positions too far outside the periodic cell (fractional coordinates beyond 2^52)")
    rows = _taken_rows(lib, found, 5, total)
    return rows[0], rows[1], rows[2:].T.contiguous()


class StepPlan:
    """What ``step`` needs of a frozen model for one set of elements: its AEV constants,
    its networks in the kernel's layout (``networks.groups[g]`` summed over the atoms of
    species ``group_species[g]``) and the AEV columns they take (None: all)."""

    def __init__(
        self,
        constants: AEVKernelConstants,
        networks: MLPKernelNetworks,
        group_species: list[int],
        columns: torch.Tensor | None,
    ):
        if len(group_species) != len(networks.groups):
            raise ValueError(f"{len(group_species)} element groups for {len(networks.groups)} network groups")
        width = constants.width if columns is None else len(columns)
        if width != networks.width:
            raise ValueError(f"{width} AEV columns for networks of input width {networks.width}")
        self.constants, self.networks = constants, networks
        self.dtype, self.members = networks.dtype, networks.members
        self._arrays = [
            np.array(networks.group_of, dtype=np.int64),
            np.array(group_species, dtype=np.int64),
            np.arange(constants.width, dtype=np.int64)
            if columns is None
            else np.ascontiguousarray(columns.cpu().numpy(), dtype=np.int64),
        ]
        group_of, species, cols = self._arrays
        self.arguments = (*networks.arguments, group_of.ctypes.data, len(species), species.ctypes.data)
        self.columns = (cols.ctypes.data, len(cols))
        self.constants_ref = ctypes.byref(constants.struct)


def step(
    lib: ctypes.CDLL,
    plan: StepPlan,
    species: torch.Tensor,
    center: torch.Tensor,
    neighbor: torch.Tensor,
    positions: torch.Tensor,
    position_of: torch.Tensor | None,
    shift: torch.Tensor | None,
    cell: torch.Tensor | None,
    structure: torch.Tensor,
    n_centers: int,
    member_energies: torch.Tensor,
    grad_positions: torch.Tensor,
    strain_grad: torch.Tensor | None,
    threads: int | None = None,
) -> None:
    """One compiled serving step (step.cpp): adds the member energies (k, B), the
    gradient of their mean with respect to the atoms' positions (n_atoms, 3) and, given
    a tensor for it, to the strain (B, 3, 3), all float64.

    species (n_atoms,), the first ``n_centers`` atoms being centers; pairs (center,
    neighbor) sorted by center; atom i at ``positions[position_of[i]]`` ((n, 3) float64
    Å; None: at ``positions[i]``); per pair, integer image offsets ``shift`` (P, 3) in
    units of its structure's ``cell`` ((B, 3, 3), rows), both None when isolated;
    structure (≥ n_centers,) of each atom.  threads: default torch's count."""
    n_atoms, n_pairs, n_structures = len(species), len(center), member_energies.shape[1]
    int64, f64 = torch.int64, torch.float64
    arrays = [species, center, neighbor, positions, structure, member_energies, grad_positions]
    arrays += [t for t in (position_of, shift, cell, strain_grad) if t is not None]
    # The kernel checks every index; the sizes of the arrays it is handed are checked here.
    if not (
        species.dtype == center.dtype == neighbor.dtype == structure.dtype == int64
        and positions.dtype == member_energies.dtype == grad_positions.dtype == f64
        and len(neighbor) == n_pairs
        and positions.dim() == 2
        and positions.shape[1] == 3
        and (position_of is None or (position_of.dtype == int64 and len(position_of) == n_atoms))
        and (shift is None) == (cell is None)
        and (shift is None or (shift.dtype == f64 and shift.shape == (n_pairs, 3)))
        and (cell is None or (cell.dtype == f64 and cell.shape == (n_structures, 3, 3)))
        and 0 <= n_centers <= min(n_atoms, len(structure))
        and member_energies.shape[0] == plan.members
        and grad_positions.shape == (n_atoms, 3)
        and (strain_grad is None or (strain_grad.dtype == f64 and strain_grad.shape == (n_structures, 3, 3)))
        and all(t.is_contiguous() and t.device.type == "cpu" for t in arrays)
    ):
        raise ValueError("the compiled step was handed arrays of inconsistent shapes, dtypes or layouts")
    address = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    status = getattr(lib, f"ani_step_{_suffix(plan.dtype)}")(
        plan.constants_ref,
        n_atoms,
        n_centers,
        n_pairs,
        species.data_ptr(),
        center.data_ptr(),
        neighbor.data_ptr(),
        len(positions),
        positions.data_ptr(),
        address(position_of),
        address(shift),
        address(cell),
        structure.data_ptr(),
        n_structures,
        *plan.arguments,
        *plan.columns,
        member_energies.data_ptr(),
        grad_positions.data_ptr(),
        address(strain_grad),
        torch.get_num_threads() if threads is None else threads,
    )
    if status == 1:
        raise ValueError("the compiled step refused an index out of range (species, pair, structure or column)")
    if status:
        raise ValueError("the compiled step's kernels refused the model's constants or network widths")
