"""Residual layer-norm element networks and the L2-SP transfer strategy, for aniserve."""

from aniserve_resmlp.l2sp import L2SP
from aniserve_resmlp.networks import ResidualElementNetworks

__all__ = ["L2SP", "ResidualElementNetworks"]
