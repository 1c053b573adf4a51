"""Read official ANI models in NeuroChem format.

A model directory holds a ``.params`` file (AEV constants), ``sae_linfit.dat`` (self
atomic energies, Hartree) and, per ensemble member, ``networks/ANN-<El>.nnf``: a text
header ``<length>=\\n`` followed by a bzip2-compressed layer description that names raw
float32 weight (out × in, row-major) and bias files beside it.  An ensemble is described
by a four-line ``.info`` file: params path, sae path, member prefix, member count
(paths relative to the folder holding the ``.info``).
"""

from __future__ import annotations

import bz2
import pathlib
import re
import warnings

import numpy as np
import torch

from aniserve.aev import AEVFeaturizer, AEVParameters
from aniserve.networks import ElementNetworks
from aniserve.potential import ANIPotential

#: NeuroChem activation codes: 9 is CELU with α = 0.1 (hidden layers), 6 is linear (output).
_CELU, _LINEAR = 9, 6


class NeuroChemError(ValueError):
    pass


def read_params(path: pathlib.Path) -> AEVParameters:
    values: dict[str, object] = {}
    for line in path.read_text().splitlines():
        if "=" not in line:
            continue
        key, value = (t.strip() for t in line.split("=", 1))
        if value.startswith("["):
            items = [v.strip() for v in value.strip("[]").split(",")]
            values[key] = tuple(items) if key == "Atyp" else tuple(float(v) for v in items)
        else:
            values[key] = value
    required = ("Rcr", "Rca", "EtaR", "ShfR", "EtaA", "Zeta", "ShfA", "ShfZ", "Atyp")
    missing = [k for k in required if k not in values]
    if missing:
        raise NeuroChemError(f"{path}: missing {', '.join(missing)}")
    return AEVParameters(elements=values["Atyp"], Rcr=float(values["Rcr"]), Rca=float(values["Rca"]),
                         **{k: values[k] for k in ("EtaR", "ShfR", "EtaA", "Zeta", "ShfA", "ShfZ")})


def read_self_energies(path: pathlib.Path) -> dict[str, float]:
    energies = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z]+)\s*,\s*\d+\s*=\s*(\S+)", line)
        if match:
            energies[match.group(1)] = float(match.group(2))
    if not energies:
        raise NeuroChemError(f"{path}: no 'El,index=energy' lines")
    return energies


