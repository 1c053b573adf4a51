"""Hook specifications: how components are registered with aniserve, by name.

A plugin is a module (or object) with functions marked ``@aniserve.hookimpl`` and named
like the specs below; install it with an entry point in the ``aniserve`` group::

    [project.entry-points.aniserve]
    myplugin = "my_package.plugin"

or pass ``--plugin my_package.plugin`` on the command line while developing.
aniserve's own components register through these same hooks, each from the module
that defines it (``aniserve.registry.DEFAULT_PLUGINS``).
Each hook is called once, when the plugin manager is first built, and returns a
mapping from component name to the component.  What each component must offer is
written as a typed protocol in ``aniserve.contracts`` (``Featurizer``,
``ElementNetwork``, ``TransferStrategy``, ``ModelSource``); the registry checks it.
"""

import pluggy

hookspec = pluggy.HookspecMarker("aniserve")
#: Marks a plugin's hook implementations (also exported as ``aniserve.hookimpl``).
hookimpl = pluggy.HookimplMarker("aniserve")


@hookspec
def aniserve_featurizers() -> dict:
    """Featurizers: name → class.  Contract: ``aniserve.contracts.Featurizer``.

    The class is an ``nn.Module`` with ``from_config(params: dict, elements: list[str])``,
    ``config() -> dict`` (JSON-serialisable), an ``output_width`` int, a ``cutoff`` float
    (Å) and ``forward(species (N,), center (P,), neighbor (P,), vectors (P, 3) Å)``
    returning per-atom features (N, output_width).  It may offer
    ``nonzero_columns(present: tuple[int, ...]) -> LongTensor | None``: the feature
    columns that can be nonzero when only those species indices occur (None: all), the
    same tensor object for the same combination; the potential then passes networks
    only those columns.
    """


@hookspec
def aniserve_element_networks() -> dict:
    """Element networks: name → class.  Contract: ``aniserve.contracts.ElementNetwork``.

    The class is an ``nn.Module`` with ``from_config(params: dict)``, ``config() -> dict``,
    ``elements`` (list of symbols), ``ensemble_size`` and
    ``forward(species (N,), features (N, D), columns=None)`` returning atomic energies
    (k, N), Hartree; with ``columns`` (a LongTensor) the features hold only those input
    columns, all others being zero.
    """


@hookspec
def aniserve_transfer_strategies() -> dict:
    """Transfer-learning strategies: name → class.  Contract: ``aniserve.contracts.TransferStrategy``.

    The class has ``description`` (one line) and
    ``prepare(model, options: dict) -> model``: it returns the model to train on the
    new data, with ``requires_grad`` set on exactly the parameters that train.  It may
    also have ``penalty(model) -> scalar tensor``, added to the loss at every step
    (called with the model being trained, which after ``--resume`` is a reloaded copy:
    look parameters up by name).  The trainer instantiates the class once per run.
    """


@hookspec
def aniserve_model_sources() -> dict:
    """Model sources: name → object resolving model names.  Contract: ``aniserve.contracts.ModelSource``.

    The object has ``description``, ``names() -> list[str]`` (what it offers) and
    ``locate(name) -> (path | None, list[str])``: a path aniserve can load (NeuroChem
    ``.info``/folder or aniserve model file) or None, plus the places it looked, which
    end up in the error message when no source has the model.
    """


@hookspec
def aniserve_selection_strategies() -> dict:
    """Active-learning selection strategies: name → class.  Contract:
    ``aniserve.contracts.SelectionStrategy``.

    The class (instantiated without arguments) has ``description`` and
    ``select(candidates, k, rng, **options) -> indices``: which of the candidates
    (``aniserve.selection.Candidates``: force deviation, group, optional descriptors and
    per-atom energy spread) to label, at most ``k`` of them, reproducibly for a given
    ``numpy.random.Generator``.
    """
