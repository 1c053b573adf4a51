"""Hostile and damaged input: the Python API, the ASE calculator, model files, training
data and checkpoints either work or fail with one clear error (a ValueError naming the
problem); nothing returns NaN, crashes with another exception or allocates without bound.
The driver's fuzz campaign is in test_fuzz.py."""

import json
import math
import resource
import struct
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, cached_model, perturbed_molecules

from aniserve import ANICalculator, kernels, protocol
from aniserve.embedded import DEFAULT_MODEL
from aniserve.modelfile import ModelFileError, load_saved
from aniserve.networks import EnsembleMLP
from aniserve.training import ANIData, DataError, Settings, default_description, new_model, train
from aniserve.training.data import write_ani_h5


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ Python API
def api_cases(rng):
    """(numbers, positions, cell) inputs, most of them wrong."""
    ethanol = np.array(ETHANOL_POSITIONS)
    good_numbers = list(ETHANOL_NUMBERS)
    numbers = [
        [],
        [6.7] + good_numbers[1:],
        [-1] + good_numbers[1:],
        [0] + good_numbers[1:],
        [119] + good_numbers[1:],
        ["C"] * 9,
        [None] * 9,
        [[6, 6]] * 9,
        [6 + 1j] * 9,
        good_numbers[:5],
        [True] * 9,
        [2**40] * 9,
        good_numbers,
    ]
    positions = [
        ethanol,
        ethanol[:5],
        np.full((9, 3), np.nan),
        ethanol + np.r_[[[np.inf, 0, 0]], np.zeros((8, 3))],
        np.zeros((9, 3)),
        np.full((9, 3), 1e308),
        np.round(ethanol),
        ethanol[:, :2],
        [["x"] * 3] * 9,
        ethanol + 1e8,
        ethanol * 1e-3,
    ]
    cells = [
        None,
        np.eye(3) * 20,
        np.zeros((3, 3)),
        np.full((3, 3), np.nan),
        np.diag([20.0, 20.0, 0.0]),
        np.diag([12.0, 12.0, 0.001]),
        np.eye(3) * 0.5,
        [[1, 2], [3, 4]],
        np.eye(3) * 1e12,
        np.array([[20.0, 0, 0], [20.0, 1e-9, 0], [0, 0, 20.0]]),
        np.diag([np.inf, 20.0, 20.0]),
    ]
    cases = [(n, positions[0], None) for n in numbers] + [(good_numbers, p, None) for p in positions]
    cases += [(good_numbers, positions[0], c) for c in cells]
    cases += [
        (numbers[rng.integers(len(numbers))], positions[rng.integers(len(positions))], cells[rng.integers(len(cells))])
        for _ in range(40)
    ]
    return cases


def test_api_never_returns_nan_or_raises_anything_but_a_clear_value_error():
    model = cached_model(DEFAULT_MODEL, "float32")
    before = peak_rss_mb()
    outcomes = {"ok": 0, "refused": 0}
    for numbers, positions, cell in api_cases(np.random.default_rng(0)):
        try:
            result = model.evaluate(numbers, positions, cell)
        except ValueError as error:
            assert str(error) and "\n" not in str(error)
            outcomes["refused"] += 1
            continue
        assert np.isfinite(result.energy).all() and np.isfinite(result.forces).all(), (numbers, positions, cell)
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 3 and outcomes["refused"] >= 40, outcomes
    assert peak_rss_mb() - before < 100


@pytest.mark.parametrize(
    "atoms,message",
    [
        (Atoms("H2", positions=[[0, 0, 0], [0, 0, 0]]), r"non-finite .*atoms 0 and 1 are 0 Å apart"),
        (
            Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0.93, 0, -0.24]], cell=np.zeros((3, 3)), pbc=True),
            "cell is singular",
        ),
        (
            Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0.93, 0, -0.24]], cell=[10, 10, 0], pbc=True),
            "cell is singular",
        ),
        (
            Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0.93, 0, -0.24]], cell=[0.5, 0.5, 0.5], pbc=True),
            "cell too thin",
        ),
        (Atoms("HAu", positions=[[0, 0, 0], [0, 0, 2.0]]), "does not support element"),
        (Atoms(), "no atoms"),
    ],
)
def test_calculator_raises_a_clear_error(atoms, message):
    atoms.calc = ANICalculator(cached_model(DEFAULT_MODEL, "float64"))
    with pytest.raises(ValueError, match=message):
        atoms.get_forces()


