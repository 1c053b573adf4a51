"""aniserve's own model file: safetensors weights plus a JSON description.

The description (stored as safetensors metadata under the key ``aniserve``) names each
component as registered in the plugin registry, with its parameters, so a model built
from a plugin's featurizer reloads wherever that plugin is installed.  Loading never
unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import NoReturn

import torch

from aniserve import __version__
from aniserve.elements import NUMBERS
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
        "format": FORMAT,
        "aniserve_version": __version__,
        "name": name or model.description.get("name", ""),
        "elements": model.elements,
        # The providing plugin is recorded so that a missing one can be named on load.
        "featurizer": {
            "name": featurizer,
            "params": model.featurizer.config(),
            **reg.provider("featurizer", featurizer),
        },
        "element_network": {
            "name": network,
            "params": model.networks.config(),
            **reg.provider("element-network", network),
        },
        "self_energies": dict(zip(model.elements, model.self_energies.tolist())),
        "ensemble_size": model.ensemble_size,
        **({"uncertainty": model.uncertainty} if model.uncertainty else {}),
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
    text = metadata["aniserve"]
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise ModelFileError(
            f"{path}: the model description is {len(text)} characters long, more than {MAX_DESCRIPTION_CHARS}"
        )
    depth = json_depth(text)
    if depth > MAX_DESCRIPTION_DEPTH:
        raise ModelFileError(f"{path}: the model description nests {depth} deep, more than {MAX_DESCRIPTION_DEPTH}")
    try:
        description = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path}: the model description is not JSON ({error})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise ModelFileError(f"{path}: unsupported model format {found!r} (expected {FORMAT})")
    check_description(description, path)
    return description


#: Bounds on a description read from a file (untrusted until checked).  The embedded
#: model's is 2 KB and 7 deep; a delta chain adds 4 levels per link.
MAX_ENSEMBLE = 1024
MAX_DESCRIPTION_CHARS = 1 << 20
MAX_DESCRIPTION_DEPTH = 64


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON text, strings skipped: checked
    before parsing, since every parser (and ``build``, which recurses through delta
    networks) would otherwise recurse that deep."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def check_description(description: dict, where="model description") -> None:
    """Types and bounds of every field ``build`` reads, with a message naming the field;
    component parameters are bounded by comparing with the stored tensors (``load_saved``)."""

    def fail(field: str, problem: str) -> NoReturn:
        raise ModelFileError(f"{where}: field {field!r} {problem}")

    for field in ("featurizer", "element_network"):
        part = description.get(field)
        if not isinstance(part, dict):
            fail(field, "is missing or not an object")
        if not isinstance(part.get("name"), str) or not isinstance(part.get("params"), dict):
            fail(field, "needs a string 'name' and an object 'params'")
    elements = description.get("elements")
    if (
        not isinstance(elements, list)
        or not 1 <= len(elements) <= len(NUMBERS)
        or not all(isinstance(e, str) and NUMBERS.get(e, 0) > 0 for e in elements)
        or len(set(elements)) != len(elements)
    ):
        fail("elements", f"must be a list of distinct element symbols, got {str(elements)[:80]}")
    energies = description.get("self_energies")
    if not isinstance(energies, dict) or set(energies) != set(elements):
        fail("self_energies", f"must give one energy for each of {elements}")
    for element, value in energies.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("self_energies", f"for {element} is not a finite number: {value!r}")
    size = description.get("ensemble_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_ENSEMBLE:
        fail("ensemble_size", f"must be an integer in 1..{MAX_ENSEMBLE}, got {size!r}")
    if not isinstance(description.get("name", ""), str):
        fail("name", "must be a string")
    uncertainty = description.get("uncertainty", {})
    if not isinstance(uncertainty, dict):
        fail("uncertainty", "must be an object")
    for key in ("energy_std_scale", "collect_threshold_kcal", "collect_threshold_relative_kcal"):
        value = uncertainty.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            fail("uncertainty", f"{key} must be a positive finite number, got {value!r}")


def build(description: dict) -> ANIPotential:
    """An untrained model from a description (components resolved through the registry)."""
    reg = registry()
    try:
        featurizer_cls = reg.get("featurizer", description["featurizer"]["name"])
        network_cls = reg.get("element-network", description["element_network"]["name"])
    except RegistryError as error:
        needed = [
            f"{part['name']!r} from the plugin {part['plugin']} {part.get('version', '')}".strip()
            for part in (description["featurizer"], description["element_network"])
            if part.get("plugin") and part["plugin"] != "aniserve"
        ]
        hint = f" It was saved with {' and '.join(needed)}; install that plugin." if needed else ""
        raise ModelFileError(
            f"model {description.get('name', '')!r} needs a component that is not installed: {error}.{hint}"
        ) from None
    try:
        featurizer = featurizer_cls.from_config(description["featurizer"]["params"], description["elements"])
        networks = network_cls.from_config(description["element_network"]["params"])
        return ANIPotential(
            featurizer,
            networks,
            description["self_energies"],
            {
                "name": description.get("name", ""),
                "featurizer": description["featurizer"],
                "element_network": description["element_network"],
                "uncertainty": description.get("uncertainty", {}),
            },
        )
    except (KeyError, TypeError, ValueError, LookupError, ArithmeticError) as error:  # LookupError: a nested name
        raise ModelFileError(
            f"model {description.get('name', '')!r}: component parameters do not make a model "
            f"({type(error).__name__}: {error})"
        ) from None


def _check_network_shapes(description: dict, path) -> None:
    """Build the element networks on the meta device (no memory) and compare their
    shapes with the stored tensors, so a description asking for huge layers is refused
    before anything is allocated: what is built is then bounded by the file's size."""
    from safetensors import safe_open

    try:
        network_cls = registry().get("element-network", description["element_network"]["name"])
        with torch.device("meta"):
            wanted = network_cls.from_config(description["element_network"]["params"]).state_dict()
    except RegistryError:
        return  # build() names the missing plugin
    except (KeyError, TypeError, ValueError, RuntimeError, LookupError, ArithmeticError) as error:
        raise ModelFileError(
            f"{path}: element_network parameters do not make a network ({type(error).__name__}: {error})"
        ) from None
    with safe_open(str(path), framework="pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for key, value in wanted.items():
        if stored.get("networks." + key) != tuple(value.shape):
            raise ModelFileError(
                f"{path}: element_network parameters ask for {key} of shape {tuple(value.shape)}, "
                f"the file stores {stored.get('networks.' + key)}"
            )


def load_saved(path: str | os.PathLike) -> ANIPotential:
    from safetensors.torch import load_file

    description = read_description(path)
    _check_network_shapes(description, path)
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
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
    model.description["source"] = str(path)
    return model
