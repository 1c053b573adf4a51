"""aniserve drive against real i-PI and ASE servers, and against a misbehaving fake one."""

import os
import pathlib
import socket
import struct
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, ROOT, cached_model, reference

from aniserve import protocol
from aniserve.units import BOHR_IN_ANGSTROM

pytestmark = [pytest.mark.weights]  # the official ANI weights (see conftest)

IPI = [str(pathlib.Path(sys.executable).parent / "i-pi")]
DRIVE = [
    sys.executable,
    "-m",
    "aniserve",
    "drive",
    "--model",
    "ani-1ccx",
    "--dtype",
    "float64",
    "--reconnect-timeout",
    "1",
    "--connect-timeout",
    "60",
    "--timeout",
    "10",
]

INPUT = """<simulation verbosity='low'>
  <output prefix='sim'>
    <properties stride='1' filename='out'> [step, potential] </properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>31415</seed></prng>
  <ffsocket name='ani' mode='{mode}' pbc='false'>{address}<latency>1e-4</latency>{batch}</ffsocket>
  <system>
    <initialize nbeads='{beads}'>
      <file mode='xyz'>init.xyz</file>
      <velocities mode='thermal' units='kelvin'>300</velocities>
    </initialize>
    <forces><force forcefield='ani'/></forces>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'>0.25</timestep>
        <thermostat mode='pile_l'><tau units='femtosecond'>100</tau></thermostat>
      </dynamics>
    </motion>
  </system>
</simulation>
"""


def write_xyz(path, numbers, positions, cell):
    from ase.data import chemical_symbols

    a, b, c = np.diag(cell)
    lines = [str(len(numbers)), f"# CELL(abcABC): {a} {b} {c} 90.0 90.0 90.0 positions{{angstrom}} cell{{angstrom}}"]
    lines += [f"{chemical_symbols[z]} {x:.10f} {y:.10f} {w:.10f}" for z, (x, y, w) in zip(numbers, positions)]
    path.write_text("\n".join(lines) + "\n")


