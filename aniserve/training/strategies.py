"""Built-in transfer-learning strategies.

A strategy turns a pretrained model into the model to train on new (higher-level) data
and marks what trains by ``requires_grad``; the trainer optimises exactly those
parameters.  In every strategy the trainer first refits the self atomic energies on the
new data, as ANI-1ccx did (its ``sae_linfit.dat`` differs from ANI-1x's).
"""

from __future__ import annotations

from torch import nn

from aniserve.hookspecs import hookimpl
from aniserve.networks import DeltaNetworks, ElementNetworks
from aniserve.potential import ANIPotential

#: ANI-1ccx kept linear layers 1 and 3 of ANI-1x byte-identical and retrained 2 and 4
#: (see the released weights); layers are numbered from 1 at the input.
PAPER_FROZEN_LAYERS = (1, 3)


def _all_trainable(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


class FullFineTune:
    """Fine-tune every parameter of the pretrained model."""

    description = "fine-tune all parameters of the pretrained model"

    def prepare(self, model: ANIPotential, options: dict) -> ANIPotential:
        _all_trainable(model, True)
        return model


class FreezeLayers:
    """Retrain with chosen layers frozen; the default freezes layers 1 and 3, as ANI-1ccx."""

    description = "retrain with layers frozen (default 1 and 3, the ANI-1ccx recipe)"

    def prepare(self, model: ANIPotential, options: dict) -> ANIPotential:
        layers_of = getattr(model.networks, "layers", None)
        if layers_of is None:
            raise ValueError(
                f"element network {type(model.networks).__name__} does not number its layers "
                f"(no layers() method), so the freeze strategy cannot select them"
            )
        layers = layers_of()
        frozen = tuple(options.get("freeze_layers") or PAPER_FROZEN_LAYERS)
        bad = [n for n in frozen if not 1 <= n <= len(layers)]
        if bad:
            raise ValueError(f"freeze_layers {bad} out of range: the network has layers 1..{len(layers)}")
        _all_trainable(model, True)
        for number in frozen:
            for p in layers[number - 1]:
                p.requires_grad_(False)
        return model


class Scratch:
    """Same architecture, fresh random weights, trained on the new data only (ANI-1ccx-R)."""

    description = "same architecture, random weights, new data only (the ANI-1ccx-R baseline)"

    def prepare(self, model: ANIPotential, options: dict) -> ANIPotential:
        from aniserve.modelfile import build, describe

        fresh = build(describe(model)).to(dtype=model.dtype, device=model.device)
        _all_trainable(fresh, True)
        return fresh


class Delta:
    """Keep the pretrained model frozen; learn a small correction toward the new level."""

    description = "frozen pretrained model plus a trained correction network (Δ-learning)"

    def prepare(self, model: ANIPotential, options: dict) -> ANIPotential:
        if options.get("continue"):
            return self._continue(model)
        hidden = list(options.get("correction_hidden") or (32, 16))
        correction = ElementNetworks(
            model.elements, {e: hidden for e in model.elements}, model.featurizer.output_width, model.ensemble_size
        )
        # Start as the pretrained model exactly: the correction's output layer is zero.
        for mlp in correction.mlps:
            nn.init.zeros_(mlp.weights[-1])
            nn.init.zeros_(mlp.biases[-1])
        networks = DeltaNetworks(model.networks, correction, model.description["element_network"]["name"], "ani-mlp")
        description = dict(model.description, element_network={"name": "delta"})
        delta = ANIPotential(
            model.featurizer, networks, dict(zip(model.elements, model.self_energies.tolist())), description
        ).to(dtype=model.dtype, device=model.device)
        _all_trainable(delta, False)
        _all_trainable(delta.networks.correction, True)
        return delta

    @staticmethod
    def _continue(model: ANIPotential) -> ANIPotential:
        """Option ``continue``: a model that ``delta`` made trains its correction on from
        where it stands (a second stage or round; without it a new correction, at zero,
        would be stacked on the whole model)."""
        if not isinstance(model.networks, DeltaNetworks):
            raise ValueError(
                f"delta option 'continue' needs a model that delta made; this one's element network is "
                f"{model.description['element_network'].get('name')!r}"
            )
        _all_trainable(model, False)
        _all_trainable(model.networks.correction, True)
        return model


@hookimpl
def aniserve_transfer_strategies():
    return {"full": FullFineTune, "freeze": FreezeLayers, "scratch": Scratch, "delta": Delta}
