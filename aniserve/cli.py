"""The ``aniserve`` command: one click group, each command a thin wrapper."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib

import click

from aniserve import exits
from aniserve.embedded import DEFAULT_MODEL


class _Failure(click.ClickException):
    """One line on stderr and an exit status from ``aniserve.exits``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance


class _Group(click.Group):
    """Library errors (bad input, missing models, unreadable files) become one clean
    line on stderr and an exit status from the table in ``aniserve.exits``, never a
    traceback: a model that cannot be loaded 5, anything else 1; wrong options 64
    (click's 2 would read as a protocol error), Ctrl-C 130."""

    def invoke(self, ctx):
        from aniserve.modelfile import ModelFileError
        from aniserve.models import ModelNotFoundError
        from aniserve.neurochem import NeuroChemError

        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as error:
            extra = _EXTRAS.get((error.name or "").split(".")[0])
            hint = f"pip install 'aniserve[{extra}]'" if extra else "it is not installed"
            raise click.ClickException(f"this command needs {error.name}: {hint}") from None
        except (ModelFileError, NeuroChemError, ModelNotFoundError) as error:
            raise _Failure(str(error), exits.BAD_MODEL) from None
        except (ValueError, LookupError, OSError) as error:
            raise click.ClickException(str(error)) from None
        except RecursionError:  # checks bound what nests; this is the last line of defence
            raise click.ClickException("input nested too deeply to read") from None

    def main(self, *args, **kwargs):
        import sys

        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            error.show()
            sys.exit(exits.USAGE)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("aniserve: interrupted", err=True)
            sys.exit(exits.INTERRUPTED)
        sys.exit(code if isinstance(code, int) else exits.OK)


#: Optional dependencies and the extra that installs each.
_EXTRAS = {"pyscf": "qm", "rdkit": "qm", "dask": "qm", "distributed": "qm", "ipi": "ipi", "matplotlib": "bench"}


@click.group(cls=_Group)
@click.version_option(package_name="aniserve")
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="MODULE",
    help="Register a plugin module by import path (for development), e.g. --plugin my_pkg.plugin.",
)
def main(plugins):
    """Serve, train and transfer-learn ANI neural-network potentials."""
    from aniserve import log

    log.to_stderr()
    if plugins:
        from aniserve.registry import add_plugins

        add_plugins(plugins)


@main.command()
def models():
    """List the models that resolve by name: elements, members, the spread's calibration
    (energy_std = scale × the members' std; the collection thresholds on ρ and on ρ relative
    to a trajectory's first structure, kcal/mol) and where each resolves from."""
    from aniserve.models import catalogue, load_model

    entries = catalogue()
    width = max(len(e["name"]) for e in entries) + 2
    for e in entries:
        if e["path"] is None:
            click.echo(f"{e['name']:{width}s} not available  (looked: {'; '.join(e['looked'])})")
            continue
        model = load_model(e["path"])
        from aniserve.collect import stated_threshold

        click.echo(
            f"{e['name']:{width}s} {'-'.join(model.elements):16s} {model.ensemble_size}-member ensemble  "
            f"spread ×{model.energy_std_scale:.2f}, collects ρ > {stated_threshold(model):.2f} "
            f"(relative > {stated_threshold(model, relative=True):.2f})  "
            f"[{e['source']}] {e['path']}"
        )


