"""Seeded fuzz campaigns.  The driver (tests/fuzz_driver.py): 300 random, mostly
hostile sequences from a fake i-PI server, one ``aniserve drive`` each, in four families
(random messages, hostile shared-memory names, real segments damaged between steps, a
server that never reads).  The file readers (tests/fuzz_files.py): crafted model
descriptions, NeuroChem folders and HDF5 files, each loaded in a forked child.  No
traceback, no signal, no run past its timeouts, memory within 100 MB of a normal run,
and every exit status a documented one.  ``pytest --fuzz-sequences 20000
--fuzz-files 5000`` runs longer campaigns."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_driver_survives_a_fuzz_campaign(tmp_path, request):
    sequences = request.config.getoption("--fuzz-sequences")
    out = tmp_path / "fuzz.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz_driver.py"),
            "--sequences",
            str(sequences),
            "--seed",
            "0",
            "--json",
            str(out),
        ],
        check=True,
        timeout=60 + 2 * sequences,
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    failures = [o for o in report["outcomes"] if o["traceback"] or o["hung"] or o["exit"] not in (0, 2, 3, 4)]
    assert not failures, json.dumps(failures[:3], indent=1)
    assert report["baseline"]["exit"] == 0
    assert not any("Usage:" in o["stderr"] for o in report["outcomes"])  # every driver got past its options
    assert report["max_extra_rss_mb"] < 100
    # The campaign reached every kind of ending: served-and-gone, protocol errors, bad structures.
    assert {0, 2, 3} <= set(o["exit"] for o in report["outcomes"])
    for family, summary in report["families"].items():
        assert summary["tries"] >= sequences // 20, (family, summary)
        assert summary["signals"] == summary["tracebacks"] == summary["hung"] == summary["undocumented"] == 0
    # A server that never reads is dropped for it (2), never waited on for ever (a server
    # that closes early instead ends its connection cleanly, 0).
    backpressure = report["families"]["backpressure"]["exit_counts"]
    assert backpressure.get("2", 0) > sum(backpressure.values()) / 2, backpressure


@pytest.mark.slow
@pytest.mark.weights  # the NeuroChem family copies the official ANI-1x folder
def test_file_readers_survive_a_fuzz_campaign(tmp_path, request):
    tries = request.config.getoption("--fuzz-files")
    out = tmp_path / "fuzz-files.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz_files.py"),
            "--tries",
            str(tries),
            "--seed",
            "0",
            "--json",
            str(out),
        ],
        check=True,
        timeout=120 + 2 * tries,
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    assert report["families_left_out"] == [] and report["baseline"]["exit"] == 0
    for family, summary in report["families"].items():
        bad = [o for o in report["outcomes"] if o["family"] == family and (o["traceback"] or o["signal"] or o["hung"])]
        assert not bad, json.dumps(bad[:3], indent=1)
        assert summary["tries"] >= tries // 4 and summary["refused"] >= summary["tries"] // 2, (family, summary)
        assert summary["max_rss_mb"] - report["baseline"]["maxrss_mb"] < 100, (family, summary)
