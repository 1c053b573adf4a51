"""aniserve inside i-PI (``aniserve.ipi_pes``, i-PI's ``<ffdirect>``): the same numbers
as the socket driver, in real i-PI runs and call by call; bad parameters refused with
their names."""

import pathlib
import subprocess
import time

import ase.io
import numpy as np
import pytest
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, reference
from test_driver_ipi import INPUT, IPI, run_ipi, write_xyz

from aniserve import ipi_pes
from aniserve.contracts import Structure
from aniserve.serving import Evaluator
from aniserve.units import BOHR_IN_ANGSTROM

PES_PATH = ipi_pes.__file__


def ffdirect_input(steps: int, beads: int, batch: int, parameters: str, pbc: str = "false") -> str:
    """test_driver_ipi's i-PI input with the socket force field swapped for ffdirect."""
    socket_ff = INPUT[INPUT.index("  <ffsocket") : INPUT.index("</ffsocket>") + len("</ffsocket>")]
    direct = (
        f"  <ffdirect name='ani' pbc='{pbc}'><pes>custom</pes><pes_path>{PES_PATH}</pes_path>"
        f"<parameters>{{{parameters}}}</parameters><batch_size>{batch}</batch_size></ffdirect>"
    )
    return INPUT.replace(socket_ff, "{direct}").format(steps=steps, beads=beads, direct=direct)


def run_ffdirect(folder, numbers, positions, cell, parameters, steps=5, beads=4, batch=4, pbc="false"):
    folder.mkdir(exist_ok=True)
    write_xyz(folder / "init.xyz", numbers, positions, cell)
    (folder / "input.xml").write_text(ffdirect_input(steps, beads, batch, parameters, pbc))
    ipi = subprocess.run(IPI + ["input.xml"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert ipi.returncode == 0, ipi.stdout[-3000:] + ipi.stderr[-3000:]
    data = np.loadtxt(folder / "sim.out", ndmin=2)
    assert len(data) == steps + 1
    return data[:, 1]


@pytest.mark.weights
@pytest.mark.slow
def test_ffdirect_runs_the_socket_drivers_trajectory(tmp_path):
    """Same i-PI input and seed, batched 4 beads: through the socket driver and inside
    i-PI, the bead-averaged potential agrees step by step (float64: the same evaluation
    of the same positions, so any unit or cell slip would show)."""
    (tmp_path / "socket").mkdir()
    socket_run, _ = run_ipi(
        tmp_path / "socket", ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3) * 30, "unix", [], steps=5, batch=4
    )
    # (collecting every structure changes nothing i-PI sees)
    parameters = "template: init.xyz, model: ani-1ccx, dtype: float64, collect: all.extxyz, collect_energy_std: 1e-12"
    direct = run_ffdirect(tmp_path / "direct", ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3) * 30, parameters)
    assert np.ptp(direct) > 1e-5  # the beads really moved
    np.testing.assert_allclose(direct, socket_run, rtol=0, atol=1e-8)
    frames = ase.io.read(tmp_path / "direct" / "all.extxyz", index=":")
    assert len(frames) >= 4 * 5 and {f.info["slot"] for f in frames} == {0, 1, 2, 3}
    assert all(f.info["source"] == "i-PI" and list(f.numbers) == list(ETHANOL_NUMBERS) for f in frames)


@pytest.mark.weights
@pytest.mark.slow
def test_ffdirect_serves_a_periodic_box_with_its_cell(tmp_path):
    record = next(r for r in reference()["records"] if r["name"] == "water27-pbc")
    potentials = run_ffdirect(
        tmp_path,
        record["numbers"],
        record["positions"],
        np.array(record["cell"]),
        "template: init.xyz, model: ani-1ccx, dtype: float64",
        steps=2,
        beads=2,
        batch=2,
        pbc="true",
    )
    # i-PI prints 9 significant digits: for this 2,065 Ha box that is a 1e-5 Ha resolution.
    assert abs(potentials[0] - record["models"]["ani-1ccx"]["energy"]) < 1e-5


def _write_ethanol(folder):
    write_xyz(folder / "init.xyz", ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3) * 30)
    return str(folder / "init.xyz")


