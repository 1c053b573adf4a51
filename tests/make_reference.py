"""Recompute the shared folder's ``reference/ani_reference.json`` with TorchANI from the official weights.

The conformance tests compare aniserve with these numbers; this script recomputes every
model field of every record (energy, forces, the strain derivative of periodic records,
ANI-1ccx's member energies and spread) for the structures already in the file, with
TorchANI (an optional test dependency: ``pip install torchani==2.9.0``; aniserve itself
never imports it) in float64:

    python tests/make_reference.py --zoo $ANISERVE_MODEL_DIR \\
        --reference ../shared/reference/ani_reference.json --out new.json

Self energies are set from ``sae_linfit.dat`` as written (float64) after the model is
cast to float64: TorchANI builds them in float32, which would move totals by ~3e-6
Hartree per heavy atom.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import torch

HERE = pathlib.Path(__file__).resolve().parent
MODELS = {"ani-1x": "ani-1x_8x", "ani-1ccx": "ani-1ccx_8x", "ani-2x": "ani-2x_8x"}


def load(zoo: pathlib.Path, name: str):
    import torchani

    folder = MODELS[name]
    # (TorchANI reads .info paths relative to its own data folder: give it ours.)
    info = torchani.neurochem.NeurochemInfo.from_info_file(zoo / f"{folder}.info")
    ours = (
        zoo / p.relative_to(torchani.neurochem.neurochem_dir()) for p in (info.sae, info.const, info.ensemble_prefix)
    )
    info = torchani.neurochem.NeurochemInfo(*ours, info.ensemble_size)
    aev, networks, shifter, symbols = torchani.neurochem.modules_from_info(info, None, strategy="pyaev")
    model = torchani.arch.ANI(symbols, aev, networks, shifter, periodic_table_index=True).double()
    exact = {}
    for line in (zoo / folder / "sae_linfit.dat").read_text().splitlines():
        if "=" in line:
            key, value = line.split("=")
            exact[key.split(",")[0].strip()] = float(value)
    model.energy_shifter.self_energies = torch.tensor([exact[s] for s in model.symbols], dtype=torch.float64)
    return model.eval()


def compute(model, record: dict, members: bool) -> dict:
    numbers = torch.tensor([record["numbers"]])
    positions = torch.tensor([record["positions"]], dtype=torch.float64)
    cell = None if record["cell"] is None else torch.tensor(record["cell"], dtype=torch.float64)
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    deform = torch.eye(3, dtype=torch.float64) + strain
    x = (positions @ deform).detach().requires_grad_(True) if cell is None else positions @ deform
    kwargs = {} if cell is None else {"cell": cell @ deform, "pbc": torch.tensor([True] * 3)}
    if cell is None:
        energy = model((numbers, x)).energies
        forces = -torch.autograd.grad(energy.sum(), x)[0]
        out = {"energy": float(energy.detach()), "forces": forces[0].tolist()}
    else:
        x.retain_grad()
        energy = model((numbers, x), **kwargs).energies
        energy.sum().backward()
        out = {
            "energy": float(energy.detach()),
            "forces": (-x.grad[0]).tolist(),
            "strain_derivative": strain.grad.tolist(),
        }
    if members:
        with torch.no_grad():
            member = model(
                (numbers, positions),
                ensemble_values=True,
                **({} if cell is None else {"cell": cell, "pbc": torch.tensor([True] * 3)}),
            ).energies.reshape(-1)
        out["member_energies"] = member.tolist()
        out["energy_std"] = float(member.std(unbiased=False))
    return out


def regenerate(reference: dict, zoo: pathlib.Path, names: list[str] | None = None) -> dict:
    models = {name: load(zoo, name) for name in MODELS}
    records = [r for r in reference["records"] if names is None or r["name"] in names]
    for record in records:
        for name in record["models"]:
            record["models"][name] = compute(models[name], record, members=name == "ani-1ccx")
    return {**reference, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=os.environ.get("ANISERVE_MODEL_DIR"), help="the official model zoo folder")
    parser.add_argument(
        "--reference", required=True, help="file whose structures are recomputed (the shared folder's reference)"
    )
    parser.add_argument("--out", default=None, help="where to write (default: over --reference)")
    parser.add_argument("--records", nargs="*", default=None, help="only these record names")
    args = parser.parse_args()
    if not args.zoo:
        parser.error("give --zoo or set ANISERVE_MODEL_DIR to the official model zoo")
    reference = json.loads(pathlib.Path(args.reference).read_text())
    result = regenerate(reference, pathlib.Path(args.zoo), args.records)
    pathlib.Path(args.out or args.reference).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
