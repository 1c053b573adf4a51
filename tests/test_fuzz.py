"""The driver under a seeded fuzz campaign (tests/fuzz_driver.py): ≥ 1,000 random, mostly
hostile message sequences from a fake i-PI server, one ``aniserve drive`` each.  No
traceback, no run past its timeouts, memory within 100 MB of a normal run, and every exit
status a documented one.  ``pytest --fuzz-sequences 20000`` runs a longer campaign."""

import json
import subprocess
import sys


import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # left out of the quick run (pytest -m 'not slow')


def test_driver_survives_a_fuzz_campaign(tmp_path, request):
    sequences = request.config.getoption("--fuzz-sequences")
    out = tmp_path / "fuzz.json"
    subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_driver.py"), "--sequences", str(sequences),
                    "--seed", "0", "--json", str(out)], check=True, timeout=60 + 2 * sequences, cwd=tmp_path)
    report = json.loads(out.read_text())
    failures = [o for o in report["outcomes"] if o["traceback"] or o["hung"] or o["exit"] not in (0, 2, 3, 4)]
    assert not failures, json.dumps(failures[:3], indent=1)
    assert report["baseline"]["exit"] == 0
    assert not any("Usage:" in o["stderr"] for o in report["outcomes"])  # every driver got past its options
    assert report["max_extra_rss_mb"] < 100
    # The campaign reached every kind of ending: served-and-gone, protocol errors, bad structures.
    assert {0, 2, 3} <= set(o["exit"] for o in report["outcomes"])
