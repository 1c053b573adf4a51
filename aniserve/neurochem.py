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
import os
import pathlib
import re
import stat
import warnings
from typing import Any

import numpy as np
import torch

from aniserve.aev import AEVFeaturizer, AEVParameters
from aniserve.networks import ElementNetworks
from aniserve.potential import ANIPotential

#: NeuroChem activation codes: 9 is CELU with α = 0.1 (hidden layers), 6 is linear (output).
_CELU, _LINEAR = 9, 6

#: Bounds on files read from a model folder (untrusted until checked).  The official
#: files are far below them: .params 1 KB, sae 0.2 KB, .nnf 1.2 KB (7 KB unpacked),
#: the largest weight file 1 MB, 8 members.
MAX_TEXT_BYTES = 1 << 20
MAX_LAYER_TEXT_BYTES = 1 << 20  # an .nnf's unpacked layer description
MAX_WEIGHT_BYTES = 256 << 20
MAX_MEMBERS = 1024
MAX_LAYERS = 64


class NeuroChemError(ValueError):
    pass


def _read_bytes(path: pathlib.Path, limit: int) -> bytes:
    """A regular file's bytes, refused before opening when it is something else (a FIFO
    would block the open, a device never ends) or larger than ``limit``."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise NeuroChemError(f"{path}: cannot read ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise NeuroChemError(f"{path}: not a regular file")
    if info.st_size > limit:
        raise NeuroChemError(f"{path}: {info.st_size} bytes, more than the {limit} a model file may have")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since the stat
        raise NeuroChemError(f"{path}: more than the {limit} bytes a model file may have")
    return data


def _read_text(path: pathlib.Path) -> str:
    try:
        return _read_bytes(path, MAX_TEXT_BYTES).decode()
    except UnicodeDecodeError:
        raise NeuroChemError(f"{path}: not a text file") from None


def read_params(path: pathlib.Path) -> AEVParameters:
    values: dict[str, Any] = {}
    for line in _read_text(path).splitlines():
        if "=" not in line:
            continue
        key, value = (t.strip() for t in line.split("=", 1))
        try:
            if value.startswith("["):
                items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
                values[key] = tuple(items) if key == "Atyp" else tuple(float(v) for v in items)
            else:
                values[key] = value
        except ValueError:
            raise NeuroChemError(f"{path}: {key} is not a list of numbers: {value[:80]!r}") from None
    required = ("Rcr", "Rca", "EtaR", "ShfR", "EtaA", "Zeta", "ShfA", "ShfZ", "Atyp")
    missing = [k for k in required if k not in values]
    if missing:
        raise NeuroChemError(f"{path}: missing {', '.join(missing)}")
    try:
        return AEVParameters(
            elements=values["Atyp"],
            Rcr=float(values["Rcr"]),
            Rca=float(values["Rca"]),
            **{k: values[k] for k in ("EtaR", "ShfR", "EtaA", "Zeta", "ShfA", "ShfZ")},
        )
    except (TypeError, ValueError) as error:
        raise NeuroChemError(f"{path}: {error}") from None


def read_self_energies(path: pathlib.Path) -> dict[str, float]:
    energies = {}
    for line in _read_text(path).splitlines():
        match = re.match(r"\s*([A-Za-z]+)\s*,\s*\d+\s*=\s*(\S+)", line)
        if match:
            try:
                energies[match.group(1)] = float(match.group(2))
            except ValueError:
                raise NeuroChemError(f"{path}: self energy of {match.group(1)} is not a number") from None
    if not energies:
        raise NeuroChemError(f"{path}: no 'El,index=energy' lines")
    return energies


def read_network(nnf: pathlib.Path) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Layers of one element network: (weight (out, in), bias (out,), activation code)."""
    raw = _read_bytes(nnf, MAX_TEXT_BYTES)
    header_end = raw.find(b"=\n")
    if header_end < 0:
        raise NeuroChemError(f"{nnf}: no '<length>=' header")
    # Unpacked with a bound: a few KB of bzip2 can unpack to gigabytes.
    unpacker = bz2.BZ2Decompressor()
    try:
        unpacked = unpacker.decompress(raw[header_end + 2 :], max_length=MAX_LAYER_TEXT_BYTES)
        if not unpacker.eof:
            raise NeuroChemError(
                f"{nnf}: the layer description unpacks to more than {MAX_LAYER_TEXT_BYTES} bytes"
                if len(unpacked) >= MAX_LAYER_TEXT_BYTES
                else f"{nnf}: truncated bzip2 data"
            )
        text = unpacked.decode()
    except (OSError, ValueError, EOFError) as error:
        raise NeuroChemError(f"{nnf}: corrupt bzip2 layer description ({error})") from None
    layers: list[tuple[np.ndarray, np.ndarray, int]] = []
    for fields in _layer_blocks(text, nnf):
        try:
            nodes, inputs, activation = int(fields["nodes"]), int(fields["blocksize"]), int(fields["activation"])
        except (KeyError, ValueError):
            raise NeuroChemError(f"{nnf}: layer {len(layers) + 1} lacks integer nodes/blocksize/activation") from None
        if not (1 <= nodes and 1 <= inputs and nodes * inputs * 4 <= MAX_WEIGHT_BYTES):
            raise NeuroChemError(f"{nnf}: layer {len(layers) + 1} of {nodes} × {inputs} is out of bounds")
        if layers and inputs != layers[-1][0].shape[0]:
            raise NeuroChemError(
                f"{nnf}: layer {len(layers) + 1} takes {inputs} inputs, the layer before gives {layers[-1][0].shape[0]}"
            )
        weight = _read_floats(nnf.parent, fields.get("weights", ""), nodes * inputs).reshape(nodes, inputs)
        bias = _read_floats(nnf.parent, fields.get("biases", ""), nodes)
        layers.append((weight, bias, activation))
    if not layers:
        raise NeuroChemError(f"{nnf}: no layers found")
    if layers[-1][0].shape[0] != 1:
        raise NeuroChemError(f"{nnf}: the output layer has {layers[-1][0].shape[0]} nodes, not 1")
    for index, (_, _, activation) in enumerate(layers):
        expected = _LINEAR if index == len(layers) - 1 else _CELU
        if activation != expected:
            raise NeuroChemError(
                f"{nnf}: layer {index + 1} has activation code {activation}; "
                f"only CELU (9) hidden layers and a linear (6) output are supported"
            )
    return layers


