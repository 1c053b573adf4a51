"""aniserve: ANI neural-network potentials for i-PI, ASE and training."""

__version__ = "0.1.0"
