"""ASE optimisation of ethanol through SocketIOCalculator, with aniserve as the client.

ASE is the socket server; `aniserve drive` is started first and waits for it.
Needs the official weights: ANISERVE_MODEL_DIR=/path/to/ani-model-zoo (or the cache).
Run:  python examples/ase-socket/run.py
"""

import pathlib
import subprocess
import sys

import ase.io
from ase.calculators.socketio import SocketIOCalculator
from ase.optimize import BFGS

here = pathlib.Path(__file__).resolve().parent
structure = here.parent / "molecules" / "ethanol.xyz"
atoms = ase.io.read(structure)
driver = subprocess.Popen([sys.executable, "-m", "aniserve", "drive", "--model", "ani-1ccx",
                           "--structure", str(structure), "--unix", "aniserve-ase", "--reconnect-timeout", "1"])
with SocketIOCalculator(unixsocket="aniserve-ase") as calc:
    atoms.calc = calc
    BFGS(atoms, logfile="-").run(fmax=0.01, steps=50)
    print(f"final energy {atoms.get_potential_energy():.6f} eV")
driver.wait(timeout=60)
