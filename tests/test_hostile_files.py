"""Crafted HDF5 files, hostile arrays in the Python API, and the exit-status table of
every command: each case fails with one line naming the problem (or a documented exit
status), never a traceback, a hang or memory without bound; the documented table is the
one the code uses."""

import os
import re
import resource
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, ROOT, cached_model

from aniserve import exits
from aniserve.cli import main
from aniserve.embedded import DEFAULT_MODEL
from aniserve.hdf5 import HDF5Error
from aniserve.qmdata.records import read_h5
from aniserve.training import ANIData, DataError

ETHANOL = str(ROOT / "examples" / "molecules" / "ethanol.xyz")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def good_group(f, name="CH4"):
    g = f.create_group(name)
    g["atomic_numbers"] = np.array([6, 1, 1, 1, 1])
    g["coordinates"] = np.array(
        [[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]]] * 3,
        dtype=float,
    )
    g["e"] = np.array([-40.5, -40.4, -40.45])
    return g


def _billions_of_conformations(f):
    g = f.create_group("H")
    g["atomic_numbers"] = np.array([1])
    g.create_dataset("coordinates", shape=(2**33, 1, 3), chunks=(1024, 1, 3), dtype="f8", compression="gzip")
    g.create_dataset("e", shape=(2**33,), chunks=(1024,), dtype="f8", compression="gzip")


def _linked_into_itself(f):
    good_group(f)
    f["loop"] = f.create_group("wrapper")
    f["wrapper"]["again"] = f["wrapper"]


def _external_link(f):
    good_group(f)
    f["elsewhere"] = h5py.ExternalLink("/etc/hostname", "/x")


def _virtual_dataset(f):
    g = good_group(f)
    layout = h5py.VirtualLayout(shape=(3,), dtype="f8")
    layout[:] = h5py.VirtualSource("/tmp/aniserve-not-here.h5", "e", shape=(3,))
    del g["e"]
    g.create_virtual_dataset("e", layout, fillvalue=-40.0)


def _float_atomic_numbers(f):
    good_group(f)["atomic_numbers"][...] = 0
    del f["CH4"]["atomic_numbers"]
    f["CH4"]["atomic_numbers"] = np.array([6.5, 1, 1, 1, 1])


def _negative_atomic_numbers(f):
    good_group(f)
    del f["CH4"]["atomic_numbers"]
    f["CH4"]["atomic_numbers"] = np.array([-6, 1, 1, 1, 1])


def _energy_of_another_length(f):
    good_group(f)
    del f["CH4"]["e"]
    f["CH4"]["e"] = np.array([-40.5] * 7)


HDF5_DAMAGE = {
    "2^33 conformations declared in 29 KB": (_billions_of_conformations, "declares 206158430208 bytes"),
    "a group linked into itself": (_linked_into_itself, "is linked into itself (a link cycle)"),
    "an external link": (_external_link, "is an external link to '/etc/hostname'"),
    "a virtual dataset": (_virtual_dataset, "is a virtual dataset"),
    "float atomic numbers": (_float_atomic_numbers, "holds float64 values, not integers"),
    "negative atomic numbers": (_negative_atomic_numbers, "holds -6, not the atomic number of an element"),
    "an energy per conformation of another length": (_energy_of_another_length, "CH4/e has shape (7,)"),
}


def _crafted(tmp_path, damage) -> str:
    path = tmp_path / "crafted.h5"
    with h5py.File(path, "w") as f:
        f.attrs["levels"] = '{"e": {}}'  # read_h5's level list: the property 'e.energy' is absent, harmless
        HDF5_DAMAGE[damage][0](f)
    return path


def _bounded(seconds=30):
    def late(*_):
        raise TimeoutError(f"not refused within {seconds} s")

    signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)


@pytest.mark.parametrize("damage", sorted(HDF5_DAMAGE))
def test_crafted_training_files_are_refused_before_reading(damage, tmp_path):
    path = _crafted(tmp_path, damage)
    assert os.path.getsize(path) < 64 * 1024
    before = peak_rss_mb()
    _bounded()
    try:
        with pytest.raises(DataError, match=re.escape(HDF5_DAMAGE[damage][1])) as error:
            ANIData(path, "e")
    finally:
        signal.alarm(0)
    assert "\n" not in str(error.value)
    assert peak_rss_mb() - before < 100  # MB


@pytest.mark.parametrize("damage", sorted(set(HDF5_DAMAGE) - {"an energy per conformation of another length"}))
def test_crafted_files_to_label_are_refused_before_reading(damage, tmp_path):
    """``data label`` reads its HDF5 inputs through ``read_h5`` (before: 2^34 declared
    conformations reached 3 GB in 17 s; a link cycle was a RecursionError)."""
    path = _crafted(tmp_path, damage)
    before = peak_rss_mb()
    _bounded()
    try:
        with pytest.raises(HDF5Error, match=re.escape(HDF5_DAMAGE[damage][1])):
            read_h5(path)
    finally:
        signal.alarm(0)
    assert peak_rss_mb() - before < 100


def test_train_checks_its_output_folder_before_any_work(tmp_path):
    """Before: a missing folder failed only after training, with a traceback."""
    with h5py.File(tmp_path / "d.h5", "w") as f:
        good_group(f)
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(tmp_path / "d.h5"),
            "--energy-key",
            "e",
            "--out",
            str(tmp_path / "missing" / "m.safetensors"),
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == exits.USAGE, result.output
    assert "does not exist" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ Python API
