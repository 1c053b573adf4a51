"""The ``aniserve`` command: one click group, each command a thin wrapper."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="aniserve")
def main():
    """Serve, train and transfer-learn ANI neural-network potentials."""


@main.group()
def data():
    """Generate quantum-chemistry reference data (needs aniserve[qm])."""


@data.command("generate")
@click.option("--molecules", required=True, type=click.Path(exists=True, dir_okay=False),
              help="List of molecules: one SMILES or .xyz path per line, optional name after it.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="ANI-format HDF5 file to write (records already in it are kept and not recomputed).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Folder for claims and finished records; default OUT's name with '.work'.")
@click.option("--conformations", default=32, show_default=True, help="Conformations per molecule.")
@click.option("--low", "low_text", default="wb97x/6-31g*", show_default=True, help="Low level, METHOD/BASIS.")
@click.option("--high", "high_text", default="ccsd(t)/cc-pvdz", show_default=True,
              help="High level, METHOD/BASIS; 'none' for low level only.")
@click.option("--high-every", default=4, show_default=True,
              help="Compute the high level on every Nth conformation (1 = all).")
@click.option("--density-fit/--no-density-fit", default=True, show_default=True,
              help="Density fitting for the HF/DFT steps (recorded in the file).")
@click.option("--workers", default=1, show_default=True, help="Worker processes on this machine.")
@click.option("--threads", default=1, show_default=True, help="PySCF threads per worker.")
def data_generate(molecules, out, workdir, conformations, low_text, high_text, high_every,
                  density_fit, workers, threads):
    """Sample conformations and compute them with PySCF, resumably.

    Example: aniserve data generate --molecules data/molecules/train.smi
    --out data/qm-train.h5 --conformations 32 --high-every 4 --workers 2

    Kill it any time and run the same command again: finished records are kept,
    and several commands may work on one output at once.
    """
    import multiprocessing
    import pathlib

    from aniserve.qmdata import generate, sampling
    from aniserve.qmdata.levels import Level

    low = Level.parse(low_text, density_fit)
    high = None if high_text.lower() == "none" else Level.parse(high_text, density_fit)
    jobs = generate.plan(sampling.read_molecule_list(molecules), conformations, low, high, high_every)
    out = pathlib.Path(out)
    folder = generate.WorkFolder(workdir or out.with_suffix(".work"))
    click.echo(f"{len(jobs)} jobs; {len(folder.done_ids() | generate.existing_ids(out))} already done", err=True)
    if workers == 1:
        _worker(jobs, folder, out, threads)
    else:
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_worker, args=(jobs, folder, out, threads)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        generate.build(folder, out)
    click.echo(f"wrote {out}", err=True)


def _worker(jobs, folder, out, threads):
    from pyscf import lib

    from aniserve.qmdata import generate

    lib.num_threads(threads)
    generate.work(jobs, folder, out)
