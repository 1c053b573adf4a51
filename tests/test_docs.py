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