@pytest.mark.parametrize(
    "numbers,positions,cell,message",
    [
        (np.ones(9, dtype=bool), ETHANOL_POSITIONS, None, "must be integers, got an array of bool"),
        (torch.ones(9, dtype=torch.bool), ETHANOL_POSITIONS, None, "dense tensor of integers"),
        (6, ETHANOL_POSITIONS, None, "not a single number"),
        (torch.tensor(6), ETHANOL_POSITIONS, None, "not a single number"),
        (torch.tensor(ETHANOL_NUMBERS).to_sparse(), ETHANOL_POSITIONS, None, "dense tensor"),
        (torch.empty(9, dtype=torch.long, device="meta"), ETHANOL_POSITIONS, None, "meta"),
        (ETHANOL_NUMBERS, np.array(ETHANOL_POSITIONS) + 0j, None, "positions must be real numbers"),
        (ETHANOL_NUMBERS, torch.tensor(ETHANOL_POSITIONS).to_sparse(), None, "positions must be a dense tensor"),
        (ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(3, dtype=bool), "cell must be real numbers"),
        (ETHANOL_NUMBERS[:4] + [0] + ETHANOL_NUMBERS[5:], ETHANOL_POSITIONS, None, "atomic number 0 at atom 4"),
    ],
)
def test_hostile_arrays_are_refused_not_misread(numbers, positions, cell, message):
    """Before: booleans evaluated as hydrogens (or a 1 Å cube, +1,429 Ha), complex
    positions lost their imaginary part, a 0 dropped an atom, a scalar or a sparse or
    meta tensor raised TypeError or RuntimeError."""
    model = cached_model(DEFAULT_MODEL, "float64")
    with pytest.raises(ValueError, match=re.escape(message)):
        model.evaluate(numbers, positions, cell)


def test_reversed_and_big_endian_arrays_are_valid_input():
    model = cached_model(DEFAULT_MODEL, "float64")
    want = model.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    reversed_view = np.array(ETHANOL_POSITIONS)[::-1][::-1]
    strided = np.array(ETHANOL_POSITIONS)[::-1].copy()[::-1]
    big_endian = np.array(ETHANOL_POSITIONS, dtype=">f8")
    numbers_big_endian = np.array(ETHANOL_NUMBERS, dtype=">i4")
    for numbers, positions in (
        (ETHANOL_NUMBERS, strided),
        (ETHANOL_NUMBERS, reversed_view),
        (ETHANOL_NUMBERS, big_endian),
        (numbers_big_endian, ETHANOL_POSITIONS),
        (np.array(ETHANOL_NUMBERS)[::-1][::-1], np.array(ETHANOL_POSITIONS).T.copy().T),
    ):
        got = model.evaluate(numbers, positions)
        assert abs(got.energy - want.energy) < 1e-12
        np.testing.assert_allclose(got.forces, want.forces, atol=1e-12)


# ------------------------------------------------------------------ exit statuses
def drive(*args, timeout=120, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "aniserve", "drive", "--structure", ETHANOL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def test_the_exit_table_is_documented_where_users_read_it():
    page = (ROOT / "docs" / "serving.md").read_text()
    for status, name, _meaning in exits.TABLE:
        assert re.search(rf"^\| {status} \|", page, re.M), f"docs/serving.md lacks exit status {status} ({name})"
    assert len({status for status, _, _ in exits.TABLE}) == len(exits.TABLE)


@pytest.mark.slow
def test_usage_errors_are_64_not_the_protocol_error_2():
    for args in (["--connections", "0", "--unix", "x"], ["--inet", "nohostport"], ["--unix", "../x"], []):
        run = drive(*args)
        assert run.returncode == exits.USAGE, (args, run.stderr)
        assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_a_model_that_cannot_be_loaded_is_5(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    run = drive("--model", str(bad), "--unix", "never-used")
    assert run.returncode == exits.BAD_MODEL and "not a readable safetensors file" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_no_server_is_4():
    run = drive("--unix", "nobody-listens-here", "--connect-timeout", "0.5")
    assert run.returncode == exits.NO_SERVER and "could not connect" in run.stderr, run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, exits.INTERRUPTED), (signal.SIGTERM, exits.TERMINATED)])
def test_an_interrupted_driver_says_so_and_exits_with_its_status(sig, status):
    # A process started in the background by a non-interactive shell (CI run as
    # `cmd &`) inherits SIGINT ignored, and Python then installs no Ctrl-C handler:
    # the driver would rightly ignore the signal.  The test plays a terminal's
    # foreground job, which receives Ctrl-C, so the child restores Python's handler
    # before aniserve starts.
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('aniserve', run_name='__main__')",
            "drive",
            "--structure",
            ETHANOL,
            "--unix",
            "nobody-listens-here",
            "--connect-timeout",
            "600",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    log = ""
    while "waiting for a server" not in log and time.monotonic() < deadline:
        log += process.stderr.readline()
    process.send_signal(sig)
    code = process.wait(timeout=60)
    log += process.stderr.read()
    assert code == status, log
    assert "Traceback" not in log


def test_a_tiny_box_under_pbc_auto_is_a_box_refused_as_too_thin_not_a_molecule():
    """A 0.009 bohr cubic cell fell under the absolute determinant cut and the isolated
    molecule was served; it is a (much too small) box."""
    from aniserve.ipi_edge import is_periodic
    from aniserve.serving import Evaluator, Structure

    assert is_periodic(np.eye(3) * 0.009)
    assert is_periodic(np.eye(3) * 40)
    assert not is_periodic(np.zeros((3, 3)))
    assert not is_periodic(np.diag([40.0, 40.0, 0.0]))
    with pytest.raises(ValueError, match="too thin"):
        Evaluator(cached_model(DEFAULT_MODEL, "float64")).evaluate(
            [("k", Structure(np.array(ETHANOL_NUMBERS), np.array(ETHANOL_POSITIONS), np.eye(3) * 0.009 * 0.529))]
        )