@main.command("eval")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Model name or path; the official ANI-1ccx is --model ani-1ccx.",
)
@click.option("--index", default=":", show_default=True, help="Which frames of FILE (ASE index syntax).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float64", show_default=True)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write every frame's results: extended XYZ (.xyz/.extxyz: energy, forces, stress, "
    "energy_std, in ASE's eV and Å) or JSON (.json, units in the keys).",
)
def eval_(file, model, index, device, dtype, out):
    """Energy, forces and uncertainty of each structure in FILE (any format ASE reads;
    i-PI's CELL comments make a box periodic), one table row per frame.

    Example: aniserve eval examples/molecules/ethanol.xyz --model ani-1ccx --out results.extxyz
    """
    import numpy as np

    from aniserve.calculator import ase_results, periodic_cell
    from aniserve.models import load_model
    from aniserve.serving import Evaluator, Structure

    if out is not None:
        check_out(out)
        if pathlib.Path(out).suffix.lower() not in (".xyz", ".extxyz", ".json"):
            raise click.BadParameter(f"{out}: write .extxyz, .xyz or .json", param_hint="--out")
    from aniserve.structures import read_structures

    frames = read_structures(file, index)
    potential = load_model(model, device=device, dtype=dtype)
    evaluator = Evaluator(potential)
    click.echo(
        f"model: {potential.description.get('name') or model} ({'-'.join(potential.elements)}, "
        f"{potential.ensemble_size}-member ensemble, {dtype})"
    )
    rows = []
    for n, atoms in enumerate(frames):
        cell = periodic_cell(atoms)
        try:
            (result,) = evaluator.evaluate([(n, Structure(atoms.numbers, np.array(atoms.positions), cell))])
        except ValueError as error:
            if out is not None and rows:  # what was computed is kept
                _write_results(out, rows, potential.description.get("name") or model, dtype)
                click.echo(f"wrote frames 0–{n - 1} to {out}", err=True)
            raise _Failure(f"{file}, frame {n}: {error}", exits.BAD_STRUCTURE) from None
        evaluator.forget(n)  # (frames are independent: no neighbour list is kept for the next)
        values = ase_results(result, atoms.get_volume() if cell is not None else None)
        fmax = float(np.linalg.norm(values["forces"], axis=1).max())
        click.echo(
            f"{n:5d} {atoms.get_chemical_formula():12s} E = {float(result.energy):.8f} Ha = "
            f"{values['energy']:.6f} eV   max|F| = {fmax:.4f} eV/Å   "
            f"σ(ensemble) = {values['energy_std'] * 1000:.2f} meV  {'periodic' if cell is not None else '-'}"
        )
        rows.append((atoms, result, values))
    if out is not None:
        _write_results(out, rows, potential.description.get("name") or model, dtype)
        click.echo(f"wrote {out}", err=True)


def _write_results(out, rows, model_name: str, dtype: str) -> None:
    """eval --out: extended XYZ (ASE reads the results back as a calculator's) or JSON."""
    if pathlib.Path(out).suffix.lower() == ".json":
        frames = [
            {
                "index": n,
                "formula": atoms.get_chemical_formula(),
                "periodic": "stress" in values,
                "energy_hartree": float(result.energy),
                "energy_ev": values["energy"],
                "energy_std_ev": values["energy_std"],
                "forces_ev_per_angstrom": values["forces"].tolist(),
                "stress_ev_per_cubic_angstrom": values["stress"].tolist() if "stress" in values else None,
            }
            for n, (atoms, result, values) in enumerate(rows)
        ]
        pathlib.Path(out).write_text(json.dumps({"model": model_name, "dtype": dtype, "frames": frames}, indent=1))
        return
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    written = []
    for atoms, _result, values in rows:
        atoms = atoms.copy()
        atoms.info = {"model": model_name, "energy_std": values["energy_std"]}  # the input's comment is not ours
        atoms.calc = SinglePointCalculator(atoms, **{k: v for k, v in values.items() if k != "energy_std"})
        written.append(atoms)
    ase.io.write(out, written, format="extxyz")


