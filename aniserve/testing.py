"""Helpers for testing models and plugins end to end, and a pytest plugin offering them.

Installed with aniserve as the pytest plugin ``aniserve`` (entry point ``pytest11``), so a
plugin's own tests get the fixtures ``aniserve_model`` (the embedded default model,
float64, offline) and ``aniserve_drive_with_ase`` (``drive_with_ase`` below) without
importing anything; the functions can also be imported directly.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import uuid

import numpy as np
import pytest


def drive_with_ase(model: str, atoms, moves: int = 2, seed: int = 0, dtype: str = "float64") -> list[tuple]:
    """Serve ``model`` with ``aniserve drive`` to an ASE SocketIOCalculator (UNIX socket).

    Returns (atoms positions, energy eV, forces eV/Å) for the structure and ``moves``
    random displacements of it, as computed by the driver process."""
    from ase.calculators.socketio import SocketIOCalculator
    from ase.io import write

    name = f"ani{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        structure = pathlib.Path(folder) / "structure.xyz"
        write(structure, atoms)
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aniserve",
                "drive",
                "--model",
                str(model),
                "--dtype",
                dtype,
                "--structure",
                str(structure),
                "--unix",
                name,
                # ASE's calculator closes without EXIT: end then, not after the 10 s wait
                # for another server.
                "--reconnect-timeout",
                "0",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with SocketIOCalculator(unixsocket=name) as calc:
                atoms.calc = calc
                for step in range(moves + 1):
                    if step:
                        atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
                    results.append((atoms.positions.copy(), atoms.get_potential_energy(), atoms.get_forces()))
        finally:
            code = driver.wait(timeout=60)
            if code != 0:
                raise RuntimeError(
                    f"aniserve drive exited with {code}: {driver.stderr.read() if driver.stderr else ''}"
                )
    return results


def assert_drive_matches_in_process(model: str, atoms, tolerance_ev: float = 1e-6) -> None:
    """Energies and forces served through ``aniserve drive`` equal the in-process ones."""
    from aniserve import ANICalculator, load_model

    local = ANICalculator(load_model(model, dtype="float64"))
    for positions, energy, forces in drive_with_ase(model, atoms):
        probe = atoms.copy()
        probe.positions = positions
        probe.calc = local
        if abs(probe.get_potential_energy() - energy) > tolerance_ev:
            raise AssertionError(f"served energy {energy} eV differs from in-process {probe.get_potential_energy()} eV")
        np.testing.assert_allclose(probe.get_forces(), forces, atol=tolerance_ev)


@pytest.fixture(scope="session")
def aniserve_model():
    """The embedded default model in float64 (needs no download)."""
    from aniserve import load_model

    return load_model(dtype="float64")


@pytest.fixture
def aniserve_drive_with_ase():
    """``drive_with_ase(model, atoms, moves=2)``: results served by ``aniserve drive``."""
    return drive_with_ase
