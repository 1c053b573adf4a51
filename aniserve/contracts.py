"""The plugin contracts, as typed protocols: what a featurizer, element network, transfer
strategy or model source must offer.  The hook specifications (``aniserve.hookspecs``)
return these by name; the registry checks each component against its contract when it
is registered, so a plugin missing a method fails at start-up with the method named.
Units: Å and Hartree, as everywhere inside aniserve.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

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
