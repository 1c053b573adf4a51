"""The serving path: collecting uncertain structures (active learning) through the i-PI
driver and the ASE calculator, and the shared evaluator behind both."""

import math

import ase.io
import numpy as np
import pytest
from ase import Atoms
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, cached_model
from test_driver_ipi import FakeServer, ask_forces, ethanol_posdata

from aniserve import protocol
from aniserve.calculator import ANICalculator
from aniserve.collect import Collector
from aniserve.units import HARTREE_IN_EV, HARTREE_IN_KCAL_PER_MOL

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def displaced(step):
    return np.array(ETHANOL_POSITIONS) + np.random.default_rng(step).normal(scale=0.08, size=(9, 3))


def serve_steps(server, steps):
    """Serve displaced(step) for each of ``steps`` (a count, or the steps in order; None
    sends INIT, as i-PI does when it starts another run on the connection)."""
    conn = server.accept()
    for step in range(steps) if isinstance(steps, int) else steps:
        if step is None:
            conn.sendall(protocol.encode_init(0, ""))
            continue
        ask_forces(conn, ethanol_posdata(displaced(step)))
        conn.sendall(protocol.header("STATUS"))
        assert conn.recv(12) == protocol.header("READY")
    conn.sendall(protocol.header("EXIT"))
    code, log = server.finish()
    conn.close()
    return code, log


@pytest.mark.slow
def test_drive_collects_above_a_low_threshold_with_the_evaluated_spreads(tmp_path):
    out = tmp_path / "collected.extxyz"
    server = FakeServer().start_driver(
        "--collect", str(out), "--collect-energy-std", "1e-6", "--collect-force-std", "1e-6", "--collect-every", "2"
    )
    code, log = serve_steps(server, 5)
    assert code == 0, log
    frames = ase.io.read(out, index=":")
    assert len(frames) == 3  # steps 0, 2, 4: at least two steps apart
    model = cached_model("ani-1ccx", "float64")
    for frame, step in zip(frames, (0, 2, 4)):
        np.testing.assert_allclose(frame.positions, displaced(step), atol=1e-8)
        assert list(frame.numbers) == list(ETHANOL_NUMBERS) and frame.info["step"] == step
        result = model.evaluate(frame.numbers, frame.positions, member_forces=True)
        std = float(result.energy_std) * HARTREE_IN_KCAL_PER_MOL
        assert abs(frame.info["energy_std_kcal"] - std) < 1e-5
        assert abs(frame.info["energy_std_per_sqrt_atom_kcal"] - std / math.sqrt(9)) < 1e-5
        spread = np.sqrt(((result.member_forces - result.member_forces.mean(0)) ** 2).sum(-1).mean(0)).max()
        assert abs(frame.info["force_std_max_kcal_per_a"] - spread * HARTREE_IN_KCAL_PER_MOL) < 1e-4
        assert frame.info["model"] == "ani-1ccx" and frame.info["source"].startswith("unix:/tmp/ipi_")
    assert "collected 3 of 5 structures" in log


@pytest.mark.slow
def test_drive_collects_nothing_above_a_high_threshold(tmp_path):
    out = tmp_path / "collected.extxyz"
    server = FakeServer().start_driver("--collect", str(out), "--collect-energy-std", "1000")
    code, log = serve_steps(server, 3)
    assert code == 0, log
    assert not out.exists() and "collected 0 of 3 structures" in log


def test_calculator_collects_like_the_driver(tmp_path):
    model = cached_model("ani-1ccx", "float64")
    low = Collector(tmp_path / "low.extxyz", energy_std=1e-6)
    high = Collector(tmp_path / "high.extxyz", energy_std=1000.0)
    for collector in (low, high):
        atoms = Atoms(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)
        atoms.calc = ANICalculator(model, collect=collector)
        for step in range(3):
            atoms.positions = displaced(step)
            atoms.get_potential_energy()
    frames = ase.io.read(tmp_path / "low.extxyz", index=":")
    assert len(frames) == 3 and not (tmp_path / "high.extxyz").exists()
    # Flagged by the energy spread alone, a written frame still carries its force spread.
    members = model.evaluate(ETHANOL_NUMBERS, displaced(2), member_forces=True).member_forces
    spread = np.sqrt(((members - members.mean(0)) ** 2).sum(-1).mean(0)).max() * HARTREE_IN_KCAL_PER_MOL
    assert abs(frames[2].info["force_std_max_kcal_per_a"] - spread) < 1e-8
    assert low.fraction == 1.0 and high.fraction == 0.0
    std = float(model.evaluate(ETHANOL_NUMBERS, displaced(1)).energy_std) * HARTREE_IN_KCAL_PER_MOL
    assert abs(frames[1].info["energy_std_kcal"] - std) < 1e-6 and frames[1].info["source"] == "ase-calculator"