def _layer_blocks(text: str, nnf: pathlib.Path) -> list[dict[str, str]]:
    """The ``key=value;`` fields of each ``layer [ … ]`` block, read line by line (one
    pass: a regular expression over unmatched brackets takes quadratic time)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if current is None:
            if line.startswith("layer") and line[5:].strip() == "[":
                if len(blocks) >= MAX_LAYERS:
                    raise NeuroChemError(f"{nnf}: more than {MAX_LAYERS} layers")
                current = {}
        elif line == "]":
            blocks.append(current)
            current = None
        elif "=" in line and line.endswith(";"):
            key, value = line[:-1].split("=", 1)
            current[key.strip()] = value.strip()
    if current is not None:
        raise NeuroChemError(f"{nnf}: layer {len(blocks) + 1} is not closed by ']'")
    return blocks


def _read_floats(folder: pathlib.Path, reference: str, count: int) -> np.ndarray:
    match = re.fullmatch(r"FILE:([^/\\]+)\[(\d+)\]", reference.strip())
    if not match or int(match.group(2)) != count:
        raise NeuroChemError(f"{folder}: bad parameter reference {reference!r} (expected {count} values)")
    path = folder / match.group(1)
    raw = _read_bytes(path, MAX_WEIGHT_BYTES)
    if len(raw) != 4 * count:
        held = f"{len(raw) // 4} float32 values" if len(raw) % 4 == 0 else f"{len(raw)} bytes"
        raise NeuroChemError(f"{path}: holds {held}, expected {count}")
    return np.frombuffer(raw, dtype="<f4").copy()


def member_directories(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, list[pathlib.Path]]:
    """(params file, sae file, member network folders) of an .info file or a directory."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".info":
        lines = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
        if len(lines) < 4:
            raise NeuroChemError(f"{path}: expected 4 lines (params, sae, member prefix, count)")
        base = path.parent
        prefix = base / lines[2]
        if not lines[3].isdigit() or not 1 <= int(lines[3]) <= MAX_MEMBERS:
            raise NeuroChemError(f"{path}: member count {lines[3][:20]!r} is not an integer in 1..{MAX_MEMBERS}")
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
            found = sorted(int(p.name[5:]) for p in path.iterdir() if re.fullmatch(r"train\d{1,4}", p.name))
            if found and found[-1] >= MAX_MEMBERS:
                raise NeuroChemError(f"{path}: member folder train{found[-1]} beyond the limit of {MAX_MEMBERS}")
            # A gap means a member folder went missing: list every expected one, so the
            # loader reports it instead of quietly serving a smaller ensemble.
            members = [path / f"train{k}" / "networks" for k in range(found[-1] + 1)] if found else []
        if params and sae.exists() and members:
            return params[0], sae, members
    raise NeuroChemError(
        f"{path}: not a NeuroChem model (.info file, or a folder with a .params file, "
        f"sae_linfit.dat and networks/ or train<k>/networks/)"
    )


