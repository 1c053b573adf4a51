"""aniserve's built-in components, registered through the public hooks like any plugin."""

from aniserve.registry import hookimpl


@hookimpl
def aniserve_featurizers():
    from aniserve.aev import AEVFeaturizer

    return {"ani-aev": AEVFeaturizer}


@hookimpl
def aniserve_element_networks():
    from aniserve.networks import DeltaNetworks, ElementNetworks

    return {"ani-mlp": ElementNetworks, "delta": DeltaNetworks}


@hookimpl
def aniserve_transfer_strategies():
    from aniserve.training import strategies

    return {"full": strategies.FullFineTune, "freeze": strategies.FreezeLayers,
            "scratch": strategies.Scratch, "delta": strategies.Delta}


@hookimpl
def aniserve_model_sources():
    from aniserve.embedded import EmbeddedModels
    from aniserve.zoo import OfficialZoo

    return {"official-zoo": OfficialZoo(), "embedded": EmbeddedModels()}