@main.command()
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Model name (aniserve models) or path, e.g. --model ani-2x or --model my.safetensors.",
)
@click.option(
    "--structure",
    "structures",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="File (any ASE format) giving the atoms in the order the server sends them; the protocol "
    "never sends elements.  Once for all addresses, or once per address in order.",
)
@click.option(
    "--unix",
    "unix",
    multiple=True,
    metavar="NAME",
    help="UNIX socket /tmp/ipi_NAME (i-PI's and ASE's naming) or an absolute path. Example: --unix water",
)
@click.option("--inet", "inet", multiple=True, metavar="HOST:PORT", help="TCP address. Example: --inet localhost:31415")
@click.option(
    "--shm",
    "shm",
    multiple=True,
    metavar="NAME",
    help="i-PI <ffsocket mode='shm'>: control on /tmp/ipi_NAME, arrays in shared memory.",
)
@click.option(
    "--connections",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Connections to open to each address; all are evaluated together in one batched pass "
    "(e.g. --connections 8 serves 8 i-PI beads from one model).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option(
    "--pbc",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="Periodicity (never sent on the wire). auto: periodic when the server's cell is non-singular.",
)
@click.option(
    "--extras",
    type=click.Choice(["committee", "std", "none"]),
    default="std",
    show_default=True,
    help="std: the ensemble's energy_std as JSON with each reply (one gradient pass); committee: also "
    "per-member energies/forces/virials for i-PI's <ffcommittee parse_json> (k+1 passes); none: an "
    "empty extras string, for clients that cannot take JSON (ASE <= 3.22).",
)
@click.option(
    "--skin",
    default=1.0,
    show_default=True,
    help="Å added to the cutoff of each neighbour list; a list is reused until an atom moves skin/2.",
)
@click.option("--connect-timeout", default=60.0, show_default=True, help="Seconds to wait for a server to come up.")
@click.option(
    "--timeout",
    "message_timeout",
    default=60.0,
    show_default=True,
    help="Seconds a half-received message may wait for the rest before the driver gives up.",
)
@click.option(
    "--idle-timeout",
    default=0.0,
    show_default=True,
    help="Seconds a connected server may stay silent between messages before the driver gives up "
    "(exit 2); 0 waits for ever (ASE sends nothing between calculations; i-PI polls STATUS "
    "constantly, so on a cluster e.g. 600 frees a node whose i-PI is wedged).",
)
@click.option(
    "--reconnect-timeout",
    default=10.0,
    show_default=True,
    help="After a server closes the connection, seconds to wait for one to come back at the same address "
    "(the other connections are served meanwhile).  ASE's SocketIOCalculator closes without EXIT "
    "when it is done: with ASE, --reconnect-timeout 0 ends the driver at once.",
)
@click.option(
    "--collect",
    "collect_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Append structures whose ensemble spread exceeds a threshold to this extended XYZ file "
    "(active learning: label them with `aniserve data label`).",
)
@click.option(
    "--collect-energy-std",
    default=None,
    type=float,
    help="Collect when the energy spread per √atoms exceeds this, kcal/mol; 0 turns it off.  Default: the "
    "threshold the model states (fitted with its calibration, on its card), else ANI-1x's 0.23.",
)
@click.option(
    "--collect-force-std",
    default=None,
    type=float,
    help="Also collect when an atom's force spread over the members exceeds this, kcal/mol/Å. Costs k "
    "extra gradient passes per evaluation (k members), so off by default.  --collect alone costs "
    "nothing per step: the energy spread comes with every evaluation, and only a structure that is "
    "written is evaluated again for its force spread.",
)
@click.option(
    "--collect-relative",
    is_flag=True,
    help="Judge the energy spread of each structure relative to its trajectory's (bead's) first structure, "
    "against the threshold the model states for that: the members' disagreement on a molecule's energy "
    "zero cancels (a Δ-learnt model's absolute spread can flag every frame of one molecule and none of "
    "another).  Off: absolute, the one that meets new molecules.",
)
@click.option(
    "--collect-every",
    default=1,
    show_default=True,
    help="At least this many steps between two collected structures of one trajectory (bead).",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="CPU threads for the model (default: torch's choice, one per core).  With several drivers "
    "or other jobs on a node, keep threads × processes ≤ cores: threads that share a core "
    "wait for each other.",
)
def drive(
    model,
    structures,
    unix,
    inet,
    shm,
    connections,
    device,
    dtype,
    pbc,
    extras,
    skin,
    connect_timeout,
    message_timeout,
    idle_timeout,
    reconnect_timeout,
    collect_path,
    collect_energy_std,
    collect_force_std,
    collect_every,
    collect_relative,
    threads,
):
    """Serve MODEL to i-PI or ASE (SocketIOCalculator) as an i-PI socket client.

    \b
    Examples:
      aniserve drive --model ani-1ccx --structure init.xyz --unix water --connections 8
      aniserve drive --model ani-2x --structure mol.xyz --inet localhost:31415

    Exit status: 0 after EXIT or when every server has gone; 2 protocol error (or a
    server silent past --timeout / --idle-timeout, or not reading our replies); 3 a
    structure the model cannot evaluate (unknown element, NaN, too thin a cell, a
    non-finite result); 4 no server; 5 a model that cannot be loaded; 64 wrong options;
    130 Ctrl-C; 143 SIGTERM.  With several connections, an error ends only its own
    connection; the status is then the first error's, once the others are done.
    """
    import logging
    import signal
    import sys
    import threading

    from aniserve import log
    from aniserve.driver import Address, IPIDriver
    from aniserve.models import load_model
    from aniserve.serving import Evaluator

    log.to_stderr("aniserve drive: ")
    try:
        inet_addresses = [Address.inet(t) for t in inet]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--inet") from None
    addresses = [Address.unix(n) for n in unix] + inet_addresses + [Address.unix(n, shm=True) for n in shm]
    if not addresses:
        raise click.UsageError("give at least one of --unix, --inet, --shm")
    from aniserve.protocol import is_plain_name

    # A socket is /tmp/ipi_NAME (i-PI's naming) or an absolute path; nothing in between,
    # so a name cannot walk out of /tmp ("../x").
    for option, names in (("--unix", unix), ("--shm", shm)):
        for name in names:
            if not (name.startswith("/") or is_plain_name(name)):
                raise click.BadParameter(
                    f"{name!r} is neither a plain name (letters, digits, '_', '-', '.') nor an absolute path",
                    param_hint=option,
                )
    if len(structures) not in (1, len(addresses)):
        raise click.UsageError(f"give --structure once or once per address ({len(addresses)})")
    from aniserve.structures import read_structures

    numbers = [read_structures(s, 0)[0].numbers for s in structures]
    if len(numbers) == 1:
        numbers = numbers * len(addresses)
    collector = None
    if collect_path:
        from aniserve.collect import MODEL_THRESHOLD, Collector

        collector = Collector(
            collect_path,
            energy_std=MODEL_THRESHOLD if collect_energy_std is None else (collect_energy_std or None),
            force_std=collect_force_std,
            every=collect_every,
            relative=collect_relative,
        )
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    potential = load_model(model, device=device, dtype=dtype)
    logging.getLogger("aniserve.driver").info(
        "serving %s on %s", potential.description.get("name") or model, _threads_in_words()
    )
    evaluator = Evaluator(potential, skin=skin, members=extras == "committee", collector=collector)
    try:
        driver = IPIDriver(
            evaluator,
            addresses,
            numbers,
            connections=connections,
            pbc=pbc,
            extras=extras,
            connect_timeout=connect_timeout,
            message_timeout=message_timeout,
            idle_timeout=idle_timeout,
            reconnect_timeout=reconnect_timeout,
        )
    except ValueError as error:  # the structure file holds what the model cannot evaluate
        logging.getLogger("aniserve.driver").error("%s", error)
        sys.exit(exits.BAD_STRUCTURE)
    # A batch system stops a job with SIGTERM: leave through the driver's clean-up (sockets
    # half-closed so that i-PI reassigns the beads), not by the signal.
    if threading.current_thread() is threading.main_thread():  # (signal handlers live in the main thread)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(exits.TERMINATED))
    code = driver.run()
    if collector is not None:
        logging.getLogger("aniserve.driver").info(
            "collected %d of %d structures (%.1f%%) into %s",
            collector.collected,
            collector.evaluated,
            100 * collector.fraction,
            collector.path,
        )
    sys.exit(code)