def run_ipi(tmp_path, numbers, positions, cell, mode, drive_args, beads=4, steps=10, batch=0, periodic=False):
    name = f"ani{uuid.uuid4().hex[:8]}"
    write_xyz(tmp_path / "init.xyz", numbers, positions, cell)
    if mode == "inet":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"<address>127.0.0.1</address><port>{port}</port>"
        where = ["--inet", f"127.0.0.1:{port}"]
    else:
        address = f"<address>{name}</address>"
        where = ["--shm" if mode == "shm" else "--unix", name]
    (tmp_path / "input.xml").write_text(
        INPUT.format(
            steps=steps,
            mode=mode,
            address=address,
            beads=beads,
            batch=f"<batch_size>{batch}</batch_size>" if batch else "",
        )
    )
    server = subprocess.Popen(IPI + ["input.xml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    driver = subprocess.run(
        DRIVE + ["--structure", str(tmp_path / "init.xyz"), "--pbc", "yes" if periodic else "no", *where, *drive_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = server.communicate(timeout=60)[0].decode()
    assert driver.returncode == 0, driver.stderr + out
    data = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert len(data) == steps + 1
    return data[:, 1], driver.stderr


@pytest.mark.parametrize(
    "mode,batch,drive_args",
    [
        ("unix", 0, ["--connections", "2"]),
        ("inet", 0, []),
        ("unix", 4, []),
        ("shm", 2, ["--connections", "2"]),
    ],
)
@pytest.mark.slow
def test_ipi_pimd_of_a_molecule(tmp_path, mode, batch, drive_args):
    potentials, log = run_ipi(
        tmp_path, ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3) * 30, mode, drive_args, batch=batch
    )
    expected = cached_model("ani-1ccx", "float64").evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS).energy
    assert abs(potentials[0] - expected) < 1e-6
    assert np.all(np.isfinite(potentials)) and np.ptp(potentials) > 1e-5  # the beads really moved
    assert "sent EXIT" in log


@pytest.mark.slow
def test_ipi_pimd_of_a_periodic_box(tmp_path):
    record = next(r for r in reference()["records"] if r["name"] == "water27-pbc")
    cell = np.array(record["cell"])
    potentials, _ = run_ipi(
        tmp_path, record["numbers"], record["positions"], cell, "unix", ["--connections", "2"], steps=10, periodic=True
    )
    # i-PI prints 9 significant digits: for this 2,065 Ha box that is a 1e-5 Ha resolution.
    assert abs(potentials[0] - record["models"]["ani-1ccx"]["energy"]) < 1e-5


@pytest.mark.slow
def test_two_driver_processes_give_the_same_trajectory_as_one(tmp_path):
    (tmp_path / "a").mkdir()
    one, _ = run_ipi(
        tmp_path / "a", ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3) * 30, "unix", ["--connections", "4"], steps=5
    )
    (tmp_path / "b").mkdir()
    name = f"ani{uuid.uuid4().hex[:8]}"
    b = tmp_path / "b"
    write_xyz(b / "init.xyz", ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3) * 30)
    (b / "input.xml").write_text(
        INPUT.format(steps=5, mode="unix", address=f"<address>{name}</address>", beads=4, batch="")
    )
    server = subprocess.Popen(IPI + ["input.xml"], cwd=b, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Two drivers on one node: one thread each (threads × processes ≤ cores).
    drivers = [
        subprocess.Popen(
            DRIVE
            + [
                "--structure",
                str(b / "init.xyz"),
                "--pbc",
                "no",
                "--unix",
                name,
                "--connections",
                "2",
                "--threads",
                "1",
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [d.communicate(timeout=240)[1] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], logs
    assert all("serving ani-1ccx on 1 thread" in log for log in logs), logs
    server.wait(timeout=60)
    two = np.loadtxt(b / "sim.out", ndmin=2)[:, 1]
    np.testing.assert_allclose(two, one, atol=1e-9)


@pytest.mark.slow
def test_ase_socketio_calculator_matches_in_process(tmp_path):
    from ase import Atoms
    from ase.calculators.socketio import SocketIOCalculator

    from aniserve import ANICalculator

    name = f"ani{uuid.uuid4().hex[:8]}"
    record = next(r for r in reference()["records"] if r["name"] == "water27-pbc")
    structure = tmp_path / "box.xyz"
    write_xyz(structure, record["numbers"], record["positions"], np.array(record["cell"]))
    atoms = Atoms(numbers=record["numbers"], positions=record["positions"], cell=record["cell"], pbc=True)
    local = ANICalculator(cached_model("ani-1ccx", "float64"))
    driver = subprocess.Popen(DRIVE + ["--structure", str(structure), "--unix", name], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        with SocketIOCalculator(unixsocket=name) as calc:
            for step in range(3):
                atoms.positions += np.random.default_rng(step).normal(scale=0.02, size=atoms.positions.shape)
                atoms.calc = calc
                remote = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
                atoms.calc = local
                here = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
                assert abs(remote[0] - here[0]) < 1e-6
                np.testing.assert_allclose(remote[1], here[1], atol=1e-6)
                np.testing.assert_allclose(remote[2], here[2], atol=1e-8)
    finally:
        assert driver.wait(timeout=60) == 0, driver.stderr.read().decode()


# ------------------------------------------------------------- fake servers
class FakeServer:
    """A UNIX-socket server that plays i-PI's side from scripted bytes."""

    def __init__(self):
        self.name = f"ani{uuid.uuid4().hex[:8]}"
        self.path = f"/tmp/ipi_{self.name}"
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(30)

    def start_driver(self, *args):
        structure = ROOT / "examples" / "molecules" / "ethanol.xyz"
        self.driver = subprocess.Popen(
            DRIVE + ["--structure", str(structure), "--unix", self.name, "--timeout", "3", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self

    def accept(self):
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        conn.sendall(protocol.header("STATUS"))
        assert conn.recv(12) == protocol.header("NEEDINIT")
        conn.sendall(protocol.encode_init(0, ""))
        conn.sendall(protocol.header("STATUS"))
        assert conn.recv(12) == protocol.header("READY")
        return conn

    def finish(self, timeout=30):
        code = self.driver.wait(timeout=timeout)
        self.listener.close()
        os.unlink(self.path)
        return code, self.driver.stderr.read()


def ethanol_posdata(positions=None):
    positions = np.array(ETHANOL_POSITIONS if positions is None else positions) / BOHR_IN_ANGSTROM
    return protocol.encode_posdata(np.eye(3)[None] * 40, positions[None])


def ask_forces(conn, posdata=None):
    """Send POSDATA and GETFORCE; return the decoded reply (energies, forces, virials, extras)."""
    conn.sendall((posdata or ethanol_posdata()) + protocol.header("GETFORCE"))
    buffer = b""
    while (decoded := protocol.decode_forceready(buffer)) is None:
        chunk = conn.recv(65536)
        assert chunk, "driver closed the connection"
        buffer += chunk
    return decoded[0]


@pytest.mark.parametrize(
    "payload,expected",
    [
        (b"GARBAGE!!!!!", "unknown message header"),
        (protocol.header("POSDATA") + np.eye(3).tobytes() * 2 + struct.pack("<i", -5), "atom count -5"),
        (
            protocol.header("POSDATA") + np.eye(3).tobytes() * 2 + struct.pack("<i", 2_000_000_000),
            "atom count 2000000000",
        ),
    ],
)
def test_malformed_messages_end_the_driver_cleanly(payload, expected):
    server = FakeServer().start_driver()
    conn = server.accept()
    conn.sendall(payload)
    code, log = server.finish()
    conn.close()
    assert code == 2 and expected in log and "Traceback" not in log


@pytest.mark.slow
def test_truncated_message_then_silence_times_out():
    server = FakeServer().start_driver()
    conn = server.accept()
    conn.sendall(ethanol_posdata()[:50])
    start = time.monotonic()
    code, log = server.finish()
    conn.close()
    assert code == 2 and "incomplete message" in log and time.monotonic() - start < 20


@pytest.mark.slow
def test_server_closing_mid_message_and_not_coming_back_is_an_error():
    server = FakeServer().start_driver("--reconnect-timeout", "1")
    conn = server.accept()
    server.listener.close()  # nothing listens any more: no server will come back
    os.unlink(server.path)
    conn.sendall(ethanol_posdata()[:50])
    conn.close()
    code, log = server.driver.wait(timeout=30), server.driver.stderr.read()
    assert code == 2 and "in the middle of a message (50 bytes of b'POSDATA' received)" in log
    assert "no server came back" in log and "Traceback" not in log


@pytest.mark.slow
def test_server_killed_mid_message_is_named_and_the_next_one_served():
    """A server killed while sending (SIGKILL between two writes of POSDATA) is a server
    gone: the half message is named in a warning and dropped, the restarted one is served."""
    server = FakeServer().start_driver("--reconnect-timeout", "20")
    conn = server.accept()
    conn.sendall(ethanol_posdata()[:50])
    conn.close()
    conn = server.accept()
    energies, _forces, _virials, _extras = ask_forces(conn)
    assert np.isfinite(energies[0])
    conn.sendall(protocol.header("EXIT"))
    code, log = server.finish()
    conn.close()
    assert code == 0 and "in the middle of a message (50 bytes of b'POSDATA' received); dropped" in log


@pytest.mark.slow
def test_nan_positions_are_reported_not_evaluated():
    server = FakeServer().start_driver()
    conn = server.accept()
    bad = np.array(ETHANOL_POSITIONS)
    bad[3, 0] = np.nan
    conn.sendall(ethanol_posdata(bad) + protocol.header("GETFORCE"))
    code, log = server.finish()
    conn.close()
    assert code == 3 and "NaN" in log


@pytest.mark.slow
def test_driver_serves_a_restarted_server_and_exits_on_exit():
    server = FakeServer().start_driver("--reconnect-timeout", "20", "--extras", "committee")
    expected = cached_model("ani-1ccx", "float64").evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS).energy
    for round_ in range(2):  # the first server goes away cleanly; a new one takes its place
        try:
            conn = server.accept()
        except TimeoutError:
            server.driver.kill()
            raise AssertionError(server.driver.stderr.read()) from None
        energies, _forces, _virials, extras = ask_forces(conn)
        assert abs(energies[0] - expected) < 1e-9
        assert len(__import__("json").loads(extras[0])["committee_pot"]) == 8
        conn.sendall(protocol.header("STATUS"))
        assert conn.recv(12) == protocol.header("READY")
        if round_ == 0:
            conn.close()
    conn.sendall(protocol.header("EXIT"))
    code, log = server.finish()
    conn.close()
    assert code == 0 and "sent EXIT" in log


NPT_MOTION = """<motion mode='dynamics'>
      <dynamics mode='npt'>
        <barostat mode='isotropic'>
          <tau units='femtosecond'>20</tau>
          <thermostat mode='langevin'><tau units='femtosecond'>50</tau></thermostat>
        </barostat>
        <thermostat mode='pile_l'><tau units='femtosecond'>100</tau></thermostat>
        <timestep units='femtosecond'>0.5</timestep>
      </dynamics>
    </motion>"""


@pytest.mark.slow
def test_ipi_constant_pressure_run_reads_our_virial(tmp_path):
    """i-PI's NPT barostat is driven by the virial we send: its printed virial at step 0
    must be ours (−dE/dε over the volume, atomic units), and the cell must then move."""
    record = next(r for r in reference()["records"] if r["name"] == "water27-pbc")
    numbers, positions, cell = record["numbers"], np.array(record["positions"]), np.array(record["cell"])
    name = f"ani{uuid.uuid4().hex[:8]}"
    write_xyz(tmp_path / "init.xyz", numbers, positions, cell)
    xml = INPUT.format(steps=12, mode="unix", address=f"<address>{name}</address>", beads=1, batch="")
    xml = xml.replace("[step, potential]", "[step, potential, volume, virial_md]")
    xml = xml.replace(
        "<ensemble><temperature units='kelvin'>300</temperature></ensemble>",
        "<ensemble><temperature units='kelvin'>300</temperature>"
        "<pressure units='megapascal'>1000</pressure></ensemble>",
    )
    xml = xml[: xml.index("<motion")] + NPT_MOTION + xml[xml.index("</motion>") + len("</motion>") :]
    (tmp_path / "input.xml").write_text(xml)
    server = subprocess.Popen(IPI + ["input.xml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    driver = subprocess.run(
        DRIVE + ["--structure", str(tmp_path / "init.xyz"), "--pbc", "yes", "--unix", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = server.communicate(timeout=60)[0].decode()
    assert driver.returncode == 0, driver.stderr + out
    data = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert len(data) == 13
    # i-PI reads the Å file with its own 8-digit constant (1.8897261 bohr/Å, ours is
    # CODATA 2018): what reaches the driver is the structure scaled by 1 − 1.4e-8, which
    # moves this box's virial by 1e-5 relative.  Compare at the structure i-PI sent.
    from ipi.utils.units import unit_to_internal

    scale = unit_to_internal("length", "angstrom", 1.0) * BOHR_IN_ANGSTROM
    result = cached_model("ani-1ccx", "float64").evaluate(numbers, positions * scale, cell * scale)
    volume_bohr3 = abs(np.linalg.det(cell * scale)) / BOHR_IN_ANGSTROM**3
    assert abs(data[0, 2] - volume_bohr3) < 1e-8 * volume_bohr3
    virial = -(result.strain_derivative + result.strain_derivative.T) / 2 / volume_bohr3
    expected = [virial[0, 0], virial[1, 1], virial[2, 2], virial[0, 1], virial[0, 2], virial[1, 2]]
    # i-PI prints 7 significant digits here.
    np.testing.assert_allclose(data[0, 3:9], expected, rtol=2e-6, atol=1e-14)
    assert np.ptp(data[:, 2]) > 1e-4 * volume_bohr3  # the barostat moved the cell
    assert np.all(np.isfinite(data))


@pytest.mark.slow
def test_extras_none_sends_an_empty_string():
    """For clients that cannot take JSON extras (ASE <= 3.22 reads at most one byte)."""
    server = FakeServer().start_driver("--extras", "none")
    conn = server.accept()
    energies, _forces, _virials, extras = ask_forces(conn)
    expected = cached_model("ani-1ccx", "float64").evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS).energy
    assert extras == [""] and abs(energies[0] - expected) < 1e-9
    conn.sendall(protocol.header("STATUS"))
    assert conn.recv(12) == protocol.header("READY")
    conn.sendall(protocol.header("EXIT"))
    code, log = server.finish()
    conn.close()
    assert code == 0, log


@pytest.mark.slow
def test_server_killed_while_a_reply_is_pending_is_server_gone():
    """The server sends positions and dies before reading the forces: the driver's reply
    meets a closed socket — 'server gone' (exit 0 after the reconnect window), not a
    broken-pipe error."""
    server = FakeServer().start_driver("--reconnect-timeout", "1")
    conn = server.accept()
    conn.sendall(ethanol_posdata() + protocol.header("GETFORCE"))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    conn.close()
    code, log = server.finish()
    assert code == 0, log
    assert "Broken pipe" not in log and "Traceback" not in log
    assert "closed the connection" in log
