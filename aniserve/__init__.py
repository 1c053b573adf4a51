"""aniserve: ANI neural-network potentials for i-PI, ASE and training.

Public API: ``load_model`` → ``ANIPotential`` (whose ``evaluate`` returns an
``Evaluation``), ``ANICalculator`` (imported lazily: ASE is only loaded when the
calculator is asked for), ``hookimpl`` for plugins (their contracts:
``aniserve.contracts``).
"""

__version__ = "0.1.0"

from aniserve.hookspecs import hookimpl  # noqa: E402
from aniserve.models import load_model  # noqa: E402
from aniserve.potential import ANIPotential, Evaluation  # noqa: E402


def __getattr__(name):
    if name == "ANICalculator":
        from aniserve.calculator import ANICalculator

        return ANICalculator
    raise AttributeError(f"module 'aniserve' has no attribute {name!r}")


__all__ = ["load_model", "ANIPotential", "Evaluation", "ANICalculator", "hookimpl", "__version__"]
