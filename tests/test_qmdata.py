"""Reference-data generation: real PySCF numbers, safe to kill, resume and share."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT

GENERATE = [sys.executable, "-m", "aniserve", "data", "generate"]


def molecules(tmp_path, names=("O water", "C methane")):
    path = tmp_path / "molecules.smi"
    path.write_text("# test molecules\n" + "\n".join(names) + "\n")
    return path


def read_records(path, low="hf_sto3g", high="ccsd(t)_sto3g"):
    out = {}
    with h5py.File(path, "r") as f:
        for group in f.values():
            for c, rid in enumerate(group["record_id"][()]):
                out[rid.decode()] = {
                    "numbers": group["atomic_numbers"][()],
                    "positions": group["coordinates"][c],
                    "low": group[f"{low}.energy"][c],
                    "forces": group[f"{low}.forces"][c],
                    "high": group[f"{high}.energy"][c] if f"{high}.energy" in group else np.nan,
                }
    return out


@pytest.mark.slow
def test_energies_match_a_direct_pyscf_call(tmp_path):
    from pyscf import cc, gto, scf

    out = tmp_path / "tiny.h5"
    subprocess.run(
        GENERATE
        + [
            "--molecules",
            str(molecules(tmp_path)),
            "--out",
            str(out),
            "--conformations",
            "3",
            "--low",
            "hf/sto-3g",
            "--high",
            "ccsd(t)/sto-3g",
            "--high-every",
            "2",
            "--no-density-fit",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    records = read_records(out)
    assert sorted(records) == ["methane~0", "methane~1", "methane~2", "water~0", "water~1", "water~2"]
    assert np.isnan(records["water~1"]["high"]) and not np.isnan(records["water~2"]["high"])
    rec = records["water~2"]
    mol = gto.M(atom=[(int(z), p) for z, p in zip(rec["numbers"], rec["positions"])], basis="sto-3g", verbose=0)
    mf = scf.RHF(mol).run(conv_tol=1e-10)
    assert abs(mf.e_tot - rec["low"]) < 1e-8
    from aniserve.units import BOHR_IN_ANGSTROM

    np.testing.assert_allclose(rec["forces"], -mf.nuc_grad_method().kernel() / BOHR_IN_ANGSTROM, atol=1e-6)
    ccsd = cc.CCSD(mf).set_frozen().run()
    assert abs(ccsd.e_tot + ccsd.ccsd_t() - rec["high"]) < 1e-8
    with h5py.File(out) as f:
        assert "PySCF" in f.attrs["levels"] and "temperature_k" in f["H2O"]
        assert (f["H2O"]["hf_sto3g.wall_s"][()] > 0).all()
    # The training code reads it: every conformation at the low level, every 2nd at the high.
    from aniserve.training import ANIData

    assert len(ANIData(out, "hf_sto3g.energy", "hf_sto3g.forces")) == 6
    assert len(ANIData(out, "ccsd(t)_sto3g.energy")) == 4  # conformations 0 and 2 of each


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path):
    out = tmp_path / "resume.h5"
    args = GENERATE + [
        "--molecules",
        str(molecules(tmp_path, ("O water", "C methane", "N ammonia", "CO methanol"))),
        "--out",
        str(out),
        "--conformations",
        "6",
        "--low",
        "hf/3-21g",
        "--high",
        "none",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    records_dir = tmp_path / "resume.work" / "records"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(records_dir.glob("*.json"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the submitting process and its local cluster
    proc.wait()
    first = {p.stem: p.read_text() for p in records_dir.glob("*.json")}
    assert 5 <= len(first) < 24
    again = subprocess.run(args + ["--workers", "2"], cwd=ROOT, capture_output=True, timeout=300)
    log = again.stderr.decode()
    assert again.returncode == 0, log
    assert f"{len(first)} already done" in log
    records = read_records(out, low="hf_321g")
    assert len(records) == 24
    for job_id, text in first.items():  # nothing finished before the kill was recomputed
        assert (records_dir / f"{job_id}.json").read_text() == text
    computed = [line for line in log.splitlines() if line.startswith("[")]
    assert len(computed) == 24 - len(first)  # each remaining calculation done exactly once
    assert "0 failed" in log.splitlines()[-2]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_dask_cluster_survives_a_killed_worker(tmp_path):
    """dask scheduler + two dask workers on 127.0.0.1; one is SIGKILLed mid-run: the job
    still completes, every record once, values equal to a LocalCluster run."""
    mols = molecules(tmp_path, ("O water", "C methane", "N ammonia"))
    common = [
        "--molecules",
        str(mols),
        "--conformations",
        "8",
        "--low",
        "hf/6-31g",
        "--high",
        "none",
        "--no-density-fit",
    ]
    local = subprocess.run(
        GENERATE + common + ["--out", str(tmp_path / "local.h5")], cwd=ROOT, capture_output=True, timeout=300
    )
    assert local.returncode == 0, local.stderr.decode()
    port = _free_port()
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler = subprocess.Popen(
        dask + ["--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--no-nanny",
                "--host",
                "127.0.0.1",
                "--dashboard-address",
                ":0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        out = tmp_path / "cluster.h5"
        job = subprocess.Popen(
            GENERATE + common + ["--out", str(out), "--scheduler", address],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        records_dir = tmp_path / "cluster.work" / "records"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(records_dir.glob("*.json"))) < 3:
            time.sleep(0.05)
        workers[0].kill()  # SIGKILL, mid-run
        log = job.communicate(timeout=300)[1].decode()
        assert job.returncode == 0, log
        assert 3 <= len([line for line in log.splitlines() if line.startswith("[")]) <= 24
        cluster, reference = read_records(out, low="hf_631g"), read_records(tmp_path / "local.h5", low="hf_631g")
        assert sorted(cluster) == sorted(reference) and len(cluster) == 24
        for rid, rec in reference.items():
            np.testing.assert_array_equal(cluster[rid]["positions"], rec["positions"])
            assert abs(cluster[rid]["low"] - rec["low"]) < 1e-8
            np.testing.assert_allclose(cluster[rid]["forces"], rec["forces"], atol=1e-7)
        with h5py.File(out) as f:
            ids = [i for g in f.values() for i in g["record_id"][()]]
        assert len(ids) == len(set(ids)) == 24
    finally:
        for p in (*workers, scheduler):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_label_round_trip_matches_pyscf(tmp_path):
    import ase
    import ase.io
    from pyscf import gto, scf

    from aniserve.training import ANIData
    from aniserve.units import BOHR_IN_ANGSTROM

    frames = [
        ase.Atoms("HOH", positions=[[0.76, 0.59, 0.0], [0.0, 0.0, 0.0], [-0.76, 0.59 + d, 0.0]]) for d in (0.0, 0.05)
    ]
    frames.append(
        ase.Atoms("NH3", positions=[[0, 0, 0.1], [0.94, 0, -0.25], [-0.47, 0.81, -0.25], [-0.47, -0.81, -0.25]])
    )
    xyz = tmp_path / "collected.extxyz"
    ase.io.write(xyz, frames)
    out = tmp_path / "labelled.h5"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aniserve",
            "data",
            "label",
            str(xyz),
            "--level",
            "hf/sto-3g",
            "--forces",
            "--no-density-fit",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode()
    data = ANIData(out, "hf_sto3g.energy", "hf_sto3g.forces")
    assert len(data) == 3
    batch = data.read([(gi, int(c)) for gi, g in enumerate(data.groups) for c in g.conformations])
    for b in range(len(batch)):
        real = batch.numbers[b] > 0
        numbers, positions = batch.numbers[b][real].numpy(), batch.positions[b][real].numpy()
        mf = scf.RHF(gto.M(atom=[(int(z), p) for z, p in zip(numbers, positions)], basis="sto-3g", verbose=0))
        mf.run(conv_tol=1e-10)
        assert abs(mf.e_tot - float(batch.energy[b])) < 1e-8
        np.testing.assert_allclose(
            batch.forces[b][real].numpy(), -mf.nuc_grad_method().kernel() / BOHR_IN_ANGSTROM, atol=1e-6
        )
    # Labelling again at a second level keeps the first and computes nothing twice.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "aniserve",
            "data",
            "label",
            str(out),
            "--level",
            "hf/3-21g",
            "--no-density-fit",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr.decode()
    assert len(ANIData(out, "hf_sto3g.energy", "hf_sto3g.forces")) == 3 and len(ANIData(out, "hf_321g.energy")) == 3
    same = subprocess.run(
        [
            sys.executable,
            "-m",
            "aniserve",
            "data",
            "label",
            str(xyz),
            "--level",
            "hf/sto-3g",
            "--forces",
            "--no-density-fit",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert same.returncode == 0 and "all already done" in same.stderr.decode()


@pytest.mark.slow
def test_label_refuses_bad_input_with_one_line(tmp_path):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aniserve",
            "data",
            "label",
            str(empty),
            "--level",
            "hf/sto-3g",
            "--out",
            str(tmp_path / "x.h5"),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 1 and "empty file" in run.stderr.decode()
    assert "Traceback" not in run.stderr.decode()


@pytest.mark.slow
def test_failed_calculation_is_retried_then_reported(tmp_path):
    """A hydrogen atom cannot be a closed shell: the calculation fails on every try, is
    reported by record (exit 1), and the good record is written."""
    import ase
    import ase.io

    xyz = tmp_path / "mixed.extxyz"
    ase.io.write(xyz, [ase.Atoms("H"), ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])])
    out = tmp_path / "mixed.h5"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aniserve",
            "data",
            "label",
            str(xyz),
            "--level",
            "hf/sto-3g",
            "--retries",
            "1",
            "--no-density-fit",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    log = run.stderr.decode()
    assert run.returncode == 1, log
    assert "1 computed, 0 already done, 1 failed of 2" in log and "failed: mixed~" in log
    assert "Traceback" not in log
    failures = json.loads((tmp_path / "mixed.work" / "failures.json").read_text())
    assert len(failures) == 1 and "spin" in next(iter(failures.values())).lower()
    with h5py.File(out) as f:
        assert list(f) == ["H2"]


@pytest.mark.slow
def test_ccsd_t_forces_label_the_records_that_have_ccsd_t_energies(tmp_path):
    """``data label --forces --having`` adds CCSD(T) forces to records that have CCSD(T)
    energies (at most --per-molecule each), in the layout's forces key of that level;
    the forces are −dE/dx of the stored CCSD(T) energy (central finite differences of
    PySCF's own energy), and a second run computes nothing."""
    from pyscf import cc, gto, scf

    out = tmp_path / "cc.h5"
    subprocess.run(
        GENERATE
        + [
            "--molecules",
            str(molecules(tmp_path)),
            "--out",
            str(out),
            "--conformations",
            "3",
            "--low",
            "hf/sto-3g",
            "--high",
            "ccsd(t)/sto-3g",
            "--high-every",
            "2",
            "--no-density-fit",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    before = read_records(out)
    label = [
        sys.executable,
        "-m",
        "aniserve",
        "data",
        "label",
        str(out),
        "--level",
        "ccsd(t)/sto-3g",
        "--forces",
        "--having",
        "ccsd(t)/sto-3g",
        "--per-molecule",
        "1",
        "--out",
        str(out),
    ]
    run = subprocess.run(label, cwd=ROOT, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()
    with h5py.File(out) as f:
        forces = {rid.decode(): f[g]["ccsd(t)_sto3g.forces"][c] for g in f for c, rid in enumerate(f[g]["record_id"])}
        energies = {rid.decode(): f[g]["ccsd(t)_sto3g.energy"][c] for g in f for c, rid in enumerate(f[g]["record_id"])}
    labelled = sorted(rid for rid, value in forces.items() if np.isfinite(value).all())
    assert labelled == ["methane~0", "water~0"]  # the first conformation with CCSD(T) of each molecule
    for rid in before:  # nothing else changed (the labelled ones' energies come from the gradient's own calculation)
        tolerance = 1e-7 if rid in labelled else 0.0
        assert abs(energies[rid] - before[rid]["high"]) <= tolerance or (
            np.isnan(energies[rid]) and np.isnan(before[rid]["high"])
        )
    with h5py.File(out) as f:
        assert "sampling" in f.attrs  # labelling kept how the file was sampled

    def energy(numbers, positions):
        mf = scf.RHF(gto.M(atom=[(int(z), p) for z, p in zip(numbers, positions)], basis="sto-3g", verbose=0))
        mf.run(conv_tol=1e-12)
        coupled = cc.CCSD(mf).set_frozen()
        coupled.conv_tol = 1e-10
        coupled.run()
        return coupled.e_tot + coupled.ccsd_t()

    rec, step = before["water~0"], 1e-4
    for atom, axis in ((0, 0), (1, 2), (2, 1)):
        shifted = [rec["positions"].copy(), rec["positions"].copy()]
        shifted[0][atom, axis] += step
        shifted[1][atom, axis] -= step
        numeric = -(energy(rec["numbers"], shifted[0]) - energy(rec["numbers"], shifted[1])) / (2 * step)
        assert abs(forces["water~0"][atom, axis] - numeric) < 2e-6, (atom, axis)
    again = subprocess.run(label, cwd=ROOT, capture_output=True, timeout=300)
    assert again.returncode == 0 and "all already done" in again.stderr.decode()


def test_records_of_an_ani_file_written_elsewhere_keep_every_level(tmp_path):
    """An ANI file with no 'levels' attribute (written by another program, or by
    write_ani_h5): its records keep each '<level>.energy'/'.forces' pair, so a split of
    it (``bench active --hold-out``) loses no label; NaN still means not computed."""
    from aniserve.qmdata.records import read_h5, write_records
    from aniserve.training.data import write_ani_h5

    water = np.array([8, 1, 1])
    positions = np.array([[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]] * 2, float)
    forces = np.arange(18, dtype=float).reshape(2, 3, 3)
    write_ani_h5(
        tmp_path / "plain.h5",
        {
            "H2O": {
                "atomic_numbers": water,
                "coordinates": positions,
                "wb97x_631gd.energy": np.array([-76.1, -76.2]),
                "wb97x_631gd.forces": forces,
                "ccsd(t)_ccpvdz.energy": np.array([np.nan, -76.3]),
            }
        },
    )
    records = read_h5(tmp_path / "plain.h5")
    assert [sorted(r["levels"]) for r in records] == [["wb97x_631gd"], ["ccsd(t)_ccpvdz", "wb97x_631gd"]]
    assert records[1]["levels"]["wb97x_631gd"]["forces"] == forces[1].tolist()
    write_records(records, tmp_path / "copy.h5")
    with h5py.File(tmp_path / "copy.h5") as f:
        (group,) = f.values()
        assert np.allclose(group["wb97x_631gd.energy"][()], [-76.1, -76.2])
        assert np.allclose(group["ccsd(t)_ccpvdz.energy"][()], [np.nan, -76.3], equal_nan=True)


def test_label_orders_cover_every_molecule_first_or_finish_the_cheapest_first():
    """data label's queue: ``coverage`` takes each molecule's first structure (smallest
    molecules first) before any second; ``cheapest`` takes every structure of a smaller
    molecule (fewer heavy atoms, then fewer atoms) before any of a larger one; an unknown
    order is refused."""
    from aniserve.qmdata.label import select

    def structures(name, numbers, count):
        return [{"name": name, "index": i, "numbers": numbers, "id": f"{name}~{i}"} for i in range(count)]

    pool = structures("ethanol", [8, 6, 6, 1, 1, 1, 1, 1, 1], 3)
    pool += structures("water", [8, 1, 1], 3) + structures("methane", [6, 1, 1, 1, 1], 3)
    coverage = [s["id"] for s in select(pool, [], per_molecule=2)]
    assert coverage == ["water~0", "methane~0", "ethanol~0", "water~1", "methane~1", "ethanol~1"]
    cheapest = [s["id"] for s in select(pool, [], per_molecule=2, order="cheapest")]
    assert cheapest == ["water~0", "water~1", "methane~0", "methane~1", "ethanol~0", "ethanol~1"]
    with pytest.raises(ValueError, match="the order is one of coverage, cheapest"):
        select(pool, [], order="largest")


def test_ccsd_t_lambda_gets_its_iterations_and_an_unconverged_one_is_named(monkeypatch):
    """The (T) Λ equations get LAMBDA_MAX_CYCLE iterations (PySCF's 50 left distorted
    glyoxal unconverged), and a Λ that still does not converge fails the structure with a
    message naming the cap, never a gradient from unconverged amplitudes."""
    from pyscf.cc import ccsd_t_lambda

    from aniserve.qmdata.levels import LAMBDA_MAX_CYCLE, Level, compute

    asked = {}

    def unconverged(*args, max_cycle=50, **kw):
        asked["max_cycle"] = max_cycle
        return False, None, None

    monkeypatch.setattr(ccsd_t_lambda, "kernel", unconverged)
    h2 = (np.array([1, 1]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]]))
    with pytest.raises(RuntimeError, match=f"lambda equations did not converge in {LAMBDA_MAX_CYCLE} iterations"):
        compute(Level.parse("ccsd(t)/sto-3g"), *h2, forces=True)
    assert asked["max_cycle"] == LAMBDA_MAX_CYCLE > 50