def test_collector_needs_a_threshold():
    with pytest.raises(ValueError, match="threshold"):
        Collector("x.extxyz", energy_std=None, force_std=None)


def calibrated_ani1ccx(scale: float, threshold: float):
    """ANI-1ccx with a spread calibration, as training stores it (modelfile ``uncertainty``)."""
    from aniserve.models import load_model

    model = load_model("ani-1ccx", dtype="float64")
    model.uncertainty = {"energy_std_scale": scale, "collect_threshold_kcal": threshold}
    return model


def test_the_relative_threshold_falls_back_to_the_absolute_one():
    """A model states a threshold for ρ relative to a start structure (``aniserve learn``)
    where its calibration found one; otherwise the absolute one serves, and a model with
    no calibration gets ANI-1x's 0.23 for both."""
    from aniserve.collect import ANI1X_ENERGY_STD, stated_threshold

    model = calibrated_ani1ccx(2.0, 1.5)
    assert stated_threshold(model) == stated_threshold(model, relative=True) == 1.5
    model.uncertainty["collect_threshold_relative_kcal"] = 0.4
    assert (stated_threshold(model), stated_threshold(model, relative=True)) == (1.5, 0.4)
    model.uncertainty = {}
    assert stated_threshold(model) == stated_threshold(model, relative=True) == ANI1X_ENERGY_STD


def raw_rho(step) -> float:
    result = cached_model("ani-1ccx", "float64").evaluate(ETHANOL_NUMBERS, displaced(step))
    return float(np.std(result.member_energies)) * HARTREE_IN_KCAL_PER_MOL / 3.0  # √9 atoms