# ------------------------------------------------------------------ kernels
@pytest.mark.parametrize("where", ["weight", "feature"])
def test_compiled_kernels_propagate_nan_like_the_tensor_path(where):
    torch.manual_seed(0)
    mlp = EnsembleMLP([16, 8, 8, 1], ensemble_size=2).double().requires_grad_(False).eval()
    features = torch.randn(7, 16, dtype=torch.float64)
    if where == "weight":
        mlp.weights[1].data[0, 3, 2] = math.nan
    else:
        features[4, 5] = math.nan
    results = []
    for backend in ("compiled", "tensor"):
        with kernels.using(backend):
            results.append(mlp(features.clone(), None))
    assert kernels.library() is not None
    assert torch.isnan(results[0]).any()
    torch.testing.assert_close(results[0], results[1], equal_nan=True)
    assert torch.equal(torch.isnan(results[0]), torch.isnan(results[1]))


def test_kernel_backend_is_one_switch():
    with kernels.using("tensor"):
        assert kernels.library_for(torch.zeros(2)) is None
    assert kernels.library_for(torch.zeros(2)) is not None
    with pytest.raises(ValueError, match="unknown kernel backend 'gpu'"):
        kernels.use("gpu")
    with pytest.raises(NotImplementedError, match="no CUDA kernel backend yet"):
        kernels.use("cuda")


# ------------------------------------------------------------------ model files
def _rewrite_description(raw: bytes, mutate) -> bytes:
    """The safetensors file with its aniserve description passed through ``mutate``
    (which changes the dict in place, or returns the description's new JSON text)."""
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    description = json.loads(header["__metadata__"]["aniserve"])
    text = mutate(description)
    header["__metadata__"]["aniserve"] = text if isinstance(text, str) else json.dumps(description)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


