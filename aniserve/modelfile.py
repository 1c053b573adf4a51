"""aniserve's own model file: safetensors weights plus a JSON description.

The description (stored as safetensors metadata under the key ``aniserve``) names each
component as registered in the plugin registry, with its parameters, so a model built
from a plugin's featurizer reloads wherever that plugin is installed.  Loading never
unpickles anything.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch

from aniserve import __version__
from aniserve.potential import ANIPotential
from aniserve.registry import RegistryError, registry

FORMAT = "aniserve-model/1"


class ModelFileError(ValueError):
    pass


def describe(model: ANIPotential, name: str = "", extra: dict | None = None) -> dict:
    reg = registry()
    featurizer = model.description["featurizer"]["name"]
    network = model.description["element_network"]["name"]
    return {
        "format": FORMAT, "aniserve_version": __version__, "name": name or model.description.get("name", ""),
        "elements": model.elements,
        # The providing plugin is recorded so that a missing one can be named on load.
        "featurizer": {"name": featurizer, "params": model.featurizer.config(),
                       **reg.provider("featurizer", featurizer)},
        "element_network": {"name": network, "params": model.networks.config(),
                            **reg.provider("element-network", network)},
        "self_energies": dict(zip(model.elements, model.self_energies.tolist())),
        "ensemble_size": model.ensemble_size,
        **(extra or {}),
    }


def save_model(model: ANIPotential, path: str | os.PathLike, name: str = "", extra: dict | None = None) -> None:
    """Write ``model`` to ``path`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    description = describe(model, name, extra)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"aniserve": json.dumps(description)})
    # safetensors creates files readable by their owner only; a model is an output like
    # any other, so it gets the permissions the user's umask gives new files.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def read_description(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path}: not a readable safetensors file ({error})") from None
    if "aniserve" not in metadata:
        raise ModelFileError(f"{path}: safetensors file without an aniserve model description")
    description = json.loads(metadata["aniserve"])
    if description.get("format") != FORMAT:
        raise ModelFileError(f"{path}: unsupported model format {description.get('format')!r} (expected {FORMAT})")
    return description


def build(description: dict) -> ANIPotential:
    """An untrained model from a description (components resolved through the registry)."""
    reg = registry()
    try:
        featurizer_cls = reg.get("featurizer", description["featurizer"]["name"])
        network_cls = reg.get("element-network", description["element_network"]["name"])
    except RegistryError as error:
        needed = [f"{part['name']!r} from the plugin {part['plugin']} {part.get('version', '')}".strip()
                  for part in (description["featurizer"], description["element_network"])
                  if part.get("plugin") and part["plugin"] != "aniserve"]
        hint = f" It was saved with {' and '.join(needed)}; install that plugin." if needed else ""
        raise ModelFileError(f"model {description.get('name', '')!r} needs a component that is not installed: "
                             f"{error}.{hint}") from None
    featurizer = featurizer_cls.from_config(description["featurizer"]["params"], description["elements"])
    networks = network_cls.from_config(description["element_network"]["params"])
    return ANIPotential(featurizer, networks, description["self_energies"],
                        {"name": description.get("name", ""), "featurizer": description["featurizer"],
                         "element_network": description["element_network"]})


def load_saved(path: str | os.PathLike) -> ANIPotential:
    from safetensors.torch import load_file

    description = read_description(path)
    model = build(description)
    try:
        state = load_file(str(path))
        # Build in the stored precision: copying float64 weights into the default
        # float32 parameters would round them.
        stored = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(stored) == 1:
            model = model.to(stored.pop())
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as error:
        raise ModelFileError(f"{path}: weights do not match the description ({error})") from None
    model.description["source"] = str(path)
    return model
