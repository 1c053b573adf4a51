"""Registers the components with aniserve (entry point ``resmlp`` in group ``aniserve``)."""

from aniserve import hookimpl


@hookimpl
def aniserve_element_networks():
    from aniserve_resmlp.networks import ResidualElementNetworks

    return {"residual-mlp": ResidualElementNetworks}


@hookimpl
def aniserve_transfer_strategies():
    from aniserve_resmlp.l2sp import L2SP

    return {"l2sp": L2SP}
