"""The contracts, as typed protocols: what a featurizer, element network, transfer
strategy, selection strategy or model source must offer (plugin components), and what
a transport needs of the model it serves (``Servable``, with its data types).  The hook
specifications (``aniserve.hookspecs``) return components by name; the registry checks
each component against its contract when it is registered, so a plugin missing a method
fails at start-up with the method named.
Units: Å and Hartree, as everywhere inside aniserve.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # (annotations only: the transport side imports this module without torch)
    import torch


class Featurizer(Protocol):
    """An ``nn.Module`` class turning neighbour pairs into per-atom features."""

    output_width: int
    cutoff: float  # Å

    @classmethod
    def from_config(cls, params: dict, elements: list[str]) -> Featurizer: ...

    def config(self) -> dict: ...  # JSON-serialisable; from_config(config()) rebuilds it

    def forward(
        self, species: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        """species (N,), center/neighbor (P,) pair indices, vectors (P, 3) Å → (N, output_width).
        May also offer ``nonzero_columns(present) -> LongTensor | None`` (see hookspecs)."""


class ElementNetwork(Protocol):
    """An ``nn.Module`` class: per-element networks, k ensemble members.  Networks that
    take a fixed feature width say so as ``input_width`` (``ANIPotential`` then refuses a
    featurizer of another width)."""

    elements: list[str]
    ensemble_size: int

    @classmethod
    def from_config(cls, params: dict) -> ElementNetwork: ...

    def config(self) -> dict: ...

    def forward(
        self, species: torch.Tensor, features: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """species (N,), features (N, D) → atomic energies (k, N), Hartree."""


class TransferStrategy(Protocol):
    """A class, instantiated once per training run."""

    description: str

    def prepare(self, model: Any, options: dict) -> Any:
        """The model to train, with requires_grad set on exactly what trains.  May also
        offer ``penalty(model) -> scalar tensor`` added to the loss."""


class SelectionStrategy(Protocol):
    """A class, instantiated without arguments, choosing which candidates to label."""

    description: str

    def select(self, candidates: Any, k: int, rng: Any, **options) -> Any:
        """At most ``k`` indices into the candidates (``aniserve.selection.Candidates``)."""


@runtime_checkable
class ModelSource(Protocol):
    """An object resolving model names to loadable paths."""

    description: str

    def names(self) -> list[str]: ...

    def locate(self, name: str) -> tuple[str | os.PathLike | None, list[str]]:
        """(a NeuroChem .info/folder or aniserve model file, or None; the places looked)."""


@dataclasses.dataclass
class Structure:
    """One structure slot.  cell: (3, 3) Å, rows are lattice vectors, or None (molecule)."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray | None = None


@dataclasses.dataclass
class Result:
    """energy, energy_std: Hartree; forces (N, 3): Hartree/Å; virial (3, 3): Hartree,
    −dE/dε symmetrised (zero without a cell).  member_*: per ensemble member, when the
    evaluator was asked for them."""

    energy: float
    forces: np.ndarray
    virial: np.ndarray
    energy_std: float
    member_energies: np.ndarray
    member_forces: np.ndarray | None = None
    member_virials: np.ndarray | None = None


class Servable(Protocol):
    """What a transport (``aniserve.driver.IPIDriver``, the ASE calculator) needs of the
    model it serves; ``aniserve.serving.Evaluator`` is the one aniserve provides.  Units
    are Å in, Hartree and Hartree/Å out."""

    #: Whether results carry per-member forces and virials (i-PI's committee extras).
    members: bool

    def check_elements(self, numbers) -> None:
        """ValueError naming any atomic number the model cannot evaluate."""

    def evaluate(self, slots: Sequence[tuple[Hashable, Structure]]) -> list[Result]:
        """One result per (key, structure) slot, in order; the key names the slot (a bead,
        an ASE run) so that state such as its neighbour list is kept between calls."""

    def forget(self, key: Hashable) -> None:
        """Drop what is kept for a slot whose connection has gone."""


#: Contract and the members a component must have, by registry kind.
CONTRACTS: dict[str, tuple[type, tuple[str, ...]]] = {
    "featurizer": (Featurizer, ("from_config", "config", "forward")),
    "element-network": (ElementNetwork, ("from_config", "config", "forward")),
    "transfer-strategy": (TransferStrategy, ("prepare",)),
    "model-source": (ModelSource, ("names", "locate")),
    "selection-strategy": (SelectionStrategy, ("select",)),
}


def missing_members(kind: str, component: Any) -> list[str]:
    """The members of ``kind``'s contract that ``component`` lacks (empty when it fits)."""
    _, members = CONTRACTS[kind]
    return [m for m in members if not callable(getattr(component, m, None))]