def test_collectors_use_the_threshold_the_model_states(tmp_path):
    """A collector given no threshold takes the served model's calibrated one and judges
    the calibrated spread; an explicit threshold wins; a model stating none gets ANI-1x's."""
    rho = [raw_rho(step) for step in range(6)]
    threshold = 2.0 * float(np.median(rho))  # with the scale 2: the steps above the median
    model = calibrated_ani1ccx(2.0, threshold)
    default, explicit = Collector(tmp_path / "a.extxyz"), Collector(tmp_path / "b.extxyz", energy_std=1e-6)
    for collector in (default, explicit):
        atoms = Atoms(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)
        atoms.calc = ANICalculator(model, collect=collector)
        for step in range(6):
            atoms.positions = displaced(step)
            atoms.get_potential_energy()
            assert atoms.calc.results["energy_std"] == pytest.approx(
                2.0 * rho[step] * 3.0 / HARTREE_IN_KCAL_PER_MOL * HARTREE_IN_EV, 1e-6
            )
    assert default.energy_std == threshold and explicit.energy_std == 1e-6
    frames = ase.io.read(tmp_path / "a.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [s for s in range(6) if rho[s] > np.median(rho)]
    assert frames[0].info["energy_std_per_sqrt_atom_kcal"] == pytest.approx(2.0 * rho[frames[0].info["step"]], 1e-6)
    assert len(ase.io.read(tmp_path / "b.extxyz", index=":")) == 6
    plain = Collector(tmp_path / "c.extxyz")
    plain.bind(cached_model("ani-1ccx", "float64"))
    assert plain.energy_std == 0.23
    with pytest.raises(ValueError, match="energy_std must be a number"):
        Collector("x.extxyz", energy_std="auto")


def test_a_relative_collector_judges_each_frame_against_its_trajectorys_first(tmp_path):
    """``relative``: ρ of E(frame) − E(first frame), each member against itself, scaled by
    the model's calibration and judged by the threshold it states for relative ρ; the
    first frame is 0 and a new molecule on the same calculator starts a new trajectory."""
    members = [
        cached_model("ani-1ccx", "float64").evaluate(ETHANOL_NUMBERS, displaced(step)).member_energies
        for step in range(6)
    ]
    rho = [2.0 * float(np.std(m - members[0])) * HARTREE_IN_KCAL_PER_MOL / 3.0 for m in members]
    assert rho[0] == 0.0 and min(rho[1:]) > 0
    model = calibrated_ani1ccx(2.0, 1e9)  # an absolute threshold nothing reaches
    model.uncertainty["collect_threshold_relative_kcal"] = float(np.median(rho[1:]))
    collector = Collector(tmp_path / "rel.extxyz", relative=True)
    atoms = Atoms(numbers=ETHANOL_NUMBERS, positions=ETHANOL_POSITIONS)
    atoms.calc = ANICalculator(model, collect=collector)
    for step in range(6):
        atoms.positions = displaced(step)
        atoms.get_potential_energy()
    assert collector.energy_std == float(np.median(rho[1:]))
    frames = ase.io.read(tmp_path / "rel.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [s for s in range(6) if rho[s] > np.median(rho[1:])]
    assert frames[0].info["energy_std_per_sqrt_atom_kcal"] == pytest.approx(rho[frames[0].info["step"]], 1e-6)
    assert all(f.info["rho_relative_to_first_structure"] for f in frames)
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    water.calc = atoms.calc
    water.get_potential_energy()  # another molecule: a new start, ρ 0, not collected
    assert len(ase.io.read(tmp_path / "rel.extxyz", index=":")) == len(frames)
    assert np.array_equal(collector.starts["ase-calculator"][0], water.numbers)


@pytest.mark.slow
def test_drive_collects_at_the_saved_models_threshold(tmp_path):
    """End to end: a calibrated model file served by ``drive --collect`` with no threshold."""
    from aniserve.modelfile import save_model

    rho = [raw_rho(step) for step in range(4)]
    path = tmp_path / "calibrated.safetensors"
    save_model(calibrated_ani1ccx(3.0, 3.0 * float(np.median(rho))), path, name="calibrated")
    out = tmp_path / "collected.extxyz"
    code, log = serve_steps(FakeServer().start_driver("--collect", str(out), "--model", str(path)), 4)
    assert code == 0, log
    assert [f.info["step"] for f in ase.io.read(out, index=":")] == [s for s in range(4) if rho[s] > np.median(rho)]


def relative_driver(tmp_path):
    """``drive --collect --collect-relative`` serving a model whose stated relative
    threshold is the median relative ρ of displaced(1…3) against displaced(0) (its
    absolute one nothing reaches); the driver, its collection file and those ρ."""
    from aniserve.modelfile import save_model

    members = [
        cached_model("ani-1ccx", "float64").evaluate(ETHANOL_NUMBERS, displaced(step)).member_energies
        for step in range(4)
    ]
    rho = [3.0 * float(np.std(m - members[0])) * HARTREE_IN_KCAL_PER_MOL / 3.0 for m in members]
    model = calibrated_ani1ccx(3.0, 1e9)
    model.uncertainty["collect_threshold_relative_kcal"] = float(np.median(rho[1:]))
    path = tmp_path / "calibrated.safetensors"
    save_model(model, path, name="calibrated")
    out = tmp_path / "collected.extxyz"
    return FakeServer().start_driver("--collect", str(out), "--collect-relative", "--model", str(path)), out, rho


@pytest.mark.slow
def test_drive_collects_relative_to_each_beads_first_structure(tmp_path):
    """End to end: ``drive --collect --collect-relative`` with a model stating a relative
    threshold; its absolute one, which nothing reaches, plays no part."""
    driver, out, rho = relative_driver(tmp_path)
    code, log = serve_steps(driver, 4)
    assert code == 0, log
    assert [f.info["step"] for f in ase.io.read(out, index=":")] == [s for s in range(4) if rho[s] > np.median(rho[1:])]


@pytest.mark.slow
def test_a_new_init_starts_a_new_trajectory_for_the_relative_collector(tmp_path):
    """i-PI sends INIT again when it starts another run on the same connection: the
    relative collector's start, like the neighbour list, does not outlive it.  The second
    run begins at the first run's most uncertain frame (ρ 0 now: not collected) and
    returns to the first run's start (collected, step 1 of the new run)."""
    driver, out, rho = relative_driver(tmp_path)
    worst = 1 + int(np.argmax(rho[1:]))
    code, log = serve_steps(driver, [0, 1, 2, 3, None, worst, 0])
    assert code == 0, log
    frames = ase.io.read(out, index=":")
    first_run = [s for s in range(4) if rho[s] > np.median(rho[1:])]
    assert [f.info["step"] for f in frames] == first_run + [1]
    np.testing.assert_allclose(frames[-1].positions, displaced(0), atol=1e-8)
    assert frames[-1].info["energy_std_per_sqrt_atom_kcal"] == pytest.approx(rho[worst], rel=1e-4)


def test_driver_and_calculator_share_one_evaluation(tmp_path):
    """Energies, forces and stress of a periodic box from the in-process calculator equal
    the driver's reply (the same evaluator, two edges with their own units)."""
    from conftest import reference

    from aniserve.serving import Evaluator, Structure
    from aniserve.units import HARTREE_IN_EV

    record = next(r for r in reference()["records"] if r["name"] == "water27-pbc")
    model = cached_model("ani-1ccx", "float64")
    atoms = Atoms(numbers=record["numbers"], positions=record["positions"], cell=record["cell"], pbc=True)
    atoms.calc = ANICalculator(model)
    (result,) = Evaluator(model).evaluate(
        [("k", Structure(np.array(record["numbers"]), np.array(record["positions"]), np.array(record["cell"])))]
    )
    assert atoms.get_potential_energy() == result.energy * HARTREE_IN_EV
    np.testing.assert_array_equal(atoms.get_forces(), result.forces * HARTREE_IN_EV)
    stress = -result.virial * HARTREE_IN_EV / atoms.get_volume()
    np.testing.assert_allclose(atoms.get_stress(voigt=False), stress, rtol=0, atol=1e-15)


def test_non_finite_results_are_never_returned():
    """Two atoms at one point give NaN forces: the calculator raises, naming them."""
    atoms = Atoms(
        "CH4",
        positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [0.63, -0.63, -0.63], [0.63, -0.63, -0.63]],
    )
    atoms.calc = ANICalculator(cached_model("ani-1ccx", "float64"))
    with pytest.raises(ValueError, match=r"non-finite .* \(atoms 3 and 4 are 0 Å apart\)"):
        atoms.get_forces()


@pytest.mark.parametrize(
    "numbers,positions,cell,message",
    [
        ([], np.zeros((0, 3)), None, "no atoms"),
        ([6.7, 1, 1, 1, 1], ETHANOL_POSITIONS[:5], None, "must be integers"),
        ([8, 1, 1] * 3, np.random.default_rng(0).uniform(0, 0.5, (9, 3)), np.eye(3) * 0.5, "cell too thin"),
        ([8, 1, 1], ETHANOL_POSITIONS[:3], np.diag([12.0, 12.0, 0.001]), "cell too thin"),
    ],
)
def test_bad_structures_are_refused_before_any_work(numbers, positions, cell, message):
    with pytest.raises(ValueError, match=message):
        cached_model("ani-1ccx", "float64").evaluate(numbers, positions, cell)


def test_float32_keeps_its_precision_far_from_the_origin():
    """Displacements are formed in float64 before the cast: a molecule 1e4 Å from the
    origin gets the forces it gets at the origin, in float32 too."""
    model = cached_model("ani-1ccx", "float32")
    here = model.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    far = model.evaluate(ETHANOL_NUMBERS, np.array(ETHANOL_POSITIONS) + 1e4)
    np.testing.assert_allclose(far.forces, here.forces, rtol=0, atol=1e-6)
    assert abs(far.energy - here.energy) < 1e-6


class _SentBytes:
    """A socket that keeps what the driver sends."""

    def __init__(self):
        self.sent = bytearray()

    def sendall(self, data):
        self.sent += data

    def send(self, data):  # the driver's non-blocking send: all taken at once here
        self.sent += data
        return len(data)


def test_driver_replies_go_to_their_own_connections_and_slots():
    """Two connections, batched (2 structures) and single, computed in one evaluator call:
    each FORCEREADY carries its own structures' results in order (Hartree/Bohr), each
    structure keeps its own neighbour list, and a new INIT drops the old ones."""
    from aniserve.driver import Address, Connection, IPIDriver
    from aniserve.serving import Evaluator
    from aniserve.units import BOHR_IN_ANGSTROM

    model = cached_model("ani-1ccx", "float64")
    evaluator = Evaluator(model)
    numbers = np.array(ETHANOL_NUMBERS)
    address = Address.unix("slots")
    driver = IPIDriver(evaluator, [address], [numbers])
    geometries = [displaced(step) for step in range(3)]
    batched, single = Connection(address, numbers, _SentBytes()), Connection(address, numbers, _SentBytes())
    for conn, size, first in ((batched, 2, 0), (single, 1, 2)):
        conn.buffer += protocol.encode_init(0, f"batch_size:{size}")
        conn.buffer += protocol.encode_posdata(
            np.zeros((size, 3, 3)), np.stack(geometries[first : first + size]) / BOHR_IN_ANGSTROM, batch_size=size
        )
        driver._process(conn)
        assert conn.state == "pending" and len(conn.keys) == size
    driver._compute([batched, single])
    for conn, size, first in ((batched, 2, 0), (single, 1, 2)):
        conn.buffer += protocol.header("GETFORCE")
        driver._process(conn)
        (energies, forces, _virials, _extras), _ = protocol.decode_forceready(conn.sock.sent, size)
        for b in range(size):
            alone = model.evaluate(numbers, geometries[first + b])
            assert abs(energies[b] - alone.energy) < 1e-9
            np.testing.assert_allclose(forces[b], alone.forces * BOHR_IN_ANGSTROM, rtol=0, atol=1e-9)
    keys = batched.keys + single.keys
    assert len(set(keys)) == 3 and all(evaluator.neighbor_list(k) is not None for k in keys)
    batched.buffer += protocol.encode_init(0, "")
    driver._process(batched)
    assert len(batched.keys) == 1 and all(evaluator.neighbor_list(k) is None for k in keys[:2])
    assert evaluator.neighbor_list(single.keys[0]) is not None
