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