def read_network(nnf: pathlib.Path) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Layers of one element network: (weight (out, in), bias (out,), activation code)."""
    raw = nnf.read_bytes()
    header_end = raw.find(b"=\n")
    if header_end < 0:
        raise NeuroChemError(f"{nnf}: no '<length>=' header")
    try:
        text = bz2.decompress(raw[header_end + 2:]).decode()
    except (OSError, ValueError) as error:
        raise NeuroChemError(f"{nnf}: corrupt bzip2 layer description ({error})") from None
    layers = []
    for block in re.findall(r"layer\s*\[(.*?)\n\s*\]", text, flags=re.S):
        fields = dict(re.findall(r"(\w+)=([^;]*);", block))
        nodes, inputs, activation = int(fields["nodes"]), int(fields["blocksize"]), int(fields["activation"])
        weight = _read_floats(nnf.parent, fields["weights"], nodes * inputs).reshape(nodes, inputs)
        bias = _read_floats(nnf.parent, fields["biases"], nodes)
        layers.append((weight, bias, activation))
    if not layers:
        raise NeuroChemError(f"{nnf}: no layers found")
    for index, (_, _, activation) in enumerate(layers):
        expected = _LINEAR if index == len(layers) - 1 else _CELU
        if activation != expected:
            raise NeuroChemError(f"{nnf}: layer {index + 1} has activation code {activation}; "
                                 f"only CELU (9) hidden layers and a linear (6) output are supported")
    return layers


def _read_floats(folder: pathlib.Path, reference: str, count: int) -> np.ndarray:
    match = re.fullmatch(r"FILE:(.+)\[(\d+)\]", reference.strip())
    if not match or int(match.group(2)) != count:
        raise NeuroChemError(f"{folder}: bad parameter reference {reference!r} (expected {count} values)")
    path = folder / match.group(1)
    data = np.fromfile(path, dtype="<f4")
    if data.size != count:
        raise NeuroChemError(f"{path}: holds {data.size} float32 values, expected {count}")
    return data


def member_directories(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, list[pathlib.Path]]:
    """(params file, sae file, member network folders) of an .info file or a directory."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".info":
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(lines) < 4:
            raise NeuroChemError(f"{path}: expected 4 lines (params, sae, member prefix, count)")
        base = path.parent
        prefix = base / lines[2]
        members = [pathlib.Path(f"{prefix}{k}") / "networks" for k in range(int(lines[3]))]
        return base / lines[0], base / lines[1], members
    if path.is_dir():
        info = path.parent / f"{path.name}.info"
        if info.is_file():  # the model zoo's layout: the .info file says how many members there are
            return member_directories(info)
        params = sorted(path.glob("*.params"))
        sae = path / "sae_linfit.dat"
        if (path / "networks").is_dir():
            members = [path / "networks"]
        else:
            found = sorted(int(p.name[5:]) for p in path.iterdir() if re.fullmatch(r"train\d+", p.name))
            # A gap means a member folder went missing: list every expected one, so the
            # loader reports it instead of quietly serving a smaller ensemble.
            members = [path / f"train{k}" / "networks" for k in range(found[-1] + 1)] if found else []
        if params and sae.exists() and members:
            return params[0], sae, members
    raise NeuroChemError(f"{path}: not a NeuroChem model (.info file, or a folder with a .params file, "
                         f"sae_linfit.dat and networks/ or train<k>/networks/)")


def load_neurochem(path: str | pathlib.Path, name: str = "", allow_incomplete: bool = False) -> ANIPotential:
    """An ANIPotential (float32 weights, CPU) from a NeuroChem .info file or folder.

    A missing ensemble member is an error; ``allow_incomplete=True`` serves the members
    that are there instead (with a warning)."""
    params_file, sae_file, members = member_directories(pathlib.Path(path))
    missing = [m for m in members if not m.is_dir()]
    if missing and (not allow_incomplete or len(missing) == len(members)):
        raise NeuroChemError(f"{missing[0]}: ensemble member folder is missing ({len(members) - len(missing)} of "
                             f"{len(members)} members present; load_neurochem(..., allow_incomplete=True) serves "
                             f"those)")
    if missing:
        warnings.warn(f"{path}: serving {len(members) - len(missing)} of {len(members)} ensemble members "
                      f"({', '.join(str(m.parent.name) for m in missing)} missing)", stacklevel=2)
        members = [m for m in members if m.is_dir()]
    params = read_params(params_file)
    self_energies = read_self_energies(sae_file)
    featurizer = AEVFeaturizer(params)
    per_element = {e: [read_network(m / f"ANN-{e}.nnf") for m in members] for e in params.elements}
    hidden = {e: [w.shape[0] for w, _, _ in layers[0][:-1]] for e, layers in per_element.items()}
    networks = ElementNetworks(list(params.elements), hidden, featurizer.output_width, len(members))
    with torch.no_grad():
        for mlp, element in zip(networks.mlps, params.elements):
            for index in range(len(mlp.weights)):
                mlp.weights[index].copy_(torch.from_numpy(
                    np.stack([layers[index][0].T for layers in per_element[element]])))
                mlp.biases[index].copy_(torch.from_numpy(
                    np.stack([layers[index][1][None, :] for layers in per_element[element]])))
    description = {"name": name or pathlib.Path(path).stem, "source": str(path),
                   "featurizer": {"name": "ani-aev", "params": params.to_json()},
                   "element_network": {"name": "ani-mlp", "params": networks.config()},
                   "self_energies": self_energies}
    return ANIPotential(featurizer, networks, self_energies, description)