def load_neurochem(path: str | pathlib.Path, name: str = "", allow_incomplete: bool = False) -> ANIPotential:
    """An ANIPotential (float32 weights, CPU) from a NeuroChem .info file or folder.

    A missing ensemble member is an error; ``allow_incomplete=True`` serves the members
    that are there instead (with a warning)."""
    params_file, sae_file, members = member_directories(pathlib.Path(path))
    missing = [m for m in members if not m.is_dir()]
    if missing and (not allow_incomplete or len(missing) == len(members)):
        raise NeuroChemError(
            f"{missing[0]}: ensemble member folder is missing ({len(members) - len(missing)} of "
            f"{len(members)} members present; load_neurochem(..., allow_incomplete=True) serves "
            f"those)"
        )
    if missing:
        warnings.warn(
            f"{path}: serving {len(members) - len(missing)} of {len(members)} ensemble members "
            f"({', '.join(str(m.parent.name) for m in missing)} missing)",
            stacklevel=2,
        )
        members = [m for m in members if m.is_dir()]
    params = read_params(params_file)
    self_energies = read_self_energies(sae_file)
    missing_energy = [e for e in params.elements if e not in self_energies]
    if missing_energy:
        raise NeuroChemError(f"{sae_file}: no self energy for {', '.join(missing_energy)}")
    featurizer = AEVFeaturizer(params)
    per_element = {e: [read_network(m / f"ANN-{e}.nnf") for m in members] for e in params.elements}
    # Every member's layers must have the same shapes, the first taking the AEV, before
    # anything is allocated for them.
    for element, nets in per_element.items():
        shapes = [[w.shape for w, _, _ in layers] for layers in nets]
        if shapes[0][0][1] != featurizer.output_width:
            raise NeuroChemError(
                f"{members[0] / f'ANN-{element}.nnf'}: the first layer takes {shapes[0][0][1]} "
                f"inputs, the .params file's AEV has {featurizer.output_width}"
            )
        for member, shape in zip(members, shapes):
            if shape != shapes[0]:
                raise NeuroChemError(f"{member / f'ANN-{element}.nnf'}: layer shapes differ from member 0's")
    hidden = {e: [w.shape[0] for w, _, _ in layers[0][:-1]] for e, layers in per_element.items()}
    networks = ElementNetworks(list(params.elements), hidden, featurizer.output_width, len(members))
    with torch.no_grad():
        for mlp, element in zip(networks.mlps, params.elements):
            for index in range(len(mlp.weights)):
                mlp.weights[index].copy_(
                    torch.from_numpy(np.stack([layers[index][0].T for layers in per_element[element]]))
                )
                mlp.biases[index].copy_(
                    torch.from_numpy(np.stack([layers[index][1][None, :] for layers in per_element[element]]))
                )
    description = {
        "name": name or pathlib.Path(path).stem,
        "source": str(path),
        "featurizer": {"name": "ani-aev", "params": params.to_json()},
        "element_network": {"name": "ani-mlp", "params": networks.config()},
        "self_energies": self_energies,
    }
    # .to(): the AEV constants are built in float64; the whole model takes the weights' dtype,
    # as load_saved's does (a float32 network fed float64 features fails in the tensor path).
    return ANIPotential(featurizer, networks, self_energies, description).to(torch.float32)