def test_a_call_returns_the_evaluators_numbers_in_ipi_units(tmp_path):
    """One structure and a batch of two, the embedded default: energies in Hartree,
    forces in Hartree/Bohr, virial zero for a molecule, the energy std as extras."""
    import json

    pes = ipi_pes.ANIServePES(template=_write_ethanol(tmp_path), dtype="float64", verbosity=0)
    positions = np.array(ETHANOL_POSITIONS)
    moved = positions + np.random.default_rng(0).normal(scale=0.05, size=positions.shape)
    cell = np.zeros((3, 3))
    energy, forces, virial, extras = pes(cell, positions / BOHR_IN_ANGSTROM)
    batch = pes([cell, cell], [positions / BOHR_IN_ANGSTROM, moved / BOHR_IN_ANGSTROM])
    expected = [
        Evaluator(pes.evaluator.potential).evaluate([(0, Structure(np.array(ETHANOL_NUMBERS), p, None))])[0]
        for p in (positions, moved)
    ]
    for (e, f, v, x), result in zip([(energy, forces, virial, extras), batch[0]], expected[:1] * 2):
        assert e == pytest.approx(result.energy, abs=1e-10)
        np.testing.assert_allclose(f, result.forces * BOHR_IN_ANGSTROM, atol=1e-10)
        assert not np.any(v) and json.loads(x)["energy_std"] == pytest.approx(result.energy_std, abs=1e-10)
    assert batch[1][0] == pytest.approx(expected[1].energy, abs=1e-10)
    np.testing.assert_allclose(batch[1][1], expected[1].forces * BOHR_IN_ANGSTROM, atol=1e-10)


@pytest.mark.parametrize(
    "parameters,message",
    [
        ({}, "give the atoms as a structure file"),
        ({"modle": "ani-1x"}, "unknown parameter(s) modle"),
        ({"pbc": "maybe"}, "pbc must be one of auto, yes, no"),
        ({"extras": "all"}, "extras must be one of committee, std, none"),
        ({"template": "missing.xyz"}, "no such file"),
        ({"skin": "abc"}, "skin must be a number ≥ 0, got 'abc'"),
        ({"skin": float("nan")}, "skin must be a number ≥ 0"),
        ({"threads": 0}, "threads must be a whole number ≥ 1, got 0"),
        ({"threads": 1.5}, "threads must be a whole number ≥ 1, got 1.5"),
        ({"collect": "c.extxyz", "collect_relative": "maybe"}, "collect_relative must be true or false"),
        ({"collect": "c.extxyz", "collect_energy_std": 0}, "collect_energy_std 0 leaves nothing"),
    ],
)
def test_bad_parameters_are_named(tmp_path, parameters, message):
    if "template" not in parameters and parameters:
        parameters = {"template": _write_ethanol(tmp_path), **parameters}
    elif parameters.get("template") == "missing.xyz":
        parameters = {"template": str(tmp_path / "missing.xyz")}
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        ipi_pes.ANIServePES(**parameters)


def test_wrong_atom_count_and_unknown_elements_are_refused(tmp_path):
    pes = ipi_pes.ANIServePES(template=_write_ethanol(tmp_path))
    with pytest.raises(ValueError, match="i-PI sent 3 atoms, the template has 9"):
        pes(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="i-PI sent 0.333333 atoms"):
        pes(np.zeros((3, 3)), np.zeros(1))
    with pytest.raises(ValueError, match="NaN|finite"):
        pes(np.zeros((3, 3)), np.full((9, 3), np.nan))
    write_xyz(tmp_path / "salt.xyz", [11, 17], [[0, 0, 0], [2.4, 0, 0]], np.eye(3) * 30)
    with pytest.raises(ValueError, match="Na|Cl|element"):
        ipi_pes.ANIServePES(template=str(tmp_path / "salt.xyz"))


