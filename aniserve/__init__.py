"""aniserve: ANI neural-network potentials for i-PI, ASE and training.

Public API: ``load_model`` → ``ANIPotential`` (whose ``evaluate`` returns an
``Evaluation``), ``ANICalculator``, ``hookimpl`` for plugins (their contracts:
``aniserve.contracts``).  All but ``hookimpl`` are imported when first used, so that
``import aniserve.driver`` (the transport) or ``aniserve.protocol`` loads neither torch
nor ASE.
"""

__version__ = "0.1.0"

from aniserve.hookspecs import hookimpl  # noqa: E402

_LAZY = {
    "load_model": "aniserve.models",
    "ANIPotential": "aniserve.potential",
    "Evaluation": "aniserve.potential",
    "ANICalculator": "aniserve.calculator",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'aniserve' has no attribute {name!r}")


__all__ = ["load_model", "ANIPotential", "Evaluation", "ANICalculator", "hookimpl", "__version__"]
