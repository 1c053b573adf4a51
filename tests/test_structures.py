"""One structure reader for eval, drive --structure, data label and the examples: every
format keeps its cell, i-PI's CELL comments included (ASE alone reads them as a
cluster), and ``eval --out`` writes results that ASE reads back."""

import json
import subprocess
import sys

import ase
import ase.io
import numpy as np
import pytest
from conftest import ROOT, cached_model

from aniserve.calculator import periodic_cell
from aniserve.embedded import DEFAULT_MODEL
from aniserve.structures import StructureFileError, read_structures
from aniserve.units import BOHR_IN_ANGSTROM

WATER27 = ROOT / "examples" / "ipi-pimd-water" / "water27.xyz"


def water_box():
    atoms = read_structures(WATER27)[0]
    assert atoms.pbc.all() and np.allclose(atoms.cell.lengths(), 9.312918)
    return atoms


@pytest.mark.slow
def test_the_ipi_water_box_is_read_as_a_box_and_eval_gives_its_periodic_energy(tmp_path):
    """Before: eval read water27.xyz as a cluster (−2058.58334 Ha against −2058.56622 Ha
    with the cell, 10.7 kcal/mol), without a word."""
    atoms = water_box()
    model = cached_model(DEFAULT_MODEL, "float64")
    want = model.evaluate(atoms.numbers, atoms.positions, np.array(atoms.cell))
    cluster = model.evaluate(atoms.numbers, atoms.positions)
    assert abs(float(want.energy) - float(cluster.energy)) > 1e-3  # the cell matters here
    run = subprocess.run(
        [sys.executable, "-m", "aniserve", "eval", str(WATER27), "--out", str(tmp_path / "w.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    printed = float(run.stdout.split("E =")[1].split("Ha")[0])
    assert abs(printed - float(want.energy)) < 1e-7 and "periodic" in run.stdout
    frame = json.loads((tmp_path / "w.json").read_text())["frames"][0]
    assert frame["periodic"] and abs(frame["energy_hartree"] - float(want.energy)) < 1e-9


@pytest.mark.parametrize("fmt", ["extxyz", "cif", "proteindatabank", "vasp", "ipi-abc", "ipi-h", "ipi-bohr"])
def test_every_format_keeps_its_cell(fmt, tmp_path):
    atoms = water_box()
    atoms.set_cell(np.array([[9.3, 0, 0], [0.4, 9.1, 0], [0.2, 0.3, 8.9]]), scale_atoms=False)
    path = tmp_path / {"extxyz": "b.extxyz", "cif": "b.cif", "proteindatabank": "b.pdb", "vasp": "POSCAR"}.get(
        fmt, "b.xyz"
    )
    if fmt.startswith("ipi"):
        cell = np.array(atoms.cell)
        scale = 1 / BOHR_IN_ANGSTROM if fmt == "ipi-bohr" else 1.0
        unit = "atomic_unit" if fmt == "ipi-bohr" else "angstrom"
        if fmt == "ipi-abc":
            a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
            comment = f"# CELL(abcABC): {a} {b} {c} {alpha} {beta} {gamma} Step: 0 positions{{{unit}}} cell{{{unit}}}"
        else:
            h = (cell.T * scale).ravel()  # i-PI's h: vectors as columns, written row by row
            comment = f"# CELL(H): {' '.join(repr(float(v)) for v in h)} positions{{{unit}}} cell{{{unit}}}"
        lines = [
            f"{s} {float(x) * scale!r} {float(y) * scale!r} {float(z) * scale!r}"
            for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)
        ]
        path.write_text(f"{len(atoms)}\n{comment}\n" + "\n".join(lines) + "\n")
    else:
        ase.io.write(path, atoms, format=fmt)
    back = read_structures(path)[0]
    assert back.pbc.all(), fmt
    tolerance = {"proteindatabank": 1e-2, "cif": 1e-3, "ipi-abc": 1e-6}.get(fmt, 1e-6)  # formats that round
    np.testing.assert_allclose(back.cell.cellpar(), atoms.cell.cellpar(), atol=tolerance)
    np.testing.assert_allclose(periodic_cell(back) @ np.linalg.inv(periodic_cell(back)), np.eye(3), atol=1e-9)
    wrapped = lambda a: a.get_scaled_positions(wrap=True)  # noqa: E731 (formats may rotate or wrap)
    if fmt not in ("ipi-abc",):
        np.testing.assert_allclose(back.positions, atoms.positions, atol=2e-3)
    assert wrapped(back).shape == wrapped(atoms).shape


def test_a_plain_xyz_stays_a_molecule_and_a_bad_cell_comment_is_named(tmp_path):
    assert not read_structures(ROOT / "examples" / "molecules" / "ethanol.xyz")[0].pbc.any()
    bad = tmp_path / "bad.xyz"
    bad.write_text("1\n# CELL(abcABC): 10 10 x 90 90 90 positions{angstrom}\nH 0 0 0\n")
    with pytest.raises(StructureFileError, match=r"bad.xyz, frame 0: CELL\(abcABC\) needs 6 finite numbers"):
        read_structures(bad)
    bad.write_text("1\n# CELL(abcABC): 10 10 10 90 90 90 positions{furlong}\nH 0 0 0\n")
    with pytest.raises(StructureFileError, match="unknown length unit 'furlong'"):
        read_structures(bad)


@pytest.mark.slow
def test_eval_out_files_read_back_in_ase_with_the_same_numbers(tmp_path):
    frames = [water_box(), read_structures(ROOT / "examples" / "molecules" / "ethanol.xyz")[0]]
    source = tmp_path / "two.extxyz"
    ase.io.write(source, frames)
    for name in ("r.extxyz", "r.json"):
        run = subprocess.run(
            [sys.executable, "-m", "aniserve", "eval", str(source), "--out", str(tmp_path / name)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stderr
    back = ase.io.read(tmp_path / "r.extxyz", index=":")
    report = json.loads((tmp_path / "r.json").read_text())["frames"]
    from aniserve import ANICalculator

    for atoms, written, row in zip(frames, back, report):
        atoms.calc = ANICalculator(cached_model(DEFAULT_MODEL, "float64"))
        assert abs(written.get_potential_energy() - atoms.get_potential_energy()) < 1e-6
        np.testing.assert_allclose(written.get_forces(), atoms.get_forces(), atol=1e-6)
        np.testing.assert_allclose(row["forces_ev_per_angstrom"], atoms.get_forces(), atol=1e-9)
        if atoms.pbc.all():
            np.testing.assert_allclose(written.get_stress(), atoms.get_stress(), atol=1e-8)
            np.testing.assert_allclose(row["stress_ev_per_cubic_angstrom"], atoms.get_stress(), atol=1e-12)
        else:
            assert row["stress_ev_per_cubic_angstrom"] is None
        assert written.info["energy_std"] == pytest.approx(row["energy_std_ev"])


@pytest.mark.slow
def test_eval_out_keeps_the_frames_before_a_bad_one(tmp_path):
    good = read_structures(ROOT / "examples" / "molecules" / "ethanol.xyz")[0]
    bad = good.copy()
    bad.positions[1] = bad.positions[0]  # two atoms on top of each other
    ase.io.write(tmp_path / "three.extxyz", [good, good, bad])
    run = subprocess.run(
        [sys.executable, "-m", "aniserve", "eval", str(tmp_path / "three.extxyz"), "--out", str(tmp_path / "r.extxyz")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 3 and "frame 2" in run.stderr and "wrote frames 0–1" in run.stderr
    assert len(ase.io.read(tmp_path / "r.extxyz", index=":")) == 2
