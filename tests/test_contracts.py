"""Plugin contracts: the built-ins meet them, a component that does not is refused at
registration with the missing member named, and aniserve's pytest plugin is active."""

import pytest

from aniserve import hookimpl
from aniserve.contracts import CONTRACTS, missing_members
from aniserve.embedded import DEFAULT_MODEL
from aniserve.registry import Registry, RegistryError


def test_every_registered_component_meets_its_contract():
    registry = Registry()
    for kind in CONTRACTS:
        for name in registry.names(kind):
            assert missing_members(kind, registry.get(kind, name)) == [], (kind, name)


class NoForward:
    @classmethod
    def from_config(cls, params, elements):
        return cls()

    def config(self):
        return {}


@hookimpl
def aniserve_featurizers():
    return {"broken": NoForward}


def test_a_component_missing_a_member_is_refused_naming_it():
    with pytest.raises(
        RegistryError,
        match=r"featurizer 'broken' .*contract aniserve.contracts.Featurizer: "
        r"it lacks forward",
    ):
        Registry(extra_plugins=(__name__,), entry_points=False)


def test_pytest_plugin_offers_the_embedded_model(aniserve_model):
    assert aniserve_model.description["name"] == DEFAULT_MODEL


def test_the_transport_loads_neither_torch_nor_the_potential():
    """The driver is transport only: importing it (and the protocol) pulls in no torch,
    so its start-up and its tests of the wire need none."""
    import subprocess
    import sys

    code = (
        "import sys, aniserve.driver, aniserve.protocol; "
        "print(sorted(m for m in ('torch', 'aniserve.potential', 'ase') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_evaluator_is_servable():
    import inspect

    from aniserve.contracts import Servable
    from aniserve.serving import Evaluator

    for name in ("check_elements", "evaluate", "forget"):
        assert (
            inspect.signature(getattr(Evaluator, name)).parameters.keys()
            == inspect.signature(getattr(Servable, name)).parameters.keys()
        )
    assert "members" in Servable.__annotations__