def _threads_in_words() -> str:
    import torch

    n = torch.get_num_threads()
    return f"{n} thread{'s' * (n != 1)}"


@main.command()
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--torchscript",
    "torchscript",
    is_flag=True,
    required=True,
    help="Write a TorchScript module (the one export format so far).",
)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float64", show_default=True)
def export(model, out, torchscript, dtype):
    """Export MODEL (a name or path) for use without aniserve: a TorchScript file that
    torch.jit.load reads (OpenMM-Torch, LAMMPS front ends), called as TorchANI's models
    are: module((numbers, coordinates)) with atomic numbers (B, N) and Å (B, N, 3) →
    (numbers, energies in Hartree), differentiable for forces.  Molecules (no cell).

    Example: aniserve export ani-1ccx ani1ccx.pt --torchscript
    """
    from aniserve.export import export_torchscript
    from aniserve.models import DTYPES, load_model

    check_out(out)
    potential = load_model(model, dtype=dtype)
    export_torchscript(potential, out, DTYPES[dtype])
    click.echo(f"wrote {out} ({potential.description.get('name') or model}, {dtype}, TorchScript)", err=True)


@main.command()
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list of {kind, name, plugin, version, description}."
)
def plugins(as_json):
    """List every registered component: kind, name, providing plugin and version."""
    from aniserve.registry import registry

    rows = registry().listing()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        click.echo(f"{r['kind']:18s} {r['name']:16s} {r['plugin']} {r['version']:8s} {r['description']}")


