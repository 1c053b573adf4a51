"""``aniserve bench md`` and the harmonic frequencies behind it: the physics each figure
rests on is checked here (energy conservation, units of a wavenumber, the shipped
CCSD(T) reference), the figures themselves are reported by the benchmark."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import cached_model

from aniserve.bench import frequencies
from aniserve.cli import main
from aniserve.units import WAVENUMBER_CM1_OF_HARTREE_PER_A2_AMU


def test_a_spring_between_two_atoms_has_the_textbook_wavenumber():
    """H–H on a spring of k Hartree/Å² along z: one vibration, √(k/μ) in cm⁻¹; the five
    zero modes of a linear molecule are dropped, not six."""
    k = 0.8
    h = np.zeros((6, 6))
    block = k * np.array([[1.0, -1.0], [-1.0, 1.0]])
    h[np.ix_([2, 5], [2, 5])] = block
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]])
    (value,) = frequencies.wavenumbers([1, 1], positions, h)
    mu = frequencies.MASSES[1] / 2
    assert value == pytest.approx(np.sqrt(k / mu) * WAVENUMBER_CM1_OF_HARTREE_PER_A2_AMU, 1e-10)
    assert 2720.0 < WAVENUMBER_CM1_OF_HARTREE_PER_A2_AMU < 2720.5  # √(Eh/(Å² u))/(2πc)


def test_the_shipped_coupled_cluster_frequencies_are_water_hcn_and_formaldehyde():
    """The reference was computed here with PySCF (frozen-core CCSD(T)/cc-pVDZ, analytic
    gradients); water's harmonic wavenumbers at that level are 1690, 3822, 3927 cm⁻¹ in the
    literature (e.g. the CCCBDB), which its figures must match within 1 %."""
    reference = json.loads(frequencies.CC_REFERENCE.read_text())
    assert reference["level"] == "ccsd(t)/cc-pvdz"
    molecules = reference["molecules"]
    assert set(molecules) == set(frequencies.MOLECULES)
    np.testing.assert_allclose(molecules["water"]["wavenumbers_cm1"], [1690, 3822, 3927], rtol=0.01)
    assert len(molecules["hydrogen cyanide"]["wavenumbers_cm1"]) == 4  # linear: 3N − 5
    assert len(molecules["formaldehyde"]["wavenumbers_cm1"]) == 6


@pytest.mark.weights
def test_model_frequencies_at_the_minimum_use_the_exact_hessian():
    model = cached_model("ani-1x", "float64")
    numbers, start = frequencies.MOLECULES["water"]
    minimum, values = frequencies.model_frequencies(model, np.array(numbers), np.array(start))
    assert np.abs(model.evaluate(numbers, minimum).forces).max() < 2e-5
    assert len(values) == 3 and 1500 < values[0] < 2000 and 3700 < values[1] < values[2] < 4100


@pytest.mark.weights
@pytest.mark.slow
def test_bench_md_runs_and_reports_every_figure(tmp_path):
    out, png = tmp_path / "md.json", tmp_path / "md.png"
    result = CliRunner().invoke(
        main,
        ["bench", "md", "--model", "ani-1x", "--steps", "40", "--seeds", "1", "--json", str(out), "--plot", str(png)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["models"]["ani-1x"]
    for molecule in ("ethanol", "pyridine"):
        entry = report["molecules"][molecule]
        for dtype in ("float64", "float32"):
            (nve,) = entry[f"nve_{dtype}"]
            assert nve["fluctuation_kcal_per_atom"] < 0.01  # velocity Verlet at 0.5 fs conserves energy
        for temperature in ("300k", "1000k"):
            (run,) = entry[f"langevin_{temperature}"]
            assert run["broken_bonds"] == 0 and run["closest_approach_a"] > 0.7
            assert run["threshold_kcal"] == 0.23 and 0 <= run["flagged_fraction"] <= 1
            # ρ relative to the first frame (drive --collect-relative): ANI-1x states no
            # threshold of its own for it, so 0.23 again; the first frame is never flagged.
            assert run["threshold_relative_kcal"] == 0.23 and 0 <= run["flagged_fraction_relative"] < 1
    assert 0 < report["frequencies"]["mae_cm1"] < 300
    assert png.stat().st_size > 10_000 and "freq MAE" in result.output
