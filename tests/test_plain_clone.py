"""A plain clone, without ../shared: the tests that need the official weights skip with
one reason and everything else runs; ANISERVE_MODEL_DIR alone (as users set it) makes
them run; under CI (ANISERVE_REQUIRE_WEIGHTS=1) missing weights are an error instead,
so CI never skips them."""

import os
import subprocess
import sys

import pytest
from conftest import REFERENCE, ROOT, ZOO


def run_pytest(tmp_path, *tests, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ANISERVE_")}
    environment.update(ANISERVE_SHARED=str(tmp_path / "no-shared"), **env)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(tests or ("tests/test_protocol.py", "tests/test_bad_input.py")),
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_without_shared_the_weight_tests_skip_with_one_reason(tmp_path):
    run = run_pytest(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" in summary and "failed" not in summary
    skipped = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1, skipped  # one line, however many tests it covers
    assert "official ANI weights not found" in skipped[0] and "ANISERVE_MODEL_DIR" in skipped[0]


@pytest.mark.slow
@pytest.mark.weights
def test_the_model_dir_alone_makes_the_weight_tests_run(tmp_path):
    """No shared folder, only ANISERVE_MODEL_DIR (and the references' path): the weight tests run, none skipped."""
    run = run_pytest(
        tmp_path, "tests/test_conformance.py", ANISERVE_MODEL_DIR=str(ZOO), ANISERVE_REFERENCE=str(REFERENCE)
    )
    assert run.returncode == 0, run.stdout[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary


def test_under_ci_a_missing_shared_folder_is_an_error(tmp_path):
    run = run_pytest(tmp_path, ANISERVE_REQUIRE_WEIGHTS="1")
    assert run.returncode != 0 and "CI must not skip these tests" in run.stdout + run.stderr
