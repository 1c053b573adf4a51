"""What a new user meets first: each mistake gives one clear line and the documented
exit status, not a traceback."""

import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT

from aniserve import exits
from aniserve.cli import main

ETHANOL = str(ROOT / "examples" / "molecules" / "ethanol.xyz")


def cli(*args):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, text, status=exits.FAILED):
    assert result.exit_code == status, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.output


def test_empty_structure_file(tmp_path):
    (tmp_path / "empty.xyz").write_text("")
    one_line_error(cli("eval", str(tmp_path / "empty.xyz")), "cannot read structures from")


def test_missing_model_file_is_named_as_missing():
    one_line_error(
        cli("eval", ETHANOL, "--model", "./missing.safetensors"),
        "model file './missing.safetensors' does not exist",
        exits.BAD_MODEL,
    )


def test_a_typo_in_a_model_name_gets_the_closest_name():
    one_line_error(
        cli("eval", ETHANOL, "--model", "ani-1xx"), "unknown model 'ani-1xx'. Did you mean 'ani-1x'?", exits.BAD_MODEL
    )


def test_coincident_atoms_are_an_error_not_nan(tmp_path):
    (tmp_path / "h2.xyz").write_text("2\n\nH 0 0 0\nH 0 0 0\n")
    result = cli("eval", str(tmp_path / "h2.xyz"))
    assert (
        result.exit_code == exits.BAD_STRUCTURE
        and "non-finite" in result.output
        and "atoms 0 and 1 are 0 Å apart" in result.output
    )
    assert "nan" not in result.output.lower().replace("non-finite", "")


def test_a_missing_optional_dependency_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyscf", None)  # as if the qm extra were not installed
    (tmp_path / "m.smi").write_text("CCO ethanol\n")
    result = cli("data", "generate", "--molecules", str(tmp_path / "m.smi"), "--out", str(tmp_path / "o.h5"))
    one_line_error(result, "this command needs pyscf: pip install 'aniserve[qm]'")


@pytest.mark.slow
def test_drive_with_an_element_the_model_lacks_exits_3(tmp_path):
    (tmp_path / "au.xyz").write_text("2\n\nAu 0 0 0\nH 0 0 1.5\n")
    run = subprocess.run(
        [sys.executable, "-m", "aniserve", "drive", "--structure", str(tmp_path / "au.xyz"), "--unix", "never-used"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3, run.stderr
    assert "does not support element(s) Au" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["off", "tensor"])
def test_kernels_switched_off_by_environment_say_so(setting):
    run = subprocess.run(
        [sys.executable, "-W", "always", "-c", "from aniserve import kernels; print(kernels.backend())"],
        capture_output=True,
        text=True,
        env={"ANISERVE_KERNELS": setting, "PATH": "/usr/bin:/bin"},
    )
    assert run.stdout.strip() == "tensor" and "compiled CPU kernels switched off" in run.stderr
    assert run.stderr.startswith("<string>:1: RuntimeWarning")  # the user's line, not one inside aniserve


@pytest.mark.parametrize("option", ["--shm", "--unix"])
@pytest.mark.parametrize("name", ["../x", "a/b", "..", "ok name"])
def test_socket_names_are_plain_names_or_absolute_paths(option, name):
    result = cli("drive", "--structure", ETHANOL, option, name)
    assert result.exit_code == exits.USAGE and "neither a plain name" in result.output


@pytest.mark.slow
def test_a_plugin_in_the_current_directory_loads_with_dash_dash_plugin(tmp_path):
    """As ``python -m`` does: before, `aniserve --plugin my_plugin` said 'not installed'."""
    (tmp_path / "my_plugin.py").write_text(
        "from aniserve import hookimpl\n"
        "from aniserve.training.strategies import FullFineTune\n\n"
        "class Mine(FullFineTune):\n    description = 'a strategy from the current directory'\n\n"
        "@hookimpl\ndef aniserve_transfer_strategies():\n    return {'mine': Mine}\n"
    )
    script = str(pathlib.Path(sys.executable).parent / "aniserve")  # the console script: no cwd on sys.path
    run = subprocess.run(
        [script, "--plugin", "my_plugin", "plugins"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "mine" in run.stdout and "a strategy from the current directory" in run.stdout
    missing = subprocess.run(
        [script, "--plugin", "no_such_plugin", "plugins"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert missing.returncode == exits.FAILED and "plugin module 'no_such_plugin' cannot be imported" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_benches_say_what_they_need_and_where_to_get_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aniserve", "bench", "active", "--quick"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == exits.USAGE and "come with the aniserve repository, not the wheel" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cache_is_listed_and_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("ANISERVE_CACHE", str(tmp_path))
    (tmp_path / "bench-transfer").mkdir()
    (tmp_path / "bench-transfer" / "m.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / "kernels").mkdir()
    listed = cli("cache")
    assert listed.exit_code == 0 and "bench-transfer" in listed.output and "2.0 MB" in listed.output
    assert cli("cache", "clear", "nothing-here").exit_code == exits.FAILED
    cleared = cli("cache", "clear", "bench-transfer")
    assert cleared.exit_code == 0 and "removed bench-transfer (2.0 MB)" in cleared.output
    assert not (tmp_path / "bench-transfer").exists() and (tmp_path / "kernels").exists()
