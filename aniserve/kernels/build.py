"""Building the compiled kernels: the C++ sources of this folder, compiled once per
source, compiler and CPU into ``$ANISERVE_CACHE/kernels`` with ``$CXX`` (default
``c++``), and the ctypes signatures of what they export."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import tempfile

from aniserve.cache import cache_root

log = logging.getLogger(__name__)

_SOURCES = sorted(pathlib.Path(__file__).parent.glob("*.cpp"))
_HEADERS = sorted(pathlib.Path(__file__).parent.glob("*.h"))
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd"]
# Tried in turn until the compiler takes them: threads (OpenMP) and vector exp/pow from
# glibc's libmvec (see vector_math.h), where those exist; threads alone; neither.
_LIBMVEC = ["-DANISERVE_LIBMVEC", "-lmvec"] if platform.system() == "Linux" and platform.machine() == "x86_64" else []
_OPTIONAL = [["-fopenmp", *_LIBMVEC], ["-fopenmp"], []]


class Constants(ctypes.Structure):
    # The layout of ``Constants`` in aev.cpp.
    _fields_ = (
        [(name, ctypes.c_int64) for name in ("num_species", "num_shf_r", "num_shf_a", "num_shf_z", "num_pairs")]
        + [(name, ctypes.c_double) for name in ("Rcr", "Rca", "EtaR", "EtaA", "Zeta")]
        + [(name, ctypes.POINTER(ctypes.c_double)) for name in ("ShfR", "ShfA", "cos_z", "sin_z")]
        + [("pair_index", ctypes.POINTER(ctypes.c_int64))]
    )


def cache_dir() -> pathlib.Path:
    return cache_root() / "kernels"


def _cpu_signature() -> str:
    # -march=native binds the library to the CPU it was built on.
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build() -> ctypes.CDLL:
    """Compile (or find already compiled) and load the kernels."""
    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [
                *(source.read_text() for source in (*_SOURCES, *_HEADERS)),
                compiler,
                version,
                repr((_FLAGS, _OPTIONAL)),
                platform.machine(),
                _cpu_signature(),
            ]
        ).encode()
    )
    target = cache_dir() / f"aniserve-kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # A first evaluation otherwise pauses for seconds (tens on a loaded machine) unexplained.
        log.warning(
            f"aniserve: compiling the CPU kernels once for this machine ({compiler}, into {target.parent}) …",
        )
        # Build beside the target and rename: concurrent processes never load half a file.
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = pathlib.Path(tmp) / target.name
            for extra in _OPTIONAL:
                result = subprocess.run(
                    [compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(built), *extra], capture_output=True, text=True
                )
                if result.returncode == 0:
                    break
            else:
                raise RuntimeError(
                    f"{compiler} failed on {', '.join(s.name for s in _SOURCES)}:\n{result.stderr[-2000:]}"
                )
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        forward, backward = getattr(lib, f"aev_forward_{suffix}"), getattr(lib, f"aev_backward_{suffix}")
        # (the constants, atoms, pairs, then the arrays; backward has one array more)
        forward.argtypes = [ctypes.POINTER(Constants), i64, i64, *[pointer] * 5, ctypes.c_int]
        backward.argtypes = [ctypes.POINTER(Constants), i64, i64, *[pointer] * 6, ctypes.c_int]
        forward.restype = backward.restype = ctypes.c_int
    for suffix in ("f32", "f64"):
        mlp = getattr(lib, f"mlp_{suffix}")
        mlp.argtypes = [i64, i64, *[pointer] * 9, i64, i64, *[pointer] * 3, ctypes.c_int]
        mlp.restype = ctypes.c_int
        backward = getattr(lib, f"mlp_backward_{suffix}")
        backward.argtypes = [i64, i64, i64, pointer, pointer, pointer]
        backward.restype = None
    for suffix in ("f32", "f64"):
        step = getattr(lib, f"ani_step_{suffix}")
        # (constants; atoms, centers, pairs; species and pairs; positions, their count,
        # where each atom's is, shifts, cells; structures and how many; the networks as
        # mlp_* takes them; group_of, groups, group_species, columns, columns' count; 3
        # outputs; threads)
        step.argtypes = [
            ctypes.POINTER(Constants),
            i64,
            i64,
            i64,
            *[pointer] * 3,
            i64,
            *[pointer] * 5,
            i64,
            i64,
            i64,
            *[pointer] * 7,
            pointer,
            i64,
            pointer,
            pointer,
            i64,
            *[pointer] * 3,
            ctypes.c_int,
        ]
        step.restype = ctypes.c_int
    lib.neighbors_cell_list.argtypes = [
        i64,
        pointer,
        i64,
        pointer,
        pointer,
        pointer,
        ctypes.c_double,
        ctypes.c_int,
        ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)),
    ]
    lib.neighbors_cell_list.restype = i64
    lib.neighbors_periodic.argtypes = [
        i64,
        pointer,
        pointer,
        pointer,
        ctypes.c_double,
        ctypes.c_int,
        ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)),
    ]
    lib.neighbors_periodic.restype = i64
    lib.neighbors_free.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.neighbors_free.restype = None
    return lib