def _training_options(f):
    """Options shared by ``train`` and ``transfer``."""
    options = [
        click.option(
            "--data",
            "data_path",
            required=True,
            multiple=True,
            type=click.Path(exists=True, dir_okay=False),
            help="ANI-format HDF5 file (ANI-1x/1ccx release or TorchANI layout); give it again to "
            "train on several files as one set.",
        ),
        click.option("--energy-key", required=True, help="Energy dataset, e.g. wb97x_631gd.energy (Hartree)."),
        click.option("--forces-key", default=None, help="Forces dataset, e.g. wb97x_631gd.forces (Hartree/Å)."),
        click.option(
            "--out",
            required=True,
            type=click.Path(dir_okay=False),
            help="Model file to write (.safetensors); its checkpoint is OUT.ckpt.",
        ),
        click.option("--epochs", default=100, show_default=True),
        click.option("--batch-size", default=32, show_default=True),
        click.option("--lr", default=1e-3, show_default=True, help="AdamW learning rate."),
        click.option("--force-weight", default=0.1, show_default=True, help="Weight of the force loss."),
        click.option(
            "--validation",
            default=0.15,
            show_default=True,
            help="Fraction of molecules (formula groups) held out for validation.",
        ),
        click.option(
            "--select",
            "selection",
            type=click.Choice(["loss", "conformer", "forces", "balanced", "all"]),
            default="loss",
            show_default=True,
            help="What picks the saved epoch and drives early stopping: the validation loss; the "
            "validation molecules' conformer RMSE (relative energies; better for transfer to a "
            "small high-level set, docs/notebook.md); their force RMSE; 'balanced', conformer "
            "plus force RMSE, each relative to the starting model's (transfer with forces); or "
            "'all', those two and the total-energy RMSE, each relative to the start's.",
        ),
        click.option("--seed", default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True),
        click.option("--resume", is_flag=True, help="Continue from OUT.ckpt after an interruption."),
        click.option("--overwrite", is_flag=True, help="Replace an existing OUT (otherwise refused)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def check_out(path) -> None:
    """Refuse an output that cannot be written before any work is done (its folder
    missing or not writable), not after hours of training or labelling."""
    import os

    folder = pathlib.Path(path).resolve().parent
    if not folder.is_dir():
        raise click.BadParameter(f"{path}: the folder {folder} does not exist", param_hint="--out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{path}: the folder {folder} is not writable", param_hint="--out")


def _settings(kw):
    from aniserve.training import Settings

    check_out(kw["out"])
    if pathlib.Path(kw["out"]).exists() and not (kw["resume"] or kw["overwrite"]):
        raise click.ClickException(
            f"{kw['out']} exists; give --overwrite to replace it, or --resume to continue its interrupted training"
        )
    return Settings(
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        force_weight=kw["force_weight"],
        validation=kw["validation"],
        seed=kw["seed"],
        device=kw["device"],
        dtype=kw["dtype"],
        selection=kw["selection"],
    )


@main.command()
@_training_options
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Model description JSON (elements, featurizer, element_network); default: ANI-1x AEVs "
    "with 64-48-24 CELU networks, 4 members, for the data's elements.",
)
@click.option("--ensemble-size", default=None, type=int, help="Members (default 4, or the config's).")
def train(config, ensemble_size, **kw):
    """Train a model from scratch on ANI HDF5 data.

    Example: aniserve train --data data/qm-train.h5 --energy-key wb97x_631gd.energy
    --forces-key wb97x_631gd.forces --out dft.safetensors

    Distributed: torchrun --nproc_per_node 2 -m aniserve train ...
    """
    from aniserve.models import DTYPES
    from aniserve.training import ANIData, description_for, new_model
    from aniserve.training import train as run

    settings = _settings(kw)
    data = ANIData(kw["data_path"], kw["energy_key"], kw["forces_key"])
    description = description_for(
        data,
        json.loads(pathlib.Path(config).read_text()) if config else None,
        ensemble_size=ensemble_size,
        name=pathlib.Path(kw["out"]).stem,
    )
    model = new_model(description, seed=kw["seed"], dtype=DTYPES[kw["dtype"]], device=kw["device"])
    run(model, data, kw["out"], settings, resume=kw["resume"])


@main.command()
@_training_options
@click.option("--from", "pretrained", required=True, help="Pretrained model: name or path.")
@click.option(
    "--strategy",
    default="freeze",
    show_default=True,
    help="Transfer strategy (see `aniserve plugins`): full, freeze, scratch, delta, or a plugin's.",
)
@click.option("--freeze-layers", default=None, help="For freeze: comma-separated layer numbers (default 1,3).")
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=JSON",
    help="Strategy option, e.g. --option l2sp_weight=0.01 (value parsed as JSON when it can be).",
)
def transfer(pretrained, strategy, freeze_layers, options, **kw):
    """Transfer a pretrained model to new data (e.g. DFT → CCSD(T)).

    Example: aniserve transfer --from dft.safetensors --data data/qm-train.h5
    --energy-key "ccsd(t)_ccpvdz.energy" --strategy freeze --out cc.safetensors
    """
    from aniserve.models import load_model
    from aniserve.training import ANIData, transfer_model
    from aniserve.training import train as run

    settings = _settings(kw)
    data = ANIData(kw["data_path"], kw["energy_key"], kw["forces_key"])
    from aniserve.bench.command import parse_items

    parsed = parse_items(options)
    if freeze_layers:
        parsed["freeze_layers"] = [int(x) for x in freeze_layers.split(",")]
    model = load_model(pretrained, device=kw["device"], dtype=kw["dtype"])
    model, penalty = transfer_model(model, strategy, parsed, kw["seed"])
    model.description["name"] = pathlib.Path(kw["out"]).stem
    run(
        model,
        data,
        kw["out"],
        settings,
        resume=kw["resume"],
        penalty=penalty,
        extra={"transfer": {"from": str(pretrained), "strategy": strategy, "options": parsed}},
    )


