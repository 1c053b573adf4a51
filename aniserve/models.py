"""``load_model``: a model by name or path, on a device, in a dtype."""

from __future__ import annotations

import os
import pathlib

import torch

from aniserve.potential import ANIPotential

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ModelNotFoundError(LookupError):
    pass


#: TorchANI's spellings of the official models (``torchani.models.ANI1x`` …), any case.
ALIASES = {"ani1x": "ani-1x", "ani1ccx": "ani-1ccx", "ani2x": "ani-2x"}


def canonical_name(name: str) -> str:
    """``ANI1x``, ``ANI-1x``, ``ani_1x`` … → ``ani-1x``; other names unchanged."""
    return ALIASES.get(name.lower().replace("-", "").replace("_", ""), name)


def catalogue() -> list[dict]:
    """Every model that resolves by name: {name, source, path (None if not found), looked}."""
    from aniserve.registry import registry

    reg = registry()
    entries = []
    for source_name in reg.names("model-source"):
        source = reg.get("model-source", source_name)
        for name in source.names():
            found, looked = source.locate(name)
            entries.append({"name": name, "source": source_name, "path": found, "looked": looked})
    return entries


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """The file or folder a model name or path stands for; ModelNotFoundError (saying
    where it looked, or the closest known name) when there is none."""
    import difflib

    from aniserve.registry import registry

    path = pathlib.Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if os.sep in name or name.endswith((".safetensors", ".info")):
        raise ModelNotFoundError(f"model file {name!r} does not exist")
    name = canonical_name(name)
    reg = registry()
    owners = {n: s for s in reg.names("model-source") for n in reg.get("model-source", s).names()}
    if name not in owners:
        close = difflib.get_close_matches(name.lower(), list(owners), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelNotFoundError(
            f"unknown model {name!r}.{hint} Known names: {', '.join(owners)}; or give the "
            f"path of a NeuroChem .info file/folder or an aniserve .safetensors file."
        )
    found, looked = reg.get("model-source", owners[name]).locate(name)
    if found is None:
        where = "".join(f"\n  - {place}" for place in looked)
        raise ModelNotFoundError(
            f"model {name!r} not found. Looked in:{where}\nSet ANISERVE_MODEL_DIR to a folder "
            f"holding the official model zoo (e.g. ani-1ccx_8x.info and ani-1ccx_8x/)."
        )
    return pathlib.Path(found)


def load_model(
    name_or_path: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32"
) -> ANIPotential:
    """Load an ANI model.

    name_or_path: a registered name (``ani-1x``, ``ani-1ccx``, ``ani-2x``, …; see
    ``aniserve models``; default the embedded model, which needs no download), a NeuroChem
    ``.info`` file or folder, or an aniserve model file (``.safetensors``).  device: ``cpu``,
    ``cuda``, ``cuda:1``…  dtype: ``float32`` or ``float64``.  The model is in eval mode with
    its parameters frozen (a transfer strategy unfreezes what it trains).
    """
    from aniserve.modelfile import load_saved
    from aniserve.neurochem import load_neurochem

    if name_or_path is None:
        from aniserve.embedded import DEFAULT_MODEL

        name_or_path = DEFAULT_MODEL
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve(name_or_path)
    name = str(name_or_path)
    if path.is_file() and path.suffix != ".info":
        model = load_saved(path)
    else:
        model = load_neurochem(path, name=canonical_name(name) if not pathlib.Path(name).exists() else path.stem)
    model = model.to(device=torch.device(device), dtype=DTYPES[dtype]).eval()
    return model.requires_grad_(False)
