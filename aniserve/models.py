"""``load_model``: a model by name or path, on a device, in a dtype."""

from __future__ import annotations

import os
import pathlib

import torch

from aniserve.potential import ANIPotential

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ModelNotFoundError(LookupError):
    pass


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "cpu",
               dtype: str = "float32") -> ANIPotential:
    """Load an ANI model.

    name_or_path: a registered name (``ani-1x``, ``ani-1ccx``, ``ani-2x``, …; see
    ``aniserve models``; default the embedded model, which needs no download), a NeuroChem ``.info`` file or folder, or an aniserve model
    file (``.safetensors``).  device: ``cpu``, ``cuda``, ``cuda:1``…  dtype: ``float32``
    or ``float64``.  The model is in eval mode with its parameters frozen (a transfer
    strategy unfreezes what it trains).
    """
    from aniserve.modelfile import load_saved
    from aniserve.neurochem import load_neurochem
    from aniserve.registry import registry

    if name_or_path is None:
        from aniserve.embedded import DEFAULT_MODEL

        name_or_path = DEFAULT_MODEL
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = pathlib.Path(name_or_path)
    name = str(name_or_path)
    if not path.exists():
        looked_all = []
        for source_name in registry().names("model-source"):
            found, looked = registry().get("model-source", source_name).locate(name)
            looked_all += [f"{source_name}: {place}" for place in looked]
            if found is not None:
                path = pathlib.Path(found)
                break
        else:
            known = ", ".join(m for s in registry().names("model-source")
                              for m in registry().get("model-source", s).names())
            where = "".join(f"\n  - {place}" for place in looked_all) or " (no source knows this name)"
            raise ModelNotFoundError(
                f"model {name!r} not found. Known names: {known}; or give a path to a NeuroChem .info "
                f"file/folder or an aniserve .safetensors file. Looked in:{where}\n"
                f"Set ANISERVE_MODEL_DIR to a folder holding the official model zoo "
                f"(e.g. ani-1ccx_8x.info and ani-1ccx_8x/).")
    if path.is_file() and path.suffix != ".info":
        model = load_saved(path)
    else:
        model = load_neurochem(path, name=name if not pathlib.Path(name).exists() else path.stem)
    model = model.to(device=torch.device(device), dtype=DTYPES[dtype]).eval()
    return model.requires_grad_(False)