DESCRIPTION_DAMAGE = {
    "huge layers": lambda d: d["element_network"]["params"]["base"]["params"].update(hidden=[10**9, 10**9]),
    "negative layer": lambda d: d["element_network"]["params"]["base"]["params"].update(hidden=[-5, 8]),
    "huge ensemble": lambda d: d.update(ensemble_size=10**9),
    "unknown element": lambda d: d.update(elements=["H", "C", "N", "Xx"]),
    "nan self energy": lambda d: d["self_energies"].update(H=math.nan),
    "missing self energy": lambda d: d["self_energies"].pop("H"),
    "no featurizer": lambda d: d.pop("featurizer"),
    "featurizer not an object": lambda d: d.update(featurizer=[1, 2]),
    "name not text": lambda d: d.update(name=5),
    "bad AEV parameters": lambda d: d["featurizer"].update(params={"Rcr": "far"}),
    "network params wrong type": lambda d: d["element_network"].update(params={"base": 3}),
    "elements not a list": lambda d: d.update(elements="HCNO"),
    # Featurizer parameters whose AEV width or geometry the stored networks do not match.
    "15 radial shifts": lambda d: d["featurizer"]["params"].update(ShfR=d["featurizer"]["params"]["ShfR"][:15]),
    "no angle shifts": lambda d: d["featurizer"]["params"].update(ShfZ=[]),
    "no radial shifts": lambda d: d["featurizer"]["params"].update(ShfR=[]),
    "negative cutoff": lambda d: d["featurizer"]["params"].update(Rcr=-5.2),
    "zero cutoff": lambda d: d["featurizer"]["params"].update(Rca=0.0),
    "nan cutoff": lambda d: d["featurizer"]["params"].update(Rcr=math.nan),
    "huge cutoff": lambda d: d["featurizer"]["params"].update(Rcr=1e308),
    "nan shift": lambda d: d["featurizer"]["params"].update(ShfA=[math.nan] * 8),
    "400 x 400 angular shifts": lambda d: d["featurizer"]["params"].update(ShfA=[1.0] * 400, ShfZ=[0.5] * 400),
    "zero eta": lambda d: d["featurizer"]["params"].update(EtaR=[0.0]),
    "boolean cutoff": lambda d: d["featurizer"]["params"].update(Rcr=True),
    "unknown AEV field": lambda d: d["featurizer"]["params"].update(Extra=1),
    # Nesting that would make a parser or ``build`` recurse without bound.
    "nested 200,000 deep": lambda d: json.dumps(d)[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
    "delta chain 600 deep": lambda d: _delta_chain(d, 600),
    # Found by the file fuzz campaign (tests/fuzz_files.py): a ZeroDivisionError and a RegistryError escaped.
    "zero input width": lambda d: d["element_network"]["params"]["base"]["params"].update(input_width=0),
    "nested network name not text": lambda d: d["element_network"]["params"]["correction"].update(name=-(10**12)),
    # The spread's calibration multiplies every energy_std and sets the collector's threshold.
    "uncertainty not an object": lambda d: d.update(uncertainty=[2.0]),
    "negative spread scale": lambda d: d.update(uncertainty={"energy_std_scale": -1.0}),
    "nan collection threshold": lambda d: d.update(uncertainty={"collect_threshold_kcal": math.nan}),
    "zero relative threshold": lambda d: d.update(uncertainty={"collect_threshold_relative_kcal": 0.0}),
    "text spread scale": lambda d: d.update(uncertainty={"energy_std_scale": "2"}),
}


def _delta_chain(description: dict, links: int) -> str:
    """The description with its element network wrapped in ``links`` delta networks."""
    inner = json.dumps(description["element_network"])
    wrapped = (
        '{"name": "delta", "params": {"base": ' * links
        + inner
        + ', "correction": {"name": "ani-mlp", "params": {}}}}' * links
    )
    text = json.dumps({**description, "element_network": None})
    return text.replace('"element_network": null', '"element_network": ' + wrapped)


@pytest.mark.parametrize("damage", sorted(DESCRIPTION_DAMAGE))
def test_hostile_descriptions_are_refused_naming_the_field(damage, tmp_path):
    source = cached_model(DEFAULT_MODEL, "float32").description["source"]
    path = tmp_path / "m.safetensors"
    path.write_bytes(_rewrite_description(open(source, "rb").read(), DESCRIPTION_DAMAGE[damage]))
    before = peak_rss_mb()
    with pytest.raises(ModelFileError) as error:
        load_saved(path)
    assert "\n" not in str(error.value)
    assert peak_rss_mb() - before < 100


@pytest.mark.slow
def test_damaged_model_files_load_or_fail_cleanly(tmp_path):
    """300 seeded damages (truncation, flipped bytes in the header and in the weights):
    each either loads a model that evaluates to finite numbers or is refused with
    ModelFileError; nothing else escapes."""
    source = cached_model(DEFAULT_MODEL, "float32").description["source"]
    raw = open(source, "rb").read()
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    rng = np.random.default_rng(1)
    counts = {"loaded": 0, "refused": 0}
    before = peak_rss_mb()
    for case in range(300):
        data = bytearray(raw)
        kind = case % 3
        if kind == 0:
            data = data[: int(rng.integers(0, len(raw)))]
        else:
            span = (0, header) if kind == 1 else (header, len(raw))
            for at in rng.integers(*span, size=int(rng.integers(1, 8))):
                data[at] = int(rng.integers(256))
        path = tmp_path / f"d{case}.safetensors"
        path.write_bytes(bytes(data))
        try:
            model = load_saved(path)
        except ModelFileError as error:
            assert "\n" not in str(error)
            counts["refused"] += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = model.evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
                assert np.isfinite(result.energy)
            except ValueError as error:  # weights flipped into huge values can overflow: refused, not returned
                assert "non-finite" in str(error)
        counts["loaded"] += 1
    assert counts["refused"] >= 150 and counts["loaded"] >= 10, counts
    assert peak_rss_mb() - before < 100


# ------------------------------------------------------------------ protocol
@pytest.mark.parametrize("name", [b"..", b"../../etc/passwd", b"a/b", b"\xff\xfe", b".", b"x y"])
def test_shared_memory_names_must_be_plain(name):
    payload = (
        protocol.header("POSDATA")
        + struct.pack("<i", 3)
        + b"".join(struct.pack("<i", len(n)) + n for n in [b"ok_name"] * 5 + [name])
    )
    with pytest.raises(protocol.ProtocolError, match="shared-memory segment name"):
        protocol.decode(payload, protocol.Mode(shm=True))


def test_init_string_must_be_text():
    with pytest.raises(protocol.ProtocolError, match="INIT string is not UTF-8"):
        protocol.decode(protocol.header("INIT") + struct.pack("<ii", 0, 2) + b"\xff\xfe", protocol.Mode())


# ------------------------------------------------------------------ training
def data_file(tmp_path, damage=None):
    rng = np.random.default_rng(0)
    groups = {}
    for formula, _, numbers, pos in perturbed_molecules(["CH4", "H2O", "NH3", "CH3OH"], 6, rng, 0.05):
        energy = (
            -38.0 * (numbers == 6).sum()
            - 0.5 * (numbers == 1).sum()
            - 75.0 * (numbers == 8).sum()
            - 54.5 * (numbers == 7).sum()
            + rng.normal(0, 1e-3, 6)
        )
        groups[formula] = {"atomic_numbers": numbers, "coordinates": pos, "e": energy}
    if damage:
        damage(groups["CH4"])
    path = tmp_path / "d.h5"
    write_ani_h5(path, groups)
    return path


def _coincident(group):
    group["coordinates"][3, 1] = group["coordinates"][3, 0]


def _infinite_coordinate(group):
    group["coordinates"][2, 0, 1] = np.inf


def _infinite_energy(group):
    group["e"][1] = -np.inf


@pytest.mark.parametrize(
    "damage,message",
    [
        (_coincident, r"CH4 conformation 3: atoms 0 and 1 are 0 Å apart"),
        (_infinite_coordinate, r"CH4/coordinates of conformation 2 hold NaN or infinite"),
        (_infinite_energy, r"CH4/e is infinite for conformation 1"),
    ],
)
def test_training_data_is_checked_when_read(damage, message, tmp_path):
    with pytest.raises(DataError, match=message):
        ANIData(data_file(tmp_path, damage), "e")


def small_model():
    return new_model(default_description(hidden=(8, 8), ensemble_size=2), 0)


def test_a_nan_loss_stops_training_and_writes_nothing(tmp_path):
    model = small_model()
    with torch.no_grad():
        next(model.networks.parameters()).view(-1)[0] = math.nan
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="training loss is nan at epoch 1"):
        train(
            model,
            ANIData(data_file(tmp_path), "e"),
            out,
            Settings(epochs=2, batch_size=8, validation=0.25, refit_self_energies=False),
        )
    assert not out.exists()
    with pytest.raises(ValueError, match="self-energy fit is not finite"):
        train(model, ANIData(data_file(tmp_path), "e"), out, Settings(epochs=2, batch_size=8, validation=0.25))
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a checkpoint", None])
def test_a_damaged_checkpoint_is_refused_clearly(content, tmp_path):
    data = ANIData(data_file(tmp_path), "e")
    out = tmp_path / "m.safetensors"
    settings = Settings(epochs=1, batch_size=8, validation=0.25)
    checkpoint = tmp_path / "m.safetensors.ckpt"
    if content is None:  # a real checkpoint, truncated
        train(small_model(), data, out, settings)
        content = checkpoint.read_bytes()[:2000]
        out.unlink()
    checkpoint.write_bytes(content)
    with pytest.raises(ValueError, match="not a usable aniserve checkpoint"):
        train(small_model(), data, out, Settings(epochs=2, batch_size=8, validation=0.25), resume=True)
    assert not out.exists()


def test_training_reports_totals_and_time_left(tmp_path, capfd):
    train(
        small_model(),
        ANIData(data_file(tmp_path), "e"),
        tmp_path / "m.safetensors",
        Settings(epochs=2, batch_size=8, validation=0.25),
    )
    err = capfd.readouterr().err
    assert "epoch 1/2:" in err and "epoch 2/2:" in err and "left" in err
