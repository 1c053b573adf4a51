"""aniserve's built-in components, registered through the public hooks like any plugin."""

from aniserve.registry import hookimpl


@hookimpl
def aniserve_featurizers():
    from aniserve.aev import AEVFeaturizer

    return {"ani-aev": AEVFeaturizer}


@hookimpl
def aniserve_element_networks():
    from aniserve.networks import ElementNetworks

    return {"ani-mlp": ElementNetworks}


@hookimpl
def aniserve_model_sources():
    from aniserve.zoo import OfficialZoo

    return {"official-zoo": OfficialZoo()}
