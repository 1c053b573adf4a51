"""Seeded fuzzing of the file readers: crafted aniserve model descriptions, NeuroChem
model folders and ANI HDF5 data files, each loaded (and, for a model that loads, used
on ethanol) in a forked child, whose ending is recorded: loaded and finite, refused with
the reader's own one-line error, a traceback, a signal, a hang, and its peak memory.

Run as a script for a longer campaign:
    python tests/fuzz_files.py --tries 5000 --seed 7 --json fuzz-files.json
``tests/test_fuzz.py`` runs 300 tries (``--fuzz-files N`` for more).  The NeuroChem
family needs the official weights (``$ANISERVE_MODEL_DIR``, or the shared folder's
ani-model-zoo); without them it is left out and the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = pathlib.Path(
    os.environ.get("ANISERVE_MODEL_DIR")
    or pathlib.Path(os.environ.get("ANISERVE_SHARED", ROOT.parent / "shared")) / "ani-model-zoo"
)
FAMILIES = ("model-description", "neurochem", "hdf5")
#: Child exit codes: what happened to one try.
LOADED, REFUSED, CRASHED = 0, 10, 70
TIMEOUT_S = 30
ETHANOL_NUMBERS = [6, 6, 8, 1, 1, 1, 1, 1, 1]
ETHANOL = [
    [-0.9233, 0.0609, 0.0534],
    [0.5089, -0.4270, -0.0510],
    [1.3841, 0.6509, 0.1935],
    [-1.6032, -0.7930, -0.0236],
    [-1.1404, 0.6054, 0.9761],
    [-1.1287, 0.7369, -0.7813],
    [0.7264, -0.8873, -1.0212],
    [0.6614, -1.1906, 0.7186],
    [2.2747, 0.3176, 0.0937],
]


# ------------------------------------------------------------------ model descriptions
def hostile_value(rng: random.Random):
    return rng.choice(
        [
            -1,
            0,
            1,
            2,
            -5.2,
            1e308,
            math.nan,
            math.inf,
            -math.inf,
            "",
            "x",
            "ani-mlp",
            "delta",
            [],
            {},
            None,
            True,
            False,
            [1.0] * 15,
            [0.5] * 400,
            [[1]],
            10**12,
            -(10**12),
            [math.nan],
            {"name": "delta", "params": {}},
            ["H", "H"],
            ["Xx"],
            "NaN",
        ]
    )


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


def mutate_description(description: dict, rng: random.Random) -> str:
    """1–3 hostile changes (replace a value, delete a key, nest deeply) as JSON text."""
    description = json.loads(json.dumps(description))
    for _ in range(rng.randrange(1, 4)):
        paths = [p for p in _paths(description) if p]
        path = rng.choice(paths)
        parent = description
        for key in path[:-1]:
            parent = parent[key]
        what = rng.random()
        if what < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = hostile_value(rng)
    text = json.dumps(description)
    if rng.random() < 0.05:
        depth = rng.choice([100, 5000, 200_000])
        text = text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    return text


def write_with_description(source: pathlib.Path, text: str, out: pathlib.Path) -> None:
    raw = source.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"]["aniserve"] = text
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    out.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


# ------------------------------------------------------------------ NeuroChem folders
PARAMS = "rHCNO-5.2R_16-3.5A_a4-8.params"


def damage_neurochem(folder: pathlib.Path, rng: random.Random) -> None:
    networks = folder / "networks"
    files = sorted(networks.iterdir())
    for _ in range(rng.randrange(1, 3)):
        what = rng.choice(["params", "params", "nnf", "nnf", "weights", "sae", "special"])
        files = [f for f in files if f.is_file()]  # an earlier damage may have made one a FIFO or a link
        if not files or not all((folder / name).is_file() for name in (PARAMS, "sae_linfit.dat")):
            what = "special" if files else "none"
        if what == "none":
            break
        if what == "params":
            lines = (folder / PARAMS).read_text().splitlines()
            index = rng.randrange(len(lines))
            key = lines[index].split("=")[0].strip()
            lines[index] = f"{key} = " + rng.choice(
                [
                    "-5.2",
                    "0",
                    "nan",
                    "1e308",
                    "[]",
                    "[1.0]",
                    "x",
                    "[" + ",".join(["1.0"] * rng.choice([15, 17, 400])) + "]",
                    "[nan,1.0]",
                    "[-1,2]",
                    "[H,C,N,Xx]",
                ]
            )
            (folder / PARAMS).write_text("\n".join(lines) + "\n")
        elif what == "nnf":
            nnfs = [f for f in files if f.suffix == ".nnf"]
            if not nnfs:
                continue
            nnf = rng.choice(nnfs)
            raw = bytearray(nnf.read_bytes())
            how = rng.choice(["truncate", "flip", "text", "bomb", "header"])
            if how == "truncate":
                raw = raw[: rng.randrange(len(raw))]
            elif how == "flip":
                for at in rng.sample(range(len(raw)), min(8, len(raw))):
                    raw[at] = rng.randrange(256)
            elif how == "header":
                raw = b"junk" + raw
            else:
                import bz2

                start = raw.find(b"=\n") + 2
                try:
                    text = bz2.decompress(bytes(raw[start:])).decode()
                except (OSError, ValueError, EOFError):  # damaged by an earlier step of this try
                    text = ""
                if how == "bomb":
                    body = b"layer [\n" * rng.choice([10, 40_000]) if rng.random() < 0.5 else b"x" * (1 << 28)
                else:
                    fields = ["nodes", "blocksize", "activation", "weights", "biases"]
                    field = rng.choice(fields)
                    value = rng.choice(
                        [
                            "0",
                            "-1",
                            "1",
                            "1000000000",
                            "x",
                            "FILE:../../etc/passwd[1]",
                            "FILE:ANN-H.nnf-l1.wparam[5]",
                            "9",
                            "6",
                        ]
                    )
                    lines = text.splitlines()
                    candidates = [i for i, line in enumerate(lines) if line.startswith(field + "=")]
                    if candidates:
                        lines[rng.choice(candidates)] = f"{field}={value};"
                    body = "\n".join(lines).encode()
                packed = bz2.compress(body, 9)
                raw = bytearray(f"{len(packed)}=\n".encode() + packed)
            nnf.write_bytes(bytes(raw))
        elif what == "weights":
            candidates = [f for f in files if f.suffix in (".wparam", ".bparam")]
            if not candidates:
                continue
            weights = rng.choice(candidates)
            how = rng.choice(["truncate", "extend", "nan"])
            raw = weights.read_bytes()
            if how == "truncate":
                weights.write_bytes(raw[: rng.randrange(len(raw))])
            elif how == "extend":
                weights.write_bytes(raw + bytes(rng.choice([1, 4, 4096])))
            else:
                weights.write_bytes(struct.pack("<f", math.nan) * (len(raw) // 4))
        elif what == "sae":
            (folder / "sae_linfit.dat").write_text(rng.choice(["", "H,0=x\n", "H,0=nan\nC,1=-38\n", "garbage"]))
        else:
            target = rng.choice([folder / PARAMS, folder / "sae_linfit.dat", rng.choice(files)])
            if not target.is_file():
                continue
            target.unlink()
            how = rng.choice(["fifo", "zero", "urandom", "dir", "missing"])
            if how == "fifo":
                os.mkfifo(target)
            elif how in ("zero", "urandom"):
                target.symlink_to(f"/dev/{how}")
            elif how == "dir":
                target.mkdir()


# ------------------------------------------------------------------ HDF5 files
def hostile_h5(path: pathlib.Path, rng: random.Random) -> None:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        f.attrs["levels"] = rng.choice(['{"e": {}}', "{}", "[1]", "not json"]) if rng.random() < 0.3 else '{"e": {}}'
        for g in range(rng.randrange(1, 4)):
            group = f.create_group(f"G{g}")
            count = rng.choice([0, 1, 3, 3, 3, 2**33, 10**6])
            atoms = rng.choice([0, 1, 5, 5, 5, 200_000])
            last = rng.choice([3, 3, 3, 2])
            if count * atoms * last <= 10_000:
                x = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 2.0, (count, atoms, last))
                group["coordinates"] = x
            else:
                group.create_dataset(
                    "coordinates", shape=(count, atoms, last), chunks=True, dtype="f8", compression="gzip"
                )
            numbers = rng.choice(
                [
                    [6] * atoms,
                    [1.5] * atoms,
                    [-1] * atoms,
                    [True] * atoms,
                    [200] * atoms,
                    [6] * (atoms + 1),
                    ["C"] * atoms,
                ]
            )
            if rng.random() < 0.9:
                try:
                    group["atomic_numbers"] = np.array(
                        numbers, dtype="S1" if numbers and isinstance(numbers[0], str) else None
                    )
                except (TypeError, ValueError):
                    pass
            e_count = rng.choice([count, count, count + 1, 0])
            if e_count <= 10_000:
                group["e"] = np.full(e_count, rng.choice([-40.0, math.nan, math.inf]))
            else:
                group.create_dataset("e", shape=(e_count,), chunks=True, dtype="f8")
        extra = rng.choice(["none", "none", "cycle", "external", "dangling", "virtual"])
        if extra == "cycle":
            f["G0"]["again"] = f["G0"] if "coordinates" not in f["G0"] else f
        elif extra == "external":
            f["ext"] = h5py.ExternalLink("/etc/hostname", "/x")
        elif extra == "dangling":
            f["soft"] = h5py.SoftLink("/nowhere")
        elif extra == "virtual":
            layout = h5py.VirtualLayout(shape=(3,), dtype="f8")
            layout[:] = h5py.VirtualSource("/tmp/aniserve-not-here.h5", "e", shape=(3,))
            f.create_virtual_dataset("G0/virtual", layout, fillvalue=0.0)


# ------------------------------------------------------------------ harness
class Harness:
    def __init__(self, folder: str):
        import ase.io  # noqa: F401  (imported once here, not in every child)
        import h5py  # noqa: F401
        import torch

        import aniserve.models
        from aniserve import kernels
        from aniserve.embedded import DEFAULT_MODEL

        torch.set_num_threads(1)
        kernels.library()
        self.folder = pathlib.Path(folder)
        self.embedded = pathlib.Path(aniserve.models.resolve(DEFAULT_MODEL))
        from aniserve.modelfile import read_description

        self.description = read_description(self.embedded)

    def prepare(self, family: str, rng: random.Random, case: int) -> pathlib.Path:
        if family == "model-description":
            path = self.folder / f"m{case}.safetensors"
            write_with_description(self.embedded, mutate_description(self.description, rng), path)
        elif family == "neurochem":
            path = self.folder / f"nc{case}"
            shutil.copytree(ZOO / "ani-1x_8x" / "train0", path)
            path.chmod(0o755)
            for item in path.rglob("*"):
                item.chmod(0o644 if item.is_file() else 0o755)
            damage_neurochem(path, rng)
        else:
            path = self.folder / f"d{case}.h5"
            hostile_h5(path, rng)
        return path

    def run(self, family: str, path: pathlib.Path, case: int) -> dict:
        read_end, write_end = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.dup2(write_end, 2)
            code = CRASHED
            try:
                code = _try(family, path)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        deadline = start + TIMEOUT_S
        status = usage = None
        while time.monotonic() < deadline:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        hung = usage is None
        if hung:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
        text = b""
        while chunk := os.read(read_end, 65536):
            text += chunk
        os.close(read_end)
        text = text.decode(errors="replace")
        code = os.waitstatus_to_exitcode(status)
        return {
            "case": case,
            "family": family,
            "exit": code,
            "hung": hung,
            "signal": code < 0 and not hung,
            "traceback": "Traceback" in text or code == CRASHED,
            "loaded": code == LOADED,
            "refused": code == REFUSED,
            "seconds": round(time.monotonic() - start, 3),
            "maxrss_mb": usage.ru_maxrss / 1024,
            "stderr": text[-400:],
        }


def _try(family: str, path: pathlib.Path) -> int:
    """In the child: load, and use what loaded; the exit code says how it ended."""
    from aniserve.hdf5 import HDF5Error
    from aniserve.modelfile import ModelFileError, load_saved
    from aniserve.neurochem import NeuroChemError, load_neurochem
    from aniserve.qmdata.records import read_h5
    from aniserve.training import ANIData, DataError

    clean = (ModelFileError, NeuroChemError, DataError, HDF5Error)
    try:
        if family == "hdf5":
            ANIData(path, "e")
            read_h5(path)
            return LOADED
        model = load_saved(path) if family == "model-description" else load_neurochem(path)
    except clean as error:
        message = str(error)
        assert message and "\n" not in message, message
        return REFUSED
    try:
        result = model.evaluate(ETHANOL_NUMBERS, ETHANOL)
    except ValueError as error:  # a loaded model whose weights overflow is refused at evaluation
        assert "\n" not in str(error)
        return REFUSED
    import numpy as np

    assert np.isfinite(result.energy) and np.isfinite(result.forces).all()
    return LOADED


def _summary(outcomes: list[dict]) -> dict:
    return {
        "tries": len(outcomes),
        "loaded": sum(o["loaded"] for o in outcomes),
        "refused": sum(o["refused"] for o in outcomes),
        "tracebacks": sum(o["traceback"] for o in outcomes),
        "signals": sum(o["signal"] for o in outcomes),
        "hung": sum(o["hung"] for o in outcomes),
        "max_rss_mb": round(max((o["maxrss_mb"] for o in outcomes), default=0.0), 1),
        "max_seconds": max((o["seconds"] for o in outcomes), default=0.0),
    }


def campaign(tries: int, seed: int) -> dict:
    families = [f for f in FAMILIES if f != "neurochem" or (ZOO / "ani-1x_8x").is_dir()]
    with tempfile.TemporaryDirectory(prefix="aniserve-fuzz-files-") as folder:
        harness = Harness(folder)
        baseline = harness.run("model-description", harness.embedded, -1)
        outcomes = []
        for case in range(tries):
            rng = random.Random(seed * 1_000_003 + case)
            family = families[case % len(families)]
            path = harness.prepare(family, rng, case)
            outcomes.append(harness.run(family, path, case))
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return {
        "seed": seed,
        "tries": tries,
        "families_left_out": sorted(set(FAMILIES) - set(families)),
        "baseline": {k: baseline[k] for k in ("exit", "seconds", "maxrss_mb")},
        "families": {f: _summary([o for o in outcomes if o["family"] == f]) for f in families},
        "outcomes": outcomes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every outcome here")
    args = parser.parse_args()
    report = campaign(args.tries, args.seed)
    print(json.dumps({k: v for k, v in report.items() if k != "outcomes"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
