"""Compiled CPU kernels, built on first use with the machine's C++ compiler.

On a small molecule the tensor versions of the AEVs and the networks cost a few hundred
small operations, each with its fixed cost, and on a large system the AEVs' (triplets ×
32) intermediate arrays.  Here, in C++: ``aev.cpp`` (the AEVs and their gradient, one
pass per center), ``mlp.cpp`` (frozen element ensembles' energies and input gradients,
every element in one call) and ``neighbors.cpp`` (the cell-list pair search);
``step.cpp`` chains the first two into one serving step (energies, forces, strain
derivative) with no Python between them.  The library is compiled once per source,
compiler and CPU into ``$ANISERVE_CACHE/kernels`` (default
``~/.cache/aniserve/kernels``) with ``$CXX`` (default ``c++``), and called through
ctypes: no build step at install time and no dependency beyond a compiler.  Without
one, or with ``ANISERVE_KERNELS=off``, everything runs on the tensor versions, which
give the same results (tested) and remain the ones used for training (second
derivatives) and on GPUs.

The package is four modules: ``backends`` (the switch: ``use``, ``using``,
``library_for``), ``build`` (compiling and loading), ``wrappers`` (the calls) and
``threads`` (how many threads a step of a given size gets, chosen by timing).
"""

from aniserve.kernels.backends import BACKENDS, backend, enabled, library, library_for, use, using
from aniserve.kernels.build import cache_dir
from aniserve.kernels.threads import Threads
from aniserve.kernels.wrappers import (
    MAX_ANGULAR_SHIFTS,
    MAX_RADIAL_SHIFTS,
    AEVKernelConstants,
    MLPKernelLayers,
    MLPKernelNetworks,
    StepPlan,
    aev_backward,
    aev_forward,
    cell_list,
    mlp,
    mlp_backward,
    pack_panels,
    periodic_pairs,
    step,
)

__all__ = [
    "BACKENDS",
    "MAX_ANGULAR_SHIFTS",
    "MAX_RADIAL_SHIFTS",
    "AEVKernelConstants",
    "MLPKernelLayers",
    "MLPKernelNetworks",
    "aev_backward",
    "aev_forward",
    "backend",
    "cache_dir",
    "cell_list",
    "enabled",
    "library",
    "library_for",
    "mlp",
    "mlp_backward",
    "pack_panels",
    "periodic_pairs",
    "step",
    "StepPlan",
    "Threads",
    "use",
    "using",
]