@main.command()
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", default=None, help="The base model: name or path (default: the embedded default).")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="The run's folder (created; rerun to resume)."
)
@click.option("--level", default=None, help="Label with PySCF at METHOD/BASIS (e.g. wb97x/6-31g*), on Dask.")
@click.option("--teacher", default=None, help="Or label with this model's energies and forces (free; for trials).")
@click.option("--temperatures", default="300,1000", show_default=True, help="Langevin MD temperatures, K.")
@click.option("--steps", default=400, show_default=True, type=click.IntRange(min=1), help="MD steps per temperature.")
@click.option("--interval", default=10, show_default=True, type=click.IntRange(min=1), help="Steps between frames.")
@click.option(
    "--per-iteration", default=16, show_default=True, type=click.IntRange(min=1), help="Labels per iteration."
)
@click.option("--iterations", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--stop-fraction",
    default=0.05,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Stop when the committee flags fewer of the explored frames than this.",
)
@click.option(
    "--held-out", default=12, show_default=True, type=click.IntRange(min=2), help="Held-out frames per temperature."
)
@click.option(
    "--select", "strategy", default="band-fps", show_default=True, help="Selection strategy (aniserve plugins)."
)
@click.option(
    "--strategy", "transfer", default="delta", show_default=True, help="Transfer strategy for each fine-tune."
)
@click.option("--epochs", default=60, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=1, show_default=True, help="Dask worker processes for PySCF labels.")
@click.option("--threads", default=1, show_default=True, help="PySCF threads per calculation.")
def learn(structure, model, temperatures, **kw):
    """Active learning on your own molecule: explore with MD, collect what the committee
    doubts, label it, fine-tune, repeat (docs/active-learning.md).

    Example: aniserve learn examples/learn/formaldoxime.xyz --level wb97x/6-31g* --out learn-run
    """
    from aniserve import learn as loop
    from aniserve.embedded import DEFAULT_MODEL

    try:
        plan = loop.Plan(
            structure=structure,
            model=model or DEFAULT_MODEL,
            temperatures=tuple(float(t) for t in temperatures.split(",")),
            **kw,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    summary = loop.run(plan)
    click.echo(loop.table(summary))
    click.echo(f"summary: {pathlib.Path(kw['out']) / 'summary.json'}, plot: {pathlib.Path(kw['out']) / 'summary.png'}")


@main.group(invoke_without_command=True)
@click.pass_context
def cache(ctx):
    """What aniserve keeps in $ANISERVE_CACHE (default ~/.cache/aniserve): compiled kernels,
    downloaded models, benchmark models.  Alone: list them with their sizes."""
    if ctx.invoked_subcommand is None:
        from aniserve.cache import cache_root, entries

        click.echo(f"{cache_root()}")
        for name, megabytes in entries():
            click.echo(f"  {name:20s} {megabytes:10.1f} MB")


@cache.command("clear")
@click.argument("names", nargs=-1)
def cache_clear(names):
    """Remove NAMES (folders listed by `aniserve cache`), or everything.

    Example: aniserve cache clear bench-transfer bench-active
    """
    from aniserve.cache import clear

    for name, megabytes in clear(names or None):
        click.echo(f"removed {name} ({megabytes:.1f} MB)")


@main.group()
def data():
    """Generate quantum-chemistry reference data (needs aniserve[qm])."""


def _scheduling_options(f):
    f = click.option(
        "--retries",
        default=2,
        show_default=True,
        help="Retries of a failed calculation (SCF not converged, worker lost) before it is reported.",
    )(f)
    f = click.option(
        "--scheduler-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Join the Dask cluster described by this file (dask scheduler --scheduler-file).",
    )(f)
    f = click.option(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:PORT",
        help="Join an existing Dask scheduler instead of starting a local cluster.",
    )(f)
    f = click.option("--threads", default=1, show_default=True, help="PySCF threads per calculation.")(f)
    f = click.option(
        "--workers",
        default=1,
        show_default=True,
        help="Worker processes of the local Dask cluster (ignored with --scheduler).",
    )(f)
    return f


def _run_tasks(tasks, out, workers, threads, scheduler, scheduler_file, retries, sampling_note=None):
    from aniserve.qmdata import schedule

    summary = schedule.run_job(
        tasks,
        out,
        workers=workers,
        threads=threads,
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        retries=retries,
        sampling_note=sampling_note,
    )
    if summary is None:
        click.echo(f"{len(tasks)} calculations to do, all already done; wrote {out}", err=True)
        return
    click.echo(summary.text(), err=True)
    click.echo(f"wrote {out}", err=True)
    if summary.failures:
        raise SystemExit(1)


def _need_qm():
    missing = [m for m in ("pyscf", "rdkit", "dask.distributed") if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise click.ClickException(f"this command needs {', '.join(missing)}: pip install 'aniserve[qm]'")


@data.command("generate")
@click.option(
    "--molecules",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="List of molecules: one SMILES or .xyz path per line, optional name after it.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="ANI-format HDF5 file to write (records already in it are kept and not recomputed).",
)
@click.option("--conformations", default=32, show_default=True, help="Conformations per molecule.")
@click.option("--low", "low_text", default="wb97x/6-31g*", show_default=True, help="Low level, METHOD/BASIS.")
@click.option(
    "--high",
    "high_text",
    default="ccsd(t)/cc-pvdz",
    show_default=True,
    help="High level, METHOD/BASIS; 'none' for low level only.",
)
@click.option(
    "--high-every", default=4, show_default=True, help="Compute the high level on every Nth conformation (1 = all)."
)
@click.option(
    "--high-forces/--no-high-forces",
    default=False,
    show_default=True,
    help="Forces at the high level too (CCSD(T): analytic gradients, ~3-5x the energy's cost).",
)
@click.option(
    "--density-fit/--no-density-fit",
    default=True,
    show_default=True,
    help="Density fitting for the HF/DFT steps (recorded in the file).",
)
@_scheduling_options
def data_generate(
    molecules,
    out,
    conformations,
    low_text,
    high_text,
    high_every,
    high_forces,
    density_fit,
    workers,
    threads,
    scheduler,
    scheduler_file,
    retries,
):
    """Sample conformations and compute them with PySCF on a Dask cluster, resumably.

    Example: aniserve data generate --molecules data/molecules/train.smi
    --out data/qm-train.h5 --conformations 32 --high-every 4 --workers 2

    Kill it any time and run the same command again: finished records (the journal
    OUT.work/ and OUT itself) are kept and not recomputed.
    """
    _need_qm()
    from aniserve.qmdata import generate, sampling
    from aniserve.qmdata.levels import Level
    from aniserve.qmdata.records import Journal, done_levels

    check_out(out)
    low = Level.parse(low_text, density_fit)
    high = None if high_text.lower() == "none" else Level.parse(high_text, density_fit)
    jobs = generate.plan(sampling.read_molecule_list(molecules), conformations, low, high, high_every, high_forces)
    out = pathlib.Path(out)
    tasks = generate.tasks(jobs, done_levels(Journal(out.with_suffix(".work")), out))
    click.echo(f"{len(jobs)} calculations; {len(jobs) - len(tasks)} already done", err=True)
    _run_tasks(tasks, out, workers, threads, scheduler, scheduler_file, retries, generate.SAMPLING_NOTE)


@data.command("label")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--level", "level_text", required=True, help="METHOD/BASIS, e.g. wb97x/6-31g* or ccsd(t)/cc-pvdz.")
@click.option(
    "--forces/--no-forces",
    default=False,
    show_default=True,
    help="Also compute forces (analytic gradients at every level, CCSD(T) included).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="ANI-format HDF5 file to write or extend (its records and levels are kept).",
)
@click.option(
    "--having",
    "having_text",
    default=None,
    metavar="METHOD/BASIS",
    help="Only the HDF5 input records that already have this level (e.g. CCSD(T) forces where CCSD(T) energies are).",
)
@click.option(
    "--per-molecule",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many structures of each molecule (lowest indices first).",
)
@click.option(
    "--order",
    type=click.Choice(["coverage", "cheapest"]),
    default="coverage",
    show_default=True,
    help="Submit round-robin over molecules, smallest first in each round (a partial run covers as many "
    "molecules as it can), or every structure of smaller molecules first (a partial run has finished as many "
    "as it can).",
)
@click.option(
    "--density-fit/--no-density-fit",
    default=True,
    show_default=True,
    help="Density fitting for HF/DFT (recorded in the file).",
)
@_scheduling_options
def data_label(
    inputs,
    level_text,
    forces,
    out,
    having_text,
    per_molecule,
    order,
    density_fit,
    workers,
    threads,
    scheduler,
    scheduler_file,
    retries,
):
    """Compute given structures at one level: extended XYZ or any ASE-readable file, or ANI HDF5 (levels kept).

    Structures are submitted round-robin over molecules, so a partial run covers each
    (or, with --order cheapest, smallest molecules first).

    Example: aniserve data label collected.extxyz --level wb97x/6-31g* --forces --out labelled.h5

    Example: aniserve data label data/qm-train.h5 --level 'ccsd(t)/cc-pvdz' --forces
    --having 'ccsd(t)/cc-pvdz' --per-molecule 4 --out data/qm-train.h5
    """
    _need_qm()
    from aniserve.qmdata import label
    from aniserve.qmdata.levels import Level
    from aniserve.qmdata.records import Journal

    check_out(out)
    level = Level.parse(level_text, density_fit)
    structures, kept = label.read_inputs(inputs)
    having = None if having_text is None else Level.parse(having_text).key
    try:
        structures = label.select(structures, kept, having, per_molecule, order)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    journal = Journal(pathlib.Path(out).with_suffix(".work"))
    known = journal.records()
    for record in kept:  # the inputs' own levels go into the output too
        if not set(record["levels"]) <= set(known.get(record["id"], {}).get("levels", {})):
            journal.write(record)
    _run_tasks(label.tasks(structures, level, forces), out, workers, threads, scheduler, scheduler_file, retries)


class _Benchmarks(click.Group):
    """Each benchmark module (``aniserve.bench.NAME``) defines its own ``command``; they
    are registered here by name and imported only when used."""

    MODULES = {
        "transfer": "transfer",
        "active": "active",
        "speed": "speed",
        "serve": "serve",
        "ase": "ase_socket",
        "ipi": "ipi",
        "md": "md",
    }

    def list_commands(self, ctx):
        return sorted(self.MODULES)

    def get_command(self, ctx, name):
        if name not in self.MODULES:
            return None
        return importlib.import_module(f"aniserve.bench.{self.MODULES[name]}").command


@main.group(cls=_Benchmarks)
def bench():
    """Built-in benchmarks: measured figures and ratios, printed and saved as JSON."""
