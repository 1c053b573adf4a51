"""Bad input gets an error that names the problem."""

import os
import re
import shutil

import numpy as np
import pytest
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, ZOO

import aniserve
from aniserve.modelfile import ModelFileError, load_saved, save_model
from aniserve.neurochem import NeuroChemError, load_neurochem

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def test_unsupported_element_is_named(ani1ccx):
    numbers = list(ETHANOL_NUMBERS)
    numbers[0] = 14
    with pytest.raises(ValueError, match=r"does not support element\(s\) Si \(1 atom\).*H, C, N, O"):
        ani1ccx.evaluate(numbers, ETHANOL_POSITIONS)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_positions(ani1ccx, bad):
    x = np.array(ETHANOL_POSITIONS)
    x[4, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*atom 4"):
        ani1ccx.evaluate(ETHANOL_NUMBERS, x)


def test_singular_cell(ani1ccx):
    cell = np.array([[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0]])
    with pytest.raises(ValueError, match="cell is singular"):
        ani1ccx.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS, cell)


def test_mismatched_shapes(ani1ccx):
    with pytest.raises(ValueError, match=r"shape mismatch: numbers \(8,\) and positions \(9, 3\)"):
        ani1ccx.evaluate(ETHANOL_NUMBERS[:-1], ETHANOL_POSITIONS)
    with pytest.raises(ValueError, match=r"cell must be \(3, 3\)"):
        ani1ccx.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS, np.eye(2))


def test_unknown_model_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("ANISERVE_MODEL_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("ANISERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANISERVE_MODEL_ZOO_URL", "http://127.0.0.1:9/unreachable.zip")
    with pytest.raises(LookupError) as error:
        aniserve.load_model("ani-1ccx")
    text = str(error.value)
    assert "ANISERVE_MODEL_DIR" in text and str(tmp_path / "cache") in text and "download" in text


def test_corrupt_neurochem_network(tmp_path):
    member = tmp_path / "model"
    shutil.copytree(ZOO / "ani-1x_8x" / "train0", member)
    member.joinpath("sae_linfit.dat").write_text((ZOO / "ani-1x_8x" / "sae_linfit.dat").read_text())
    nnf = member / "networks" / "ANN-C.nnf"
    nnf.chmod(0o644)
    nnf.write_bytes(b"1135=\n" + b"not bzip2 at all")
    with pytest.raises(NeuroChemError, match=r"ANN-C.nnf: corrupt bzip2"):
        load_neurochem(member)
    wparam = member / "networks" / "ANN-C.nnf-l2.wparam"
    nnf.write_bytes((ZOO / "ani-1x_8x" / "train0" / "networks" / "ANN-C.nnf").read_bytes())
    wparam.chmod(0o644)
    wparam.write_bytes(wparam.read_bytes()[:100])
    with pytest.raises(NeuroChemError, match=r"l2.wparam: holds 25 float32 values"):
        load_neurochem(member)


def test_corrupt_and_foreign_model_files(tmp_path, ani1ccx):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_saved(garbage)
    import torch
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelFileError, match="without an aniserve model description"):
        load_saved(foreign)
    good = tmp_path / "m.safetensors"
    save_model(ani1ccx, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ModelFileError):
        load_saved(truncated)


def _zoo_copy(tmp_path, without):
    """The ANI-1x folder as symlinks, one member left out."""
    zoo = ZOO
    folder = tmp_path / "ani-1x_8x"
    folder.mkdir()
    for item in (zoo / "ani-1x_8x").iterdir():
        if item.name != without:
            (folder / item.name).symlink_to(item)
    return folder


@pytest.mark.parametrize("missing", ["train3", "train7"])
def test_an_incomplete_neurochem_ensemble_is_an_error_unless_asked_for(tmp_path, missing):
    folder = _zoo_copy(tmp_path, missing)
    if missing == "train7":  # the last member: only the .info file can tell it is gone
        (tmp_path / "ani-1x_8x.info").write_text((ZOO / "ani-1x_8x.info").read_text())
    with pytest.raises(NeuroChemError, match=rf"{missing}/networks: ensemble member folder is missing \(7 of 8"):
        load_neurochem(folder)
    with pytest.warns(UserWarning, match=rf"serving 7 of 8 ensemble members \({missing} missing\)"):
        model = load_neurochem(folder, allow_incomplete=True)
    assert model.ensemble_size == 7


# ------------------------------------------------------------------ crafted NeuroChem files
def _params_with(text: str, **values) -> str:
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        lines.append(f"{key} = {values[key]}" if key in values else line)
    return "\n".join(lines) + "\n"


def _bzip2_nnf(text: bytes) -> bytes:
    import bz2

    packed = bz2.compress(text, 9)
    return f"{len(packed)}=\n".encode() + packed


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _link(path, target):
    path.unlink()
    path.symlink_to(target)


