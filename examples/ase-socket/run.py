"""ASE optimisation of ethanol through SocketIOCalculator, with aniserve as the client.

ASE is the socket server and starts `aniserve drive` itself (``launch_client``), so it
notices when the driver exits (a missing model, say) and stops with the driver's own
message instead of waiting for ever.  Each run uses its own socket name, removed at the
end, so a killed run cannot block the next one.

Run:  python examples/ase-socket/run.py [--model NAME_OR_PATH]   (default: the embedded model)
"""

import argparse
import os
import pathlib
import subprocess
import sys

from ase.calculators.socketio import SocketIOCalculator
from ase.optimize import BFGS

from aniserve.embedded import DEFAULT_MODEL
from aniserve.structures import read_structures

here = pathlib.Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description="BFGS of ethanol through ASE's SocketIOCalculator and aniserve drive")
parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (relative paths from where you are)")
args = parser.parse_args()
model = str(pathlib.Path(args.model).resolve()) if pathlib.Path(args.model).exists() else args.model
structure = here.parent / "molecules" / "ethanol.xyz"
name = f"aniserve-ase-{os.getpid()}"


def launch(atoms, properties, port, unixsocket):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aniserve",
            "drive",
            "--model",
            model,
            "--structure",
            str(structure),
            "--unix",
            unixsocket,
            "--reconnect-timeout",
            "1",
        ]
    )


atoms = read_structures(structure)[0]
try:
    with SocketIOCalculator(unixsocket=name, launch_client=launch) as calc:
        atoms.calc = calc
        BFGS(atoms, logfile="-").run(fmax=0.01, steps=50)
        print(
            f"model {model}: final energy {atoms.get_potential_energy():.6f} eV, "
            f"max |F| {abs(atoms.get_forces()).max():.4f} eV/Å"
        )
except OSError as error:  # the driver exited: its own message is on stderr above
    sys.exit(f"stopped: {error}")
finally:
    pathlib.Path(f"/tmp/ipi_{name}").unlink(missing_ok=True)
