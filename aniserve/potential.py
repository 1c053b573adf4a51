"""The ANI potential: featurizer + element networks + self atomic energies.

``ANIPotential.forward`` is pure tensor computation (Å in, Hartree out).
``ANIPotential.evaluate`` is the convenient entry point: it checks the input, finds
neighbours, and returns energies, forces and strain derivatives as float64 numpy arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from aniserve.elements import NUMBERS, symbol
from aniserve.kernels.threads import Threads
from aniserve.neighbors import Pairs, batch_pairs, check_cell, concatenate


@dataclasses.dataclass
class Evaluation:
    """Results in Hartree and Å.  A batch adds a leading structure axis to every field.

    energy: ensemble mean, Hartree.  forces: −dE/dr, (N, 3) Hartree/Å (zero on padding).
    strain_derivative: dE/dε, (3, 3) Hartree, for r → r(I+ε) applied to positions and
    cell; None without a cell.  member_energies: (k,) Hartree.  energy_std: population
    standard deviation over members, times the model's calibration scale
    (``ANIPotential.energy_std_scale``; 1 for a model without one).  member_forces:
    (k, N, 3), only when asked for.
    """

    energy: np.ndarray | float
    forces: np.ndarray
    member_energies: np.ndarray
    energy_std: np.ndarray | float
    strain_derivative: np.ndarray | None = None
    member_forces: np.ndarray | None = None
    member_strain_derivatives: np.ndarray | None = None


class ANIPotential(nn.Module):
    """An ANI potential: featurizer → element networks (k ensemble members) → energy.

    E = Σ_atoms (mean over members of the atom's network output) + Σ_atoms self energy
    of its element, in Hartree, from positions in Å.  ``forward`` is the differentiable
    core (pairs and displacement vectors in, per-member energies out, used by training);
    ``evaluate`` is the serving entry point: it checks the input, finds neighbours
    (or reuses given ones), and returns an ``Evaluation`` with energies, forces and the
    strain derivative, never a NaN.  On a CPU with the compiled kernels, a frozen model
    of ANI's own components is evaluated in one compiled step (``kernels.step``: no
    autograd graph, no Python between AEVs, networks and forces); member forces,
    plugins' components and GPUs take the autograd path, which the step is tested
    against.  Components come from the plugin registry by name
    (``description`` records them); ``load_model`` builds one from a file or name.
    """

    #: Pairs per block in ``evaluate``: large systems are featurized and differentiated
    #: a block of center atoms at a time, which keeps the working set near the CPU caches
    #: (per-atom cost at 12k atoms within a few % of that at 1.5k) and memory bounded.
    block_pairs = 150_000

    # Components are plugins' as much as aniserve's: typed by their contracts
    # (aniserve.contracts), checked when registered, not here.
    featurizer: Any
    networks: Any
    self_energies: torch.Tensor
    species_of_number: torch.Tensor

    def __init__(
        self,
        featurizer: Any,
        networks: Any,
        self_energies: dict[str, float],
        description: dict | None = None,
    ):
        super().__init__()
        # The compiled network kernel reads as many feature columns as the networks take:
        # a featurizer of another width must never reach it.
        width = getattr(networks, "input_width", None)
        if width is not None and width != featurizer.output_width:
            raise ValueError(
                f"the featurizer gives {featurizer.output_width} features per atom, the element networks take {width}"
            )
        if list(getattr(featurizer, "elements", networks.elements)) != list(networks.elements):
            raise ValueError(
                f"the featurizer's elements {list(featurizer.elements)} differ from the networks' "
                f"{list(networks.elements)}"
            )
        self.featurizer = featurizer
        self.networks = networks
        self.elements = list(networks.elements)
        self.description = description or {}
        #: The spread's calibration (``energy_std_scale``, ``collect_threshold_kcal``, what
        #: they were fitted on): ``aniserve.training.calibration``; empty for none.
        self.uncertainty: dict = dict(self.description.get("uncertainty") or {})
        # Self energies stay float64 whatever the model's dtype: rounding them to float32
        # moves totals by ~3e-6 Hartree per heavy atom.
        self.register_buffer(
            "self_energies",
            torch.tensor([self_energies[e] for e in self.elements], dtype=torch.float64),
            persistent=False,
        )
        # Model species index of atomic numbers 0..119, clamped into that range: −1 for
        # padding (0), out-of-range numbers (119) and elements the model lacks.
        table = torch.full((120,), -1, dtype=torch.long)
        for index, element in enumerate(self.elements):
            table[NUMBERS[element]] = index
        self.register_buffer("species_of_number", table, persistent=False)
        # Looked up on every call, where a parameters() walk costs tens of µs on a small
        # molecule; refreshed by _apply (.to, .float(), .double(), .cuda()).
        self._ensemble_size = networks.ensemble_size
        self._dtype_device = (self.dtype, self.device)
        self._threads = Threads()  # the compiled step's thread counts, chosen by timing

    @property
    def cutoff(self) -> float:
        return self.featurizer.cutoff

    @property
    def energy_std_scale(self) -> float:
        """What the members' population std is multiplied by to give ``energy_std``."""
        return float(self.uncertainty.get("energy_std_scale", 1.0))

    @property
    def ensemble_size(self) -> int:
        return self._ensemble_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.networks.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.networks.parameters()).device

    def _apply(self, fn, recurse=True):
        # Keep self energies in float64 through .to(dtype) / .float() / .double().
        sae = self.self_energies
        result = super()._apply(fn, recurse)
        self.self_energies = sae.to(device=self.species_of_number.device)
        self._dtype_device = (self.dtype, self.device)
        self.__dict__.pop("_step_plans", None)
        self.__dict__.pop("_layouts", None)
        self.__dict__.pop("_last_joined", None)
        return result

    def forward(
        self,
        species: torch.Tensor,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        vectors: torch.Tensor,
        structure: torch.Tensor,
        num_structures: int,
        centers: int | None = None,
        present: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Member energies (k, B) in Hartree, float64.

        species: (N,) model species indices; center/neighbor: (P,) pair atom indices,
        sorted by center; vectors: (P, 3) Å; structure: (N,) structure index of each atom.
        centers: count only the first ``centers`` atoms (the rest are neighbours that a
        block of a large system needs for its pairs); default all.  present: the sorted
        species indices occurring in ``species``, when the caller knows them already (a
        superset is fine: it only keeps more feature columns).
        """
        features = self.featurizer(species, center, neighbor, vectors)
        # Features of species absent from the input (neighbours included) are zero: drop
        # them and the network weights they would meet (featurizers that can tell offer
        # nonzero_columns).
        columns = None
        if hasattr(self.featurizer, "nonzero_columns"):
            if present is None:
                present = tuple(torch.unique(species).tolist())
            columns = self.featurizer.nonzero_columns(present)
        if centers is not None:
            species, features, structure = species[:centers], features[:centers], structure[:centers]
        if columns is not None:
            features = features.index_select(1, columns)
        atomic = self.networks(species, features, columns).to(torch.float64)
        energies = atomic.new_zeros(atomic.shape[0], num_structures).index_add_(1, structure, atomic)
        offsets = atomic.new_zeros(num_structures).index_add_(0, structure, self.self_energies[species])
        return energies + offsets

    # ----------------------------------------------------------------- evaluation
    def species_indices(self, numbers: torch.Tensor) -> torch.Tensor:
        """Model species index of each atomic number; a clear error for unknown ones."""
        numbers = torch.as_tensor(numbers, device=self.species_of_number.device)
        species = self.species_of_number[numbers.clamp(0, 119)]
        if (species < 0).any():
            if ((numbers < 1) | (numbers > 118)).any():
                bad = numbers[(numbers < 1) | (numbers > 118)].unique().tolist()
                raise ValueError(f"atomic numbers must be 1..118, got {bad}")
            bad = numbers[species < 0]
            counts = {symbol(int(z)): int((bad == z).sum()) for z in bad.unique()}
            listed = ", ".join(f"{s} ({n} atom{'s' * (n > 1)})" for s, n in counts.items())
            raise ValueError(
                f"model {self.description.get('name', '')!s} does not support element(s) {listed}; "
                f"it covers {', '.join(self.elements)}"
            )
        return species

    # ------------------------------------------------------------ torch-native
    def atomic_energies(
        self, numbers: torch.Tensor, coordinates: torch.Tensor, cell: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-atom energies (ensemble mean, self energy included), Hartree, float64, as
        torch tensors that stay differentiable with respect to ``coordinates``, to any
        order: the tensor path (no compiled kernels), TorchANI-style.  numbers (N,) or
        (B, N) atomic numbers (0 pads a batch); coordinates (N, 3) or (B, N, 3) Å; cell
        (3, 3) or (B, 3, 3) Å, rows, periodic in 3D, or None.  Padding atoms get 0."""
        from aniserve import kernels

        if not isinstance(coordinates, torch.Tensor):  # (an array: values, nothing to differentiate)
            coordinates = _as_tensor(coordinates, torch.float64, self.device, "coordinates")
        if cell is not None and not isinstance(cell, torch.Tensor):
            cell = _as_tensor(cell, torch.float64, self.device, "cell")
        layout = self._layout(numbers)
        pos64 = _checked_positions(coordinates.detach(), layout.numbers.shape, layout.single, self.device)
        cell64 = _checked_cell(None if cell is None else cell.detach(), layout.n_structures, self.device)
        num, single, species, structure = layout.numbers, layout.single, layout.species, layout.structure
        pairs = batch_pairs(num, pos64, cell64, self.cutoff)
        if cell is not None:  # (differentiable, where the checked copy above is not)
            cell64 = cell.to(device=self.device, dtype=torch.float64).expand(len(num), 3, 3)
        pos = coordinates[None] if single else coordinates
        flat = layout.flat(pos.to(device=self.device, dtype=torch.float64))
        vectors = flat.index_select(0, pairs.neighbor) - flat.index_select(0, pairs.center)
        if pairs.shift is not None:
            assert cell64 is not None  # shifts come from a cell
            vectors = (
                vectors
                + torch.bmm(
                    pairs.shift.to(torch.float64)[:, None, :],
                    cell64.index_select(0, structure.index_select(0, pairs.center)),
                )[:, 0]
            )
        with kernels.using("tensor"):
            features = self.featurizer(species, pairs.center, pairs.neighbor, vectors.to(self.dtype))
            atomic = self.networks(species, features).to(torch.float64).mean(0)
        per_atom = atomic + self.self_energies[species]
        out = per_atom if layout.real is None else per_atom.new_zeros(num.shape).masked_scatter(layout.real, per_atom)
        out = out.reshape(num.shape)
        return out[0] if single else out

    def energies(
        self, numbers: torch.Tensor, coordinates: torch.Tensor, cell: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Ensemble-mean energies, Hartree, float64: a scalar for one structure, (B,) for
        a batch; differentiable (see ``atomic_energies``)."""
        return self.atomic_energies(numbers, coordinates, cell).sum(-1)

    def energy_and_forces(
        self,
        numbers: torch.Tensor,
        coordinates: torch.Tensor,
        cell: torch.Tensor | None = None,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energies, forces = −∂E/∂coordinates), torch tensors; with ``create_graph``
        both stay differentiable (force training, Hessians), otherwise they are values."""
        if not isinstance(coordinates, torch.Tensor):
            coordinates = _as_tensor(coordinates, torch.float64, self.device, "coordinates")
        coordinates = coordinates if coordinates.requires_grad else coordinates.detach().requires_grad_(True)
        energy = self.energies(numbers, coordinates, cell)
        (gradient,) = torch.autograd.grad(energy.sum(), coordinates, create_graph=create_graph)
        return (energy, -gradient) if create_graph else (energy.detach(), -gradient)

    def hessian(self, numbers: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
        """∂²E/∂x∂x of one isolated structure, (3N, 3N) in Hartree/Å², by autograd."""
        coordinates = _as_tensor(coordinates, torch.float64, self.device, "coordinates")
        x = coordinates.detach().reshape(-1)
        shape = coordinates.shape
        return torch.autograd.functional.hessian(lambda flat: self.energies(numbers, flat.reshape(shape)), x)

    def evaluate(
        self, numbers, positions, cell=None, *, member_forces: bool = False, pairs: list[Pairs] | None = None
    ) -> Evaluation:
        """Energy, forces and (with a cell) strain derivative of one structure or a batch.

        numbers: (N,) atomic numbers, or (B, N) with 0 marking padding.
        positions: (N, 3) or (B, N, 3), Å.  cell: None (isolated), or (3, 3) / (B, 3, 3)
        with lattice vectors as rows, Å, periodic in all three directions.
        pairs: neighbour lists to reuse, one per structure, from ``find_pairs`` or a
        ``NeighborList`` (a cutoff with a skin is fine: pairs beyond it are ignored).
        """
        device = self._dtype_device[1]
        # Every input check, before any work.
        layout = self._layout(numbers)
        pos64 = _checked_positions(positions, layout.numbers.shape, layout.single, device)
        cell64 = _checked_cell(cell, layout.n_structures, device)
        flat_positions = layout.flat(pos64)
        if cell64 is not None and pairs is not None:
            check_cell(cell64, self.cutoff)  # (without given pairs, the neighbour search checks it)
        all_pairs = (
            batch_pairs(layout.numbers, pos64, cell64, self.cutoff) if pairs is None else self._joined(pairs, layout)
        )
        members, grads, member_grads = self._energies_and_gradients(
            layout, flat_positions, all_pairs, cell64, member_forces
        )
        # The results are assembled in numpy: after the step a torch operation on these
        # few numbers costs ~10 µs (its code is out of the caches), numpy's ~1.
        values = members.detach().cpu().numpy()  # (k, B) float64
        shape = layout.numbers.shape
        result = Evaluation(
            energy=values.mean(0),
            forces=_forces(grads[0], layout.real, shape),
            member_energies=values.T,
            energy_std=values.std(0) * self.energy_std_scale,
            strain_derivative=None if cell64 is None else grads[1].detach().to(torch.float64).cpu().numpy(),
        )
        _check_finite(result, layout, pos64)
        if member_forces:
            result.member_forces = np.stack([_forces(g[0], layout.real, shape) for g in member_grads], axis=1)
            if cell64 is not None:
                result.member_strain_derivatives = np.stack(
                    [g[1].to(torch.float64).cpu().numpy() for g in member_grads], axis=1
                )
        return _first(result) if layout.single else result

    def _layout(self, numbers) -> _Layout:
        """The checked layout of these atomic numbers (``_Layout``), from the memo when the
        same integer array was laid out before (its checks and element lookups are then
        already done: a few tens of µs of a small molecule's call)."""
        key = _layout_key(numbers)
        memo = self.__dict__.setdefault("_layouts", {})  # emptied by _apply (device)
        known = None if key is None else memo.get(key)  # (one lookup: another thread may clear it)
        if known is not None:
            return known
        num, single, padded = _checked_numbers(numbers, self.species_of_number.device)
        num = num.clone()  # (it may share the caller's array, which the memo must not follow)
        if padded:
            real = num > 0
            counts = real.sum(1)
            starts = (torch.cumsum(counts, 0) - counts).tolist()
            flat_numbers, structure = num[real], torch.nonzero(real)[:, 0]
        else:  # every row full: flattening is a reshape
            real, (n_structures, width) = None, num.shape
            flat_numbers = num.reshape(-1)
            structure = torch.arange(n_structures, device=num.device).repeat_interleave(width)
            starts = list(range(0, n_structures * width, width))
        species = self.species_indices(flat_numbers)
        present = tuple(i for i, n in enumerate(torch.bincount(species).tolist()) if n)
        layout = _Layout(num, single, species, structure, starts, real, present)
        if key is not None:
            if len(memo) >= 64:  # (distinct arrays in flight: one per batch shape served)
                memo.clear()
            memo[key] = layout
        return layout

    def _energies_and_gradients(
        self, layout: _Layout, positions: torch.Tensor, all_pairs: Pairs, cell64, member_forces: bool
    ):
        """Member energies (k, B) and the gradients of their mean (and, with
        ``member_forces``, of each member) with respect to the real atoms' float64
        positions (atoms, 3) and the strain."""
        dtype, device = self._dtype_device
        n_structures, species, present = layout.n_structures, layout.species, layout.present
        if not member_forces:
            plan = self._step_plan(present)
            if plan is not None:
                return self._compiled_step(plan, layout, positions, all_pairs, cell64)
        # Positions stay float64: displacements are formed before the cast to the model's
        # dtype, so a molecule far from the origin loses no precision in float32 (a
        # float32 position 1e4 Å out keeps only ~1e-3 Å).
        pos = positions.clone().requires_grad_(True)
        inputs = [pos]
        strain = None
        if cell64 is not None:
            strain = torch.zeros(n_structures, 3, 3, dtype=dtype, device=device, requires_grad=True)
            inputs.append(strain)
        k = self.ensemble_size
        members = torch.zeros(k, n_structures, dtype=torch.float64, device=device)
        grads = [torch.zeros_like(x) for x in inputs]
        member_grads = [[torch.zeros_like(x) for x in inputs] for _ in range(k)] if member_forces else []
        # Large systems go in blocks of whole center atoms, each differentiated on its
        # own and accumulated: memory stays bounded and the cost linear in atoms.
        for block in _blocks(all_pairs, layout.structure, species, self.block_pairs):
            vectors = _displacements(pos, block, cell64, strain, dtype)
            part = self.forward(
                block.species,
                block.center,
                block.neighbor,
                vectors,
                block.structure,
                n_structures,
                centers=block.centers,
                present=present,
            )
            members += part.detach()
            for total, g in zip(grads, torch.autograd.grad(part.mean(0).sum(), inputs, retain_graph=member_forces)):
                total += g
            if member_forces:
                for m in range(k):
                    for total, g in zip(
                        member_grads[m], torch.autograd.grad(part[m].sum(), inputs, retain_graph=m + 1 < k)
                    ):
                        total += g
        return members, grads, member_grads

    def _joined(self, pairs: list[Pairs], layout: _Layout) -> Pairs:
        """``concatenate(pairs, layout.starts)``, reused while the same pair lists come
        for the same layout (a neighbour list hands back its own ``Pairs`` until it is
        rebuilt, so between rebuilds a batch's joined list does not change)."""
        last = self.__dict__.get("_last_joined")
        if last is not None and last[1] is layout and len(last[0]) == len(pairs):
            if all(a is b for a, b in zip(last[0], pairs)):
                return last[2]
        joined = concatenate(pairs, layout.starts)
        self.__dict__["_last_joined"] = (list(pairs), layout, joined)
        return joined

    def _self_energy(self, layout: _Layout) -> torch.Tensor:
        """Σ self energies of each structure's atoms, (B,) float64, kept with the layout
        until the self energies change (training refits them in place)."""
        tag = (self.self_energies.data_ptr(), self.self_energies._version)
        if layout.self_energy is None or layout.self_energy[0] != tag:
            total = torch.zeros(layout.n_structures, dtype=torch.float64, device=self.self_energies.device)
            total.index_add_(0, layout.structure, self.self_energies.index_select(0, layout.species))
            layout.self_energy = (tag, total)
        return layout.self_energy[1]

    def _step_plan(self, present: tuple[int, ...]):
        """The compiled step's plan for this element set (``kernels.StepPlan``), or None
        where it does not apply: kernels off or not on a CPU, a featurizer or networks
        that are not ANI's own (plugins run the autograd path), networks not frozen.
        Kept until a parameter's version changes (an in-place change) or ``_apply`` runs."""
        from aniserve import kernels

        lib = kernels.library_for(self.species_of_number)
        if lib is None:
            return None
        # (_apply, which .to() and .float() go through, empties the cache; an in-place
        # change of a parameter, an optimiser step or load_state_dict, bumps its version)
        cache = self.__dict__.setdefault("_step_plans", {})
        params = cache.get("params")
        versions = None if params is None else [p._version for p in params]
        if versions is None or cache["versions"] != versions:
            cache.clear()
            cache["params"] = params = list(self.networks.parameters())
            cache["versions"] = [p._version for p in params]
        if present in cache:
            return cache[present]
        plan = None
        featurizer, terms = self.featurizer, getattr(self.networks, "frozen_terms", lambda: None)()
        constants = getattr(featurizer, "kernel_constants", lambda: None)()
        if terms is not None and constants is not None and constants.fits and hasattr(featurizer, "nonzero_columns"):
            from aniserve.networks import _kernel_networks

            columns = featurizer.nonzero_columns(present)
            layers = [[mlp.frozen_layers(columns) for mlp in terms[e]] for e in present]
            plan = (
                lib,
                kernels.StepPlan(constants, _kernel_networks(self.networks, layers, columns), list(present), columns),
            )
        if len(cache) > 18:  # (params, versions and 16 element sets)
            cache.clear()
            return plan
        cache[present] = plan
        return plan

    def _compiled_step(self, plan, layout: _Layout, positions: torch.Tensor, all_pairs: Pairs, cell64):
        """``_energies_and_gradients`` by the compiled step: no autograd graph."""
        from aniserve import kernels

        lib, step = plan
        n_structures, species = layout.n_structures, layout.species
        members = torch.zeros(step.members, n_structures, dtype=torch.float64)
        grad_pos = torch.zeros(len(species), 3, dtype=torch.float64)
        strain = None if cell64 is None else torch.zeros(n_structures, 3, 3, dtype=torch.float64)
        positions = positions.contiguous()
        for block in _blocks(all_pairs, layout.structure, species, self.block_pairs):
            target = grad_pos if block.atoms is None else torch.zeros(len(block.atoms), 3, dtype=torch.float64)
            shift = None if cell64 is None or block.shift is None else block.shift.to(torch.float64).contiguous()
            arguments = (
                block.species.contiguous(),
                block.center.contiguous(),
                block.neighbor.contiguous(),
                positions,
                None if block.atoms is None else block.atoms.contiguous(),
                shift,
                None if shift is None else cell64,
                block.structure.contiguous(),
                len(species) if block.centers is None else block.centers,
                members,
                target,
                strain,
            )
            self._threads.run(len(block.center), lambda count: kernels.step(lib, step, *arguments, threads=count))
            if block.atoms is not None:
                grad_pos.index_add_(0, block.atoms, target)
        members += self._self_energy(layout)
        return members, [grad_pos] if strain is None else [grad_pos, strain], []


@dataclasses.dataclass
class _Layout:
    """What a call's atomic numbers decide, checked: the (B, N) numbers, whether one
    structure was given, the real atoms in one list (their model species and structure,
    where each structure starts, the mask of real atoms in the (B, N) layout, None when
    no row is padded) and the species present.  A serving loop sends the same
    numbers call after call, so ``ANIPotential`` keeps the layouts of recent arrays."""

    numbers: torch.Tensor
    single: bool
    species: torch.Tensor
    structure: torch.Tensor
    starts: list[int]
    real: torch.Tensor | None
    present: tuple[int, ...]
    #: (the self energies' identity and version, Σ self energies per structure): see
    #: ``ANIPotential._self_energy``.
    self_energy: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def n_structures(self) -> int:
        return self.numbers.shape[0]

    def flat(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) positions → (atoms, 3) of the real atoms."""
        return positions.reshape(-1, 3) if self.real is None else positions[self.real]


def _layout_key(numbers) -> tuple | None:
    """A memo key for an integer numpy array of numbers (the driver's and the
    calculator's); None for anything else, which is laid out afresh every call."""
    if isinstance(numbers, np.ndarray) and numbers.dtype.kind in "iu":
        return numbers.shape, numbers.dtype.str, numbers.tobytes()
    return None


def _check_finite(result: Evaluation, layout: _Layout, positions: torch.Tensor) -> None:
    """Never return a NaN or infinite energy, force or strain derivative: say which
    structure, and the closest atoms when they are the likely reason."""
    # One test: NaN and inf propagate through the sums (Python floats: no warning).
    total = float(np.sum(result.energy)) + float(result.forces.sum()) + float(np.sum(result.energy_std))
    if result.strain_derivative is not None:
        total += float(result.strain_derivative.sum())
    if math.isfinite(total):
        return
    bad = ~(np.isfinite(result.energy) & np.isfinite(result.forces).all((1, 2)) & np.isfinite(result.energy_std))
    if result.strain_derivative is not None:
        bad |= ~np.isfinite(result.strain_derivative).all((1, 2))
    b = int(np.argmax(bad)) if bad.any() else 0
    atoms = positions[b][layout.numbers[b] > 0].cpu().numpy()
    where = "" if layout.single else f" of structure {b}"
    raise ValueError(f"the model gives a non-finite energy or forces{where}{closest_pair(atoms)}; nothing is returned")


#: Atoms closer than this (Å) are named when a result is not finite.
CLOSE_ATOMS = 0.5


def closest_pair(positions: np.ndarray) -> str:
    """' (atoms i and j are d Å apart)' for the closest two atoms if closer than
    CLOSE_ATOMS, else ''.  A row at a time: memory stays linear in the atom count."""
    x = np.asarray(positions, float)
    if len(x) < 2 or len(x) > 20_000:
        return ""
    best = (np.inf, 0, 0)
    for i in range(len(x) - 1):
        d = np.linalg.norm(x[i + 1 :] - x[i], axis=1)
        j = int(np.argmin(d))
        if d[j] < best[0]:
            best = (float(d[j]), i, i + 1 + j)
    distance, i, j = best
    return f" (atoms {i} and {j} are {distance:.3g} Å apart)" if distance < CLOSE_ATOMS else ""


@dataclasses.dataclass
class _Block:
    """A block of center atoms with the neighbours their pairs reach, renumbered so the
    centers come first.  ``atoms`` maps local to global atom indices; a block of every
    atom (``centers`` None, the common case) keeps them as they are (``atoms`` None)."""

    atoms: torch.Tensor | None
    centers: int | None
    species: torch.Tensor
    structure: torch.Tensor
    center: torch.Tensor  # local indices
    neighbor: torch.Tensor
    global_center: torch.Tensor
    global_neighbor: torch.Tensor
    shift: torch.Tensor | None


def _blocks(pairs: Pairs, structure: torch.Tensor, species: torch.Tensor, block_pairs: int):
    """Split the pairs (sorted by center) into blocks of about ``block_pairs`` pairs."""
    n_atoms = len(species)
    if len(pairs) <= block_pairs:
        yield _Block(
            None,
            None,
            species,
            structure,
            pairs.center,
            pairs.neighbor,
            pairs.center,
            pairs.neighbor,
            pairs.shift,
        )
        return
    # First pair of every atom (atoms without pairs get an empty range).
    first = torch.searchsorted(pairs.center, torch.arange(n_atoms + 1, device=species.device))
    atoms_per_block = max(1, int(n_atoms * block_pairs / len(pairs)))
    for a0 in range(0, n_atoms, atoms_per_block):
        a1 = min(n_atoms, a0 + atoms_per_block)
        p0, p1 = int(first[a0]), int(first[a1])
        center, neighbor = pairs.center[p0:p1], pairs.neighbor[p0:p1]
        outside = torch.unique(neighbor[(neighbor < a0) | (neighbor >= a1)])
        atoms = torch.cat([torch.arange(a0, a1, device=species.device), outside])
        local = torch.full((n_atoms,), -1, dtype=torch.long, device=species.device)
        local[atoms] = torch.arange(len(atoms), device=species.device)
        yield _Block(
            atoms,
            a1 - a0,
            species[atoms],
            structure[atoms],
            center - a0,
            local[neighbor],
            center,
            neighbor,
            None if pairs.shift is None else pairs.shift[p0:p1],
        )


def _displacements(
    pos64: torch.Tensor, block: _Block, cell64: torch.Tensor | None, strain: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """r_j − r_i (+ shift·cell), formed in float64 and then cast to ``dtype``, under the
    strain r → r(I+ε) when periodic; (P, 3) Å."""
    # index_select, not pos[neighbor]: its backward is an index_add, several times
    # cheaper than fancy indexing's accumulate.
    vectors = pos64.index_select(0, block.global_neighbor) - pos64.index_select(0, block.global_center)
    if cell64 is None:
        return vectors.to(dtype)
    if len(cell64) == 1:
        if block.shift is not None:
            vectors = vectors + block.shift @ cell64[0]
    else:
        pair_structure = block.structure.index_select(0, block.center)
        if block.shift is not None:
            vectors = vectors + torch.bmm(block.shift[:, None, :], cell64.index_select(0, pair_structure))[:, 0]
    vectors = vectors.to(dtype)
    # Straining positions and cell together moves every displacement
    # r_j − r_i + shift·cell to (r_j − r_i + shift·cell)(I+ε).
    assert strain is not None  # made with the cell
    deform = torch.eye(3, dtype=dtype, device=pos64.device) + strain
    if len(cell64) == 1:
        return vectors @ deform[0]
    return torch.bmm(vectors[:, None, :], deform.index_select(0, pair_structure))[:, 0]


def _forces(gradient: torch.Tensor, real: torch.Tensor | None, shape: torch.Size) -> np.ndarray:
    """−gradient, (atoms, 3) of the real atoms → (B, N, 3) float64, zero on padding
    (real: None when there is none)."""
    values = -gradient.detach().cpu().numpy().astype(np.float64, copy=False)
    if real is None:
        return values.reshape(*shape, 3)
    out = np.zeros((*shape, 3))
    out[real.cpu().numpy()] = values
    return out


def _first(result: Evaluation) -> Evaluation:
    """One structure's results out of a batch of one."""
    first: dict[str, Any] = {name: None if value is None else value[0] for name, value in vars(result).items()}
    return Evaluation(**first)


def _as_tensor(value, dtype, device, name):
    """``value`` as a dense tensor of ``dtype``: numbers of the right kind only (never a
    boolean read as 0/1 or a complex number stripped of its imaginary part); numpy
    views of any stride or byte order are fine."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_meta:
            raise ValueError(
                f"{name} must be a dense tensor holding values, got a {value.layout} "
                f"{'meta ' if value.is_meta else ''}tensor"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be real numbers, got a {value.dtype} tensor")
        return value.detach().to(device=device, dtype=dtype)
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a numeric array: {error}") from None
    if raw.dtype.kind in "bc":
        raise ValueError(f"{name} must be real numbers, got an array of {raw.dtype}")
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a numeric array, got an array of {raw.dtype}")
    # Reversed or strided views and big-endian arrays are valid input: one native copy.
    raw = np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("="))
    return torch.as_tensor(raw, dtype=dtype, device=device)


def _check_numbers(numbers) -> None:
    """Atomic numbers are integers (or floats holding integers), one per atom."""
    if isinstance(numbers, torch.Tensor):
        if numbers.layout != torch.strided or numbers.is_meta or numbers.dtype == torch.bool or numbers.is_complex():
            raise ValueError(
                f"atomic numbers must be a dense tensor of integers, got a {numbers.layout} "
                f"{'meta ' if numbers.is_meta else ''}{numbers.dtype} tensor"
            )
        if numbers.dim() == 0:
            raise ValueError("atomic numbers must be an array, one per atom, not a single number")
        if not numbers.is_floating_point():
            return  # an integer tensor (the driver's and the calculator's path): no copy to the host
        raw = numbers.detach().cpu().numpy()
    else:
        raw = np.asarray(numbers)
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"atomic numbers must be integers, got an array of {raw.dtype}")
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        raise ValueError(f"atomic numbers must be integers, got {raw[raw != np.round(raw)][:5].tolist()}")
    if raw.ndim == 0:
        raise ValueError("atomic numbers must be an array, one per atom, not a single number")


def _checked_numbers(numbers, device) -> tuple[torch.Tensor, bool, bool]:
    """Atomic numbers checked: (B, N) long (one structure gets B = 1), whether one
    structure was given, and whether any row is padded (0 after its real atoms)."""
    _check_numbers(numbers)
    if numbers is not None and len(numbers) == 0:
        raise ValueError("the structure has no atoms")
    num = _as_tensor(numbers, torch.long, device, "numbers")
    single = num.dim() == 1
    if single:
        num = num[None]
    if num.dim() != 2:
        raise ValueError(f"atomic numbers must be (N,) or (B, N), got shape {tuple(num.shape)}")
    padded = bool((num <= 0).any())
    if padded:
        if (num < 0).any():
            raise ValueError(f"atomic numbers must be 1..118 (0 marks padding), got {num[num < 0].unique().tolist()}")
        if single:
            raise ValueError(
                f"atomic number 0 at atom {int(torch.nonzero(num[0] == 0)[0])}: 0 marks padding, "
                f"which only a batch (B, N) may hold"
            )
        if (num[:, 0] == 0).any():
            raise ValueError("every structure needs at least one atom (padding, 0, may only follow real atoms)")
    return num, single, padded


def _checked_positions(positions, shape: torch.Size, single: bool, device) -> torch.Tensor:
    """Positions checked against the numbers' (B, N) ``shape``: (B, N, 3) float64, finite."""
    pos = _as_tensor(positions, torch.float64, device, "positions")
    if single:
        pos = pos[None]
    if pos.dim() != 3 or pos.shape[-1] != 3 or pos.shape[:2] != shape:
        given = (tuple(shape[1:]) if single else tuple(shape), tuple(pos.shape[1:]) if single else tuple(pos.shape))
        raise ValueError(
            f"shape mismatch: numbers {given[0]} and positions {given[1]}; "
            f"expected (N,) and (N, 3), or (B, N) and (B, N, 3)"
        )
    # One reduction in the common case; the sum of finite positions can only overflow
    # for coordinates near 1e308, which the element-wise test below then clears.
    if not math.isfinite(float(pos.sum())) and not torch.isfinite(pos).all():
        bad = torch.nonzero(~torch.isfinite(pos).all(-1))
        where = ", ".join(f"atom {int(a)}" + (f" of structure {int(b)}" if not single else "") for b, a in bad[:5])
        raise ValueError(f"positions contain NaN or infinite values ({where})")
    return pos


def _checked_cell(cell, structures: int, device) -> torch.Tensor | None:
    """None, or the cell as (B, 3, 3) float64 (a (3, 3) cell is every structure's)."""
    if cell is None:
        return None
    c = _as_tensor(cell, torch.float64, device, "cell")
    if c.shape == (3, 3):
        c = c.expand(structures, 3, 3)
    if c.shape != (structures, 3, 3):
        raise ValueError(f"cell must be (3, 3) or (B, 3, 3), got {tuple(c.shape)}")
    return c.contiguous()
