"""Bad input gets an error that names the problem."""

import shutil

import numpy as np
import pytest

import aniserve
from aniserve.modelfile import ModelFileError, load_saved, save_model
from aniserve.neurochem import NeuroChemError, load_neurochem
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, SHARED

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
    shutil.copytree(SHARED / "ani-model-zoo" / "ani-1x_8x" / "train0", member)
    member.joinpath("sae_linfit.dat").write_text((SHARED / "ani-model-zoo" / "ani-1x_8x" / "sae_linfit.dat").read_text())
    nnf = member / "networks" / "ANN-C.nnf"
    nnf.chmod(0o644)
    nnf.write_bytes(b"1135=\n" + b"not bzip2 at all")
    with pytest.raises(NeuroChemError, match=r"ANN-C.nnf: corrupt bzip2"):
        load_neurochem(member)
    wparam = member / "networks" / "ANN-C.nnf-l2.wparam"
    nnf.write_bytes((SHARED / "ani-model-zoo" / "ani-1x_8x" / "train0" / "networks" / "ANN-C.nnf").read_bytes())
    wparam.chmod(0o644)
    wparam.write_bytes(wparam.read_bytes()[:100])
    with pytest.raises(NeuroChemError, match=r"l2.wparam: holds 25 float32 values"):
        load_neurochem(member)


def test_corrupt_and_foreign_model_files(tmp_path, ani1ccx):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_saved(garbage)
    from safetensors.torch import save_file
    import torch

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
    zoo = SHARED / "ani-model-zoo"
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
        (tmp_path / "ani-1x_8x.info").write_text((SHARED / "ani-model-zoo" / "ani-1x_8x.info").read_text())
    with pytest.raises(NeuroChemError, match=rf"{missing}/networks: ensemble member folder is missing \(7 of 8"):
        load_neurochem(folder)
    with pytest.warns(UserWarning, match=rf"serving 7 of 8 ensemble members \({missing} missing\)"):
        model = load_neurochem(folder, allow_incomplete=True)
    assert model.ensemble_size == 7
