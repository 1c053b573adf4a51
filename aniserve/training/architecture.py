"""The model a training run starts from: a new one from a description (the default
architecture: ANI-1x features, small CELU networks), or a pretrained one prepared by a
transfer strategy."""

from __future__ import annotations

import torch

from aniserve.modelfile import build
from aniserve.potential import ANIPotential


def default_description(
    elements=("H", "C", "N", "O"), hidden=(64, 48, 24), ensemble_size: int = 4, name: str = ""
) -> dict:
    """ANI-1x features with small CELU networks: the demonstration-scale architecture
    (ANI-1x itself uses 160-128-96 for H; pass ``hidden`` per element via --config)."""
    from aniserve.aev import AEVFeaturizer, AEVParameters, ani1x_aev

    width = AEVFeaturizer(AEVParameters.from_json(ani1x_aev(elements))).output_width
    return {
        "name": name,
        "elements": list(elements),
        "featurizer": {"name": "ani-aev", "params": ani1x_aev(elements)},
        "element_network": {
            "name": "ani-mlp",
            "params": {
                "elements": list(elements),
                "hidden": {e: list(hidden) for e in elements},
                "input_width": width,
                "ensemble_size": ensemble_size,
                "celu_alpha": 0.1,
            },
        },
        "self_energies": {e: 0.0 for e in elements},
    }


def new_model(description: dict, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ANIPotential:
    """An untrained model, its random weights fixed by ``seed``."""
    description = dict(description)
    description.setdefault("self_energies", {e: 0.0 for e in description["elements"]})
    torch.manual_seed(seed)
    return build(description).to(dtype=dtype, device=device).train()


def transfer_model(pretrained: ANIPotential, strategy: str, options: dict, seed: int):
    """(model, penalty): the pretrained model as ``strategy`` (a registered name)
    prepares it for training, and the strategy's extra loss term (or None)."""
    from aniserve.registry import registry

    torch.manual_seed(seed)
    chosen = registry().get("transfer-strategy", strategy)()
    prepared = chosen.prepare(pretrained, options)
    return prepared.train(), getattr(chosen, "penalty", None)


def continue_transfer(model: ANIPotential, strategy: str, seed: int):
    """(model, penalty) for one more round of a transfer (active learning's rounds warm-
    start): a model that ``delta`` already made (a previous round's) trains its
    correction on from where it stands, its base frozen; any other is prepared by
    ``strategy`` as ``transfer_model`` does (for ``delta``, a new correction at zero)."""
    from aniserve.networks import DeltaNetworks

    options = {"continue": True} if strategy == "delta" and isinstance(model.networks, DeltaNetworks) else {}
    return transfer_model(model, strategy, options, seed)


def description_for(data, config: dict | None = None, ensemble_size: int | None = None, name: str = "") -> dict:
    """The description ``aniserve train`` builds a model from: ``config`` (a description,
    e.g. from --config) with its ensemble size overridden when given, or the default
    architecture for the elements ``data`` (an ANIData) holds."""
    from aniserve.elements import NUMBERS

    if config is not None:
        description = dict(config)
        if ensemble_size:
            description["element_network"]["params"]["ensemble_size"] = ensemble_size
    else:
        elements = sorted(data.element_counts(), key=lambda e: NUMBERS[e])
        description = default_description(elements, ensemble_size=ensemble_size or 4)
    if name and not description.get("name"):
        description["name"] = name
    return description