def test_committee_extras_carry_each_member_in_ipi_units(tmp_path):
    """``extras: committee``: i-PI's <ffcommittee> reads each member's energy, forces
    (Hartree/Bohr) and virial from the JSON; their mean is the served result."""
    import json

    pes = ipi_pes.ANIServePES(template=_write_ethanol(tmp_path), dtype="float64", extras="committee")
    energy, forces, _, extras = pes(np.zeros((3, 3)), np.array(ETHANOL_POSITIONS) / BOHR_IN_ANGSTROM)
    committee = json.loads(extras)
    members = np.array(committee["committee_pot"])
    assert len(members) > 1
    assert members.mean() == pytest.approx(energy, abs=1e-9) and np.std(members) > 0
    member_forces = np.array(committee["committee_force"]).reshape(len(members), -1)
    np.testing.assert_allclose(member_forces.mean(0), forces.ravel(), atol=1e-8)
    assert np.array(committee["committee_virial"]).shape == (len(members), 9)


def test_collect_writes_uncertain_structures_in_angstrom(tmp_path):
    """``collect`` as ``drive --collect``: absolute ρ above a given threshold, each batch
    slot a trajectory; relative, each slot's first structure is its start (never written)."""
    template = _write_ethanol(tmp_path)
    positions = np.array(ETHANOL_POSITIONS)
    moved = [positions + np.random.default_rng(s).normal(scale=0.05, size=positions.shape) for s in range(3)]
    cells = [np.zeros((3, 3))] * 2
    pes = ipi_pes.ANIServePES(template=template, collect=str(tmp_path / "a.extxyz"), collect_energy_std=1e-9)
    pes(cells, [m / BOHR_IN_ANGSTROM for m in moved[:2]])
    frames = ase.io.read(tmp_path / "a.extxyz", index=":")
    assert [f.info["slot"] for f in frames] == [0, 1] and not frames[0].info["rho_relative_to_first_structure"]
    np.testing.assert_allclose(frames[1].positions, moved[1], atol=1e-7)  # (extxyz: 8 decimals)
    pes = ipi_pes.ANIServePES(
        template=template, collect=str(tmp_path / "r.extxyz"), collect_energy_std=1e-9, collect_relative="true"
    )
    pes(cells, [m / BOHR_IN_ANGSTROM for m in moved[:2]])
    assert not (tmp_path / "r.extxyz").exists()  # first structures: ρ 0
    pes(cells, [m / BOHR_IN_ANGSTROM for m in moved[1:]])
    frames = ase.io.read(tmp_path / "r.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [1, 1] and frames[0].info["rho_relative_to_first_structure"]
    np.testing.assert_allclose(frames[0].positions, moved[1], atol=1e-7)


def test_threads_sets_the_processs_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        ipi_pes.ANIServePES(template=_write_ethanol(tmp_path), threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_python_m_prints_the_path_to_give_ipi():
    import sys

    out = subprocess.run([sys.executable, "-m", "aniserve.ipi_pes"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(pathlib.Path(PES_PATH).resolve())


@pytest.mark.slow
def test_ipis_python_driver_serves_the_same_file_over_a_socket(tmp_path):
    """``i-pi-py_driver -m custom -P PATH -o template=…,model=…``: the same numbers over
    i-PI's own socket client (embedded default: no official weights needed)."""
    import sys
    import uuid

    name = f"pes{uuid.uuid4().hex[:8]}"
    write_xyz(tmp_path / "init.xyz", ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3) * 30)
    (tmp_path / "input.xml").write_text(
        INPUT.format(steps=3, mode="unix", address=f"<address>{name}</address>", beads=2, batch="")
    )
    server = subprocess.Popen(IPI + ["input.xml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    socket_path = pathlib.Path(f"/tmp/ipi_{name}")
    for _ in range(600):
        if socket_path.exists() or server.poll() is not None:
            break
        time.sleep(0.05)
    driver = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "i-pi-py_driver"), "-m", "custom", "-P", PES_PATH]
        + ["-o", "template=init.xyz,dtype=float64", "-u", "-a", name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = server.communicate(timeout=60)[0].decode()
    assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-2000:] + out[-2000:]
    potentials = np.loadtxt(tmp_path / "sim.out", ndmin=2)[:, 1]
    pes = ipi_pes.ANIServePES(template=str(tmp_path / "init.xyz"), dtype="float64")
    expected = pes(np.eye(3) * 30 / BOHR_IN_ANGSTROM, np.array(ETHANOL_POSITIONS) / BOHR_IN_ANGSTROM)[0]
    assert len(potentials) == 4 and abs(potentials[0] - expected) < 1e-6
