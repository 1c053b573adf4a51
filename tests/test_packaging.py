"""The wheel and the sdist hold everything a user needs: each is built, installed into
a fresh venv (its dependencies visible from this environment, aniserve itself only from
the package) and run: the embedded model evaluates, the kernels compile from the shipped
sources, the licences, model card, reaction sets and py.typed are there."""

import pathlib
import site
import subprocess
import sys
import venv

import pytest
from conftest import ROOT


def build(kind: str, out: pathlib.Path) -> pathlib.Path:
    code = (
        f"import os; os.chdir({str(ROOT)!r}); from setuptools import build_meta as b; "
        f"print(b.build_{kind}({str(out)!r}))"
    )
    name = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        .stdout.strip()
        .splitlines()[-1]
    )
    return out / name


def fresh_venv(folder: pathlib.Path) -> pathlib.Path:
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # This environment's packages as plain paths: their .pth files (among them the
    # editable install of aniserve) are not run, so aniserve comes only from the package.
    (pathlib.Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # The venv's own (older) setuptools would shadow this environment's, which the
    # sdist's licence metadata needs (≥ 77).
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], capture_output=True)
    return python


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_package_installs_and_runs_from_a_fresh_venv(kind, tmp_path):
    package = build(kind, tmp_path / "dist")
    python = fresh_venv(tmp_path / "venv")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(package)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    probe = (
        "import aniserve, pathlib, importlib.metadata as m; root = pathlib.Path(aniserve.__file__).parent; "
        "files = [str(f) for f in m.files('aniserve')]; "
        "print(root); print(all((root / p).exists() for p in ['py.typed', 'embedded/MODEL_CARD.md', "
        "'embedded/LICENSE-ani-model-zoo', 'kernels/aev.cpp', 'bench/reactions/reactions.json'])); "
        "print(any(f.endswith('licenses/LICENSE') for f in files))"
    )
    root, shipped, licence = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.split()
    assert pathlib.Path(root).is_relative_to(tmp_path / "venv"), root
    assert shipped == "True" and licence == "True"
    (tmp_path / "ethanol.xyz").write_text((ROOT / "examples" / "molecules" / "ethanol.xyz").read_text())
    run = subprocess.run(
        [str(python), "-m", "aniserve", "eval", "ethanol.xyz"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr
    assert "model: aniserve-1x-ccsdt" in run.stdout and "E = -154." in run.stdout
