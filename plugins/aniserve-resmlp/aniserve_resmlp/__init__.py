"""Residual layer-norm element networks and the L2-SP transfer strategy, for aniserve."""

from aniserve_resmlp.networks import ResidualElementNetworks
from aniserve_resmlp.l2sp import L2SP

__all__ = ["L2SP", "ResidualElementNetworks"]
