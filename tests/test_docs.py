"""The README's commands are the ones CI runs, and its Python example runs."""

import re

import pytest

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    test_command = commands[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "pip install torch==2.13.0" in commands[0] and "torch==2.13.0" in ci


@pytest.mark.weights
def test_the_readme_python_snippet_runs(monkeypatch):
    """The README's Python example, as a user copies it (run from the repository root)."""
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## Use from Python")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["hessian"].shape == (9, 9) and float(namespace["energy"]) < -76
    assert namespace["box"].pbc.all()


@pytest.mark.slow
def test_the_readme_ipi_input_runs_with_real_ipi(tmp_path):
    """The README's i-PI input and drive command, as given (a short run, a socket name
    of its own): i-PI steps, the driver serves every bead and ends cleanly."""
    import pathlib
    import shutil
    import subprocess
    import sys
    import uuid

    import numpy as np

    readme = (ROOT / "README.md").read_text()
    xml = re.search(r"```xml\n(.*?)```", readme, re.S).group(1)
    command = re.search(r"then `(aniserve drive [^`]*)`", readme.replace("\n", " ")).group(1).split()
    name = f"ani{uuid.uuid4().hex[:8]}"
    xml = xml.replace("<total_steps>1000</total_steps>", "<total_steps>20</total_steps>")
    xml = xml.replace("<address>ethanol</address>", f"<address>{name}</address>")
    (tmp_path / "input.xml").write_text(xml)
    (tmp_path / "examples" / "molecules").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "molecules" / "ethanol.xyz", tmp_path / "examples" / "molecules")
    command[command.index("--unix") + 1] = name
    command[command.index("--model") + 1] = "aniserve-1x-ccsdt"  # no official weights needed
    ipi = str(pathlib.Path(sys.executable).parent / "i-pi")
    server = subprocess.Popen([ipi, "input.xml"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    driver = subprocess.run([sys.executable, "-m", "aniserve", *command[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    out = server.communicate(timeout=60)[0].decode()
    assert driver.returncode == 0, driver.stderr + out
    data = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert len(data) == 3 and np.isfinite(data[:, 2]).all()  # steps 0, 10, 20
    served = re.search(r"served (\d+) structures", driver.stderr)
    assert "(8 connections)" in driver.stderr and served and int(served.group(1)) >= 8 * 20, driver.stderr
