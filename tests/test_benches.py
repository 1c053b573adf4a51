"""The serving benchmarks run end to end and write the JSON they document (figures are
reported, never asserted: these machines are noisy)."""

import json

import pytest
from click.testing import CliRunner

from aniserve.cli import main

pytestmark = pytest.mark.slow  # left out of the quick run (pytest -m 'not slow')


def run(tmp_path, *args):
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["bench", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def test_bench_serve_reports_both_rates(tmp_path):
    output, report = run(tmp_path, "serve", "--connections", "1,4", "--seconds", "0.5")
    assert [c["connections"] for c in report["cases"]] == [1, 4]
    assert all(c["driver_atoms_per_s"] > 0 and c["in_process_atoms_per_s"] > 0 for c in report["cases"])
    assert "driver atoms/s" in output


def test_bench_ase_compares_unix_and_inet(tmp_path):
    output, report = run(tmp_path, "ase", "--calls", "5")
    assert [r["client"] for r in report["rows"]] == ["in-process", "socket-unix", "socket-inet"]
    assert all(r["ms_per_call_median"] > 0 for r in report["rows"]) and "× UNIX" in output


def test_bench_speed_quick(tmp_path):
    output, report = run(tmp_path, "speed", "--quick")
    assert report["cases"] and all(c["ms_per_call"] > 0 for c in report["cases"]) and "ms/call" in output
