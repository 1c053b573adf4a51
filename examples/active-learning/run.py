"""Active learning, end to end, in a few minutes on 2 cores.

Round 0: Langevin MD of ethanol at 1,000 K with the official ANI-1x (ASE, in process);
every structure whose ensemble spread per √atoms exceeds the threshold (0.15 kcal/mol;
ANI-1x used 0.23 over many molecules, and knows ethanol well) is collected, at most one
per 4 steps.  Then: label the collected structures
with PySCF at ANI-1x's own level, ωB97X/6-31G* (`aniserve data label`, energies), fine-
tune ANI-1x on them (`aniserve transfer`, Δ-learning: a small correction network per
member), and run the same MD with the new model: the collected fraction falls, because
the ensemble now agrees where it was taught.  Each further round labels what it
collected, adds it to the same file, and fine-tunes ANI-1x again on everything.

Needs the official ANI-1x (ANISERVE_MODEL_DIR=/path/to/ani-model-zoo, or the cache)
and aniserve[qm].  Run:  python examples/active-learning/run.py [WORKDIR] [--steps N]
Everything is written under WORKDIR (default: a new folder in the system's temp dir).
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from ase import units
from ase.md.langevin import Langevin

from aniserve import ANICalculator
from aniserve.collect import Collector
from aniserve.learn import thermalize
from aniserve.qmdata.levels import Level
from aniserve.structures import read_structures

here = pathlib.Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("workdir", nargs="?", default=None)
parser.add_argument("--steps", type=int, default=400, help="MD steps per round (0.5 fs each)")
parser.add_argument("--threshold", type=float, default=0.15, help="σ_E/√N threshold, kcal/mol")
parser.add_argument("--every", type=int, default=4, help="at least this many steps between collected structures")
parser.add_argument("--level", default="wb97x/6-31g*", help="labelling level, METHOD/BASIS")
parser.add_argument("--rounds", type=int, default=2)
args = parser.parse_args()
work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="aniserve-al-")).resolve()
work.mkdir(parents=True, exist_ok=True)
print(f"working in {work}")


def aniserve(*arguments):
    subprocess.run([sys.executable, "-m", "aniserve", *map(str, arguments)], check=True)


def md_round(model, collected):
    """Langevin MD at 1,000 K; returns the collector (what it kept, of how many)."""
    atoms = read_structures(here.parent / "molecules" / "ethanol.xyz")[0]
    thermalize(atoms, 1000, np.random.default_rng(0))  # (ASE's name for it changed in 3.29)
    collector = Collector(collected, energy_std=args.threshold, every=args.every)
    atoms.calc = ANICalculator(model, collect=collector)
    Langevin(atoms, 0.5 * units.fs, temperature_K=1000, friction=0.02, rng=np.random.default_rng(1)).run(args.steps)
    return collector


labels, model = work / "labels.h5", "ani-1x"
print(f"{'round':>5s} {'model':>24s} {'MD steps':>9s} {'collected':>10s} {'fraction':>9s}")
for round_ in range(args.rounds + 1):
    collected = work / f"collected-{round_}.extxyz"
    collector = md_round(model, collected)
    print(
        f"{round_:5d} {pathlib.Path(model).name:>24s} {collector.evaluated:9d} {collector.collected:10d} "
        f"{collector.fraction:9.1%}",
        flush=True,
    )
    if round_ == args.rounds or not collector.collected:
        break
    # Label what was collected (merging into one growing file), then transfer from ANI-1x again.
    aniserve("data", "label", collected, "--level", args.level, "--out", labels, "--workers", "2")
    key = Level.parse(args.level).key  # the file's dataset prefix, e.g. wb97x_631gd
    model = work / f"model-{round_ + 1}.safetensors"
    aniserve(
        "transfer",
        "--from",
        "ani-1x",
        "--data",
        labels,
        "--energy-key",
        f"{key}.energy",
        "--strategy",
        "delta",
        "--epochs",
        "30",
        "--batch-size",
        "8",
        "--select",
        "conformer",
        "--out",
        model,
    )
    model = str(model)
print(f"done; the collected structures, labels and models are in {work}")
