"""The plugin manager and the registries it fills: built on demand, never at import."""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings

import pluggy

from aniserve import hookspecs
from aniserve.contracts import CONTRACTS, missing_members
from aniserve.hookspecs import hookimpl  # noqa: E402,F401  (the marker, re-exported)

#: aniserve's own components, each registered by the module that defines it, through
#: the same hooks as any plugin.  Imported when the registry is first built, not before.
DEFAULT_PLUGINS = (
    "aniserve.aev",
    "aniserve.networks",
    "aniserve.training.strategies",
    "aniserve.zoo",
    "aniserve.embedded",
    "aniserve.selection",
)

#: Registry kinds, as ``aniserve plugins`` names them, and the hook that fills each.
KINDS = {
    "featurizer": "aniserve_featurizers",
    "element-network": "aniserve_element_networks",
    "transfer-strategy": "aniserve_transfer_strategies",
    "model-source": "aniserve_model_sources",
    "selection-strategy": "aniserve_selection_strategies",
}


class RegistryError(LookupError):
    pass


@dataclasses.dataclass(frozen=True)
class Component:
    kind: str
    name: str
    obj: object
    plugin: str
    version: str

    @property
    def description(self) -> str:
        text = getattr(self.obj, "description", None) or (self.obj.__doc__ or "")
        return text.strip().splitlines()[0] if text.strip() else ""


class Registry:
    """Components by kind and name, gathered from every registered plugin."""

    def __init__(self, extra_plugins: tuple[str, ...] = (), entry_points: bool = True):
        self.manager = pluggy.PluginManager("aniserve")
        self.manager.add_hookspecs(hookspecs)
        for name in DEFAULT_PLUGINS + tuple(extra_plugins):
            self.manager.register(importlib.import_module(name), name=name)
        if entry_points:
            # ANISERVE_BLOCK_PLUGINS=name,name masks installed plugins by entry-point name,
            # e.g. to check that a model does not silently depend on one.
            for blocked in filter(None, os.environ.get("ANISERVE_BLOCK_PLUGINS", "").split(",")):
                self.manager.set_blocked(blocked.strip())
            # An installed plugin that cannot be imported (a half-removed package, a missing
            # dependency of its own) costs only its components, with a warning that says why.
            from importlib import metadata

            for entry in metadata.entry_points(group="aniserve"):
                if self.manager.is_blocked(entry.name):
                    continue
                try:
                    entry.load()
                except Exception as error:  # noqa: BLE001 - any import failure of foreign code
                    warnings.warn(
                        f"aniserve plugin {entry.name!r} ({entry.value}) could not be loaded and is "
                        f"skipped: {type(error).__name__}: {error}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    self.manager.set_blocked(entry.name)
            self.manager.load_setuptools_entrypoints("aniserve")
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        distributions = {
            id(plugin): f"{dist.project_name}" if hasattr(dist, "project_name") else dist.metadata["name"]
            for plugin, dist in self.manager.list_plugin_distinfo()
        }
        versions = {id(plugin): dist.version for plugin, dist in self.manager.list_plugin_distinfo()}
        for kind, hook_name in KINDS.items():
            hook = getattr(self.manager.hook, hook_name)
            for impl in hook.get_hookimpls():
                plugin_name = distributions.get(id(impl.plugin), impl.plugin_name)
                if impl.plugin_name in DEFAULT_PLUGINS:
                    plugin_name = "aniserve"
                version = versions.get(id(impl.plugin)) or _version_of(plugin_name)
                for name, obj in (impl.function() or {}).items():
                    existing = self.components[kind].get(name)
                    if existing is not None:
                        raise RegistryError(
                            f"{kind} {name!r} is registered twice: by {existing.plugin} "
                            f"({existing.obj!r}) and by {plugin_name} ({obj!r})"
                        )
                    self.components[kind][name] = Component(kind, name, obj, plugin_name, version)
        # Contracts after names: a clash of two plugins is the more useful message.
        for kind, components in self.components.items():
            for c in components.values():
                missing = missing_members(kind, c.obj)
                if missing:
                    raise RegistryError(
                        f"{kind} {c.name!r} from {c.plugin} does not meet the contract "
                        f"aniserve.contracts.{CONTRACTS[kind][0].__name__}: it lacks "
                        f"{', '.join(missing)}"
                    )

    def get(self, kind: str, name: str):
        try:
            return self.components[kind][name].obj
        except KeyError:
            known = ", ".join(sorted(self.components[kind])) or "none"
            raise RegistryError(
                f"no {kind} named {name!r} is registered (known: {known}); if it comes from a "
                f"plugin, install that plugin or pass --plugin MODULE"
            ) from None

    def provider(self, kind: str, name: str) -> dict:
        """{"plugin": distribution, "version": ...} of a registered component."""
        component = self.components[kind].get(name)
        return {"plugin": component.plugin, "version": component.version} if component else {}

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def listing(self) -> list[dict]:
        return [
            {"kind": c.kind, "name": c.name, "plugin": c.plugin, "version": c.version, "description": c.description}
            for kind in KINDS
            for c in sorted(self.components[kind].values(), key=lambda c: c.name)
        ]


def _version_of(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


_default: Registry | None = None
_extra: list[str] = []


def add_plugins(modules) -> None:
    """Register development plugins by module path (the CLI's --plugin), imported from
    the current directory as ``python -m`` would, or from installed packages; a module
    that cannot be imported is a RegistryError naming it and why."""
    global _default
    import sys

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise RegistryError(
                f"plugin module {name!r} cannot be imported from {os.getcwd()} or the installed packages: {error}"
            ) from None
    _extra.extend(m for m in modules if m not in _extra)
    _default = None


def registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        _default = Registry(tuple(_extra))
    return _default