PARAMS = "rHCNO-5.2R_16-3.5A_a4-8.params"
NEUROCHEM_DAMAGE = {
    # (what to do to the one-member model folder, the error expected)
    "15 radial shifts": (
        lambda m: m.joinpath(PARAMS).write_text(
            _params_with(m.joinpath(PARAMS).read_text(), ShfR="[" + ",".join(["1.0"] * 15) + "]")
        ),
        "the first layer takes 384 inputs, the .params file's AEV has 380",
    ),
    "no angle shifts": (
        lambda m: m.joinpath(PARAMS).write_text(_params_with(m.joinpath(PARAMS).read_text(), ShfZ="[]")),
        "ShfZ must list 1 to 64",
    ),
    "negative cutoff": (
        lambda m: m.joinpath(PARAMS).write_text(_params_with(m.joinpath(PARAMS).read_text(), Rcr="-5.2")),
        "Rcr must be a cutoff",
    ),
    "zero cutoff": (
        lambda m: m.joinpath(PARAMS).write_text(_params_with(m.joinpath(PARAMS).read_text(), Rca="0")),
        "Rca must be a cutoff",
    ),
    "nan cutoff": (
        lambda m: m.joinpath(PARAMS).write_text(_params_with(m.joinpath(PARAMS).read_text(), Rcr="nan")),
        "Rcr must be a cutoff",
    ),
    "huge cutoff": (
        lambda m: m.joinpath(PARAMS).write_text(_params_with(m.joinpath(PARAMS).read_text(), Rcr="1e308")),
        "Rcr must be a cutoff",
    ),
    "three EtaR values (found by the fuzz campaign)": (
        lambda m: m.joinpath(PARAMS).write_text(_params_with(m.joinpath(PARAMS).read_text(), EtaR="[1.0,1.0,1.0]")),
        "EtaR must hold one value",
    ),
    "400 x 400 angular shifts": (
        lambda m: m.joinpath(PARAMS).write_text(
            _params_with(
                m.joinpath(PARAMS).read_text(),
                ShfA="[" + ",".join(["1.0"] * 400) + "]",
                ShfZ="[" + ",".join(["0.5"] * 400) + "]",
            )
        ),
        "ShfA must list 1 to 64",
    ),
    "bzip2 bomb": (
        lambda m: m.joinpath("networks", "ANN-C.nnf").write_bytes(_bzip2_nnf(b"x" * (1 << 30))),
        "unpacks to more than",
    ),
    "40,000 'layer [' (quadratic regex)": (
        lambda m: m.joinpath("networks", "ANN-C.nnf").write_bytes(_bzip2_nnf(b"layer [" * 40_000)),
        "no layers found",
    ),
    "40,000 unclosed layers": (
        lambda m: m.joinpath("networks", "ANN-C.nnf").write_bytes(_bzip2_nnf(b"layer [\n" * 40_000)),
        "not closed by ']'",
    ),
    "network file is /dev/zero": (lambda m: _link(m / "networks" / "ANN-C.nnf", "/dev/zero"), "not a regular file"),
    "weight file is /dev/zero": (
        lambda m: _link(m / "networks" / "ANN-C.nnf-l1.wparam", "/dev/zero"),
        "not a regular file",
    ),
    "params is /dev/zero": (lambda m: _link(m / PARAMS, "/dev/zero"), "not a regular file"),
    "sae is /dev/urandom": (lambda m: _link(m / "sae_linfit.dat", "/dev/urandom"), "not a regular file"),
    "params is a FIFO": (lambda m: _fifo(m / PARAMS), "not a regular file"),
    "weight file is a FIFO": (lambda m: _fifo(m / "networks" / "ANN-H.nnf-l2.wparam"), "not a regular file"),
    "huge weight file": (
        lambda m: os.truncate(m / "networks" / "ANN-N.nnf-l1.bparam", 1 << 30),
        "more than the 268435456",
    ),
    "no self energy for O": (
        lambda m: m.joinpath("sae_linfit.dat").write_text(
            "\n".join(
                line for line in m.joinpath("sae_linfit.dat").read_text().splitlines() if not line.startswith("O")
            )
        ),
        "no self energy for O",
    ),
}


@pytest.mark.parametrize("damage", sorted(NEUROCHEM_DAMAGE))
def test_crafted_neurochem_files_are_refused_quickly_in_bounded_memory(damage, tmp_path):
    """Each crafted file is one NeuroChemError naming it: never a hang (a FIFO), an
    unbounded read (/dev/zero, a bzip2 bomb, a 1 GB weight file), a quadratic parse or
    networks that do not fit the AEV (which the compiled kernel would read past)."""
    import resource
    import signal

    zoo = ZOO / "ani-1x_8x"
    member = tmp_path / "model"
    shutil.copytree(zoo / "train0", member)
    for item in member.rglob("*"):
        item.chmod(0o644 if item.is_file() else 0o755)
    action, message = NEUROCHEM_DAMAGE[damage]
    action(member)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def late(*_):
        raise TimeoutError(f"{damage}: loading did not end within 30 s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(30)
    try:
        with pytest.raises(NeuroChemError, match=re.escape(message)) as error:
            load_neurochem(member)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "\n" not in str(error.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 200  # MB


def test_a_neurochem_model_loaded_directly_evaluates():
    """load_neurochem's model (not through load_model) evaluates: found by the file fuzz
    campaign, where its float64 AEV constants met float32 networks in a traceback."""
    model = load_neurochem(ZOO / "ani-1x_8x" / "train0")
    result = model.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    reference = aniserve.load_model(ZOO / "ani-1x_8x" / "train0", dtype="float32")
    assert abs(float(result.energy) - float(reference.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS).energy)) < 1e-5


def test_an_info_file_declaring_a_billion_members_is_refused(tmp_path):
    info = tmp_path / "big.info"
    info.write_text(f"x/{PARAMS}\nx/sae_linfit.dat\nx/train\n1000000000\n")
    with pytest.raises(NeuroChemError, match=r"member count '1000000000' is not an integer in 1\.\.1024"):
        load_neurochem(info)
