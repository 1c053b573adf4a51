"""The documentation says what the code does: README and docs/ snippets run, their commands
exist, every hook and contract is documented, and the CLI reference is current."""

import importlib.util
import inspect
import re
import shlex
import textwrap

import click
import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
OFFICIAL = re.compile(r"""["'](ani-1x|ani-1ccx|ani-2x)["']""")


def blocks(page, language):
    """The page's code blocks in that language, dedented (blocks inside list items are indented)."""
    return [textwrap.dedent(code) for code in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)]


def test_ci_runs_the_readme_test_command():
    block = blocks(ROOT / "README.md", "bash")[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    test_command = commands[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "pip install torch==2.13.0" in commands[0] and "torch==2.13.0" in ci


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    pages = {str(p.relative_to(ROOT)) for p in PAGES[1:]}
    assert pages - linked == set(), "docs pages the README does not link"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


PYTHON = [
    pytest.param(
        page, i, code, id=f"{page.relative_to(ROOT)}[{i}]", marks=[pytest.mark.weights] if OFFICIAL.search(code) else []
    )
    for page in PAGES
    for i, code in enumerate(blocks(page, "python"))
]


@pytest.mark.parametrize("page,index,code", PYTHON)
def test_python_snippets_run(page, index, code, monkeypatch):
    """Each page's Python, as a user copies it, run from the repository root."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, f"{page.name}[{index}]", "exec"), namespace)


@pytest.mark.weights
def test_the_python_page_computes_what_it_says(monkeypatch):
    """The API page's example, checked beyond running: shapes, energy, periodicity."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(blocks(ROOT / "docs" / "python.md", "python")[0], "python.md", "exec"), namespace)
    assert namespace["hessian"].shape == (9, 9) and float(namespace["energy"]) < -76
    assert namespace["box"].pbc.all()


def _aniserve_lines():
    for page in PAGES:
        for block in blocks(page, "bash"):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                for command in line.split("#")[0].split(";"):
                    command = command.split("&&")[-1].strip()
                    if command.startswith("aniserve ") or command.startswith("OMP_NUM_THREADS=1 aniserve "):
                        yield page, command.removeprefix("OMP_NUM_THREADS=1 ")


COMMANDS = list(_aniserve_lines())


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p.name}:{c[:60]}" for p, c in COMMANDS])
def test_documented_commands_and_options_exist(page, command):
    """Every `aniserve ...` line in README and docs names a real command and real options."""
    from aniserve.cli import main

    words = shlex.split(command)[1:]
    cmd, context = main, click.Context(main)
    while isinstance(cmd, click.Group):
        while words and words[0].startswith("-"):  # group options, e.g. --plugin X
            words = words[2:]
        assert words and words[0] in cmd.list_commands(context), f"{page.name}: no command in {command!r}"
        cmd = cmd.get_command(context, words.pop(0))
    known = {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{page.name}: `{command}` uses unknown option {word}"


def test_the_tour_commands_cover_the_command_groups():
    from aniserve.cli import main

    used = {c.split()[1] for p, c in COMMANDS if p.name == "README.md"}
    assert {"eval", "drive", "data", "transfer", "bench", "models", "plugins", "export"} <= used
    assert used <= set(main.list_commands(click.Context(main)))


def test_every_hook_contract_and_builtin_is_documented():
    from aniserve import contracts, hookspecs
    from aniserve.registry import KINDS, registry

    page = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("aniserve_")]
    assert sorted(hooks) == sorted(KINDS.values())
    for kind, hook in KINDS.items():
        contract = contracts.CONTRACTS[kind][0].__name__
        row = re.search(rf"^\| `{hook}` \| `{kind}` \| `{contract}` \| (.*) \|$", page, re.M)
        assert row, f"docs/plugins.md has no row for {hook}"
        assert f"**`{contract}`**" in page, f"docs/plugins.md does not describe {contract}"
        builtins = {c["name"] for c in registry().listing() if c["kind"] == kind and c["plugin"] == "aniserve"}
        assert builtins == set(re.findall(r"`([^`]+)`", row.group(1))), f"{hook}: built-ins differ"


def test_the_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("make_cli_reference", ROOT / "docs" / "make_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text() == module.reference(), (
        "docs/cli.md is stale: run python docs/make_cli_reference.py"
    )


@pytest.mark.slow
def test_the_ipi_input_runs_with_real_ipi(tmp_path):
    """docs/serving.md's i-PI input and drive command, as given (a short run, a socket
    name of its own): i-PI steps, the driver serves every bead and ends cleanly."""
    import pathlib
    import shutil
    import subprocess
    import sys
    import uuid

    import numpy as np

    page = (ROOT / "docs" / "serving.md").read_text()
    xml = blocks(ROOT / "docs" / "serving.md", "xml")[0]
    command = re.search(r"then `(aniserve drive [^`]*)`", page.replace("\n", " ")).group(1).split()
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
    driver = subprocess.run(
        [sys.executable, "-m", "aniserve", *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    out = server.communicate(timeout=60)[0].decode()
    assert driver.returncode == 0, driver.stderr + out
    data = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert len(data) == 3 and np.isfinite(data[:, 2]).all()  # steps 0, 10, 20
    served = re.search(r"served (\d+) structures", driver.stderr)
    assert "(8 connections)" in driver.stderr and served and int(served.group(1)) >= 8 * 20, driver.stderr


@pytest.mark.slow
def test_the_ffdirect_block_runs_inside_real_ipi(tmp_path):
    """docs/serving.md's <ffdirect> block in place of the input's <ffsocket> line, PATH
    and model filled in: i-PI alone runs the 8 beads through aniserve.ipi_pes."""
    import pathlib
    import shutil
    import subprocess
    import sys

    import numpy as np

    from aniserve import ipi_pes

    first, direct = blocks(ROOT / "docs" / "serving.md", "xml")[:2]
    socket_line = next(line for line in first.splitlines() if "<ffsocket" in line)
    direct = direct.replace("PATH", str(pathlib.Path(ipi_pes.__file__).resolve()))
    direct = direct.replace("model: ani-1ccx", "model: aniserve-1x-ccsdt")  # no official weights needed
    xml = first.replace(socket_line, direct).replace("<total_steps>1000</total_steps>", "<total_steps>20</total_steps>")
    (tmp_path / "input.xml").write_text(xml)
    (tmp_path / "examples" / "molecules").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "molecules" / "ethanol.xyz", tmp_path / "examples" / "molecules")
    ipi = str(pathlib.Path(sys.executable).parent / "i-pi")
    run = subprocess.run([ipi, "input.xml"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert len(data) == 3 and np.isfinite(data[:, 2]).all() and data[0, 2] < -150  # steps 0, 10, 20; ethanol, Ha
