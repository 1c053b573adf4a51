"""Reference-data generation: real PySCF numbers, safe to kill, resume and share."""

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
                    "numbers": group["atomic_numbers"][()], "positions": group["coordinates"][c],
                    "low": group[f"{low}.energy"][c], "forces": group[f"{low}.forces"][c],
                    "high": group[f"{high}.energy"][c] if f"{high}.energy" in group else np.nan,
                }
    return out


def test_energies_match_a_direct_pyscf_call(tmp_path):
    from pyscf import cc, gto, scf

    out = tmp_path / "tiny.h5"
    subprocess.run(GENERATE + ["--molecules", str(molecules(tmp_path)), "--out", str(out), "--conformations", "3",
                               "--low", "hf/sto-3g", "--high", "ccsd(t)/sto-3g", "--high-every", "2",
                               "--no-density-fit"], check=True, cwd=ROOT, capture_output=True)
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


def test_killed_run_resumes_without_duplicates(tmp_path):
    out = tmp_path / "resume.h5"
    args = GENERATE + ["--molecules", str(molecules(tmp_path, ("O water", "C methane", "N ammonia", "CO methanol"))),
                       "--out", str(out), "--conformations", "6", "--low", "hf/3-21g", "--high", "none"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    records_dir = tmp_path / "resume.work" / "records"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(records_dir.glob("*.json"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.stem: p.read_text() for p in records_dir.glob("*.json")}
    assert 5 <= len(first) < 24
    # Two workers at once, finishing the job the killed run left.
    procs = [subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) for _ in range(2)]
    logs = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert f"{len(first)} already done" in logs[0] or f"{len(first)} already done" in logs[1]
    records = read_records(out, low="hf_321g")
    assert len(records) == 24
    for job_id, text in first.items():  # nothing finished before the kill was recomputed
        assert (records_dir / f"{job_id}.json").read_text() == text
    computed = [line for log in logs for line in log.splitlines() if line.startswith("[")]
    assert len(computed) == 24 - len(first)  # each remaining job done exactly once
