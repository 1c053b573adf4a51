"""Compiled CPU kernels, built on first use with the machine's C++ compiler.

On a small molecule the tensor versions of the AEVs and the networks cost a few hundred
small operations, each with its fixed cost, and on a large system the AEVs' (triplets ×
32) intermediate arrays.  Here, in C++: ``aev.cpp`` (the AEVs and their gradient, one
pass per center), ``mlp.cpp`` (frozen element ensembles' energies and input gradients,
every element in one call) and ``neighbors.cpp`` (the cell-list pair search).  The
library is compiled once per source, compiler and CPU into ``$ANISERVE_CACHE/kernels``
(default ``~/.cache/aniserve/kernels``) with ``$CXX`` (default ``c++``), and called
through ctypes: no build step at install time and no dependency beyond a compiler.
Without one, or with ``ANISERVE_KERNELS=off``, everything runs on the tensor versions,
which give the same results (tested) and remain the ones used for training (second
derivatives) and on GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import threading
import types
import warnings

import numpy as np
import torch

from aniserve.cache import cache_root

_SOURCES = sorted(pathlib.Path(__file__).parent.glob("*.cpp"))
_HEADERS = sorted(pathlib.Path(__file__).parent.glob("*.h"))
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd"]
# Tried in turn until the compiler takes them: threads (OpenMP) and vector exp/pow from
# glibc's libmvec (see vector_math.h), where those exist; threads alone; neither.
_LIBMVEC = ["-DANISERVE_LIBMVEC", "-lmvec"] if platform.system() == "Linux" and platform.machine() == "x86_64" else []
_OPTIONAL = [["-fopenmp", *_LIBMVEC], ["-fopenmp"], []]
#: The longest AEV constant arrays (ShfR; ShfA and ShfZ) the kernel takes; every ANI
#: model's fit.  Others run on the tensor version.
MAX_RADIAL_SHIFTS, MAX_ANGULAR_SHIFTS = 16, 8
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


class _Constants(ctypes.Structure):
    # The layout of ``Constants`` in aev.cpp.
    _fields_ = (
        [(name, ctypes.c_int64) for name in ("num_species", "num_shf_r", "num_shf_a", "num_shf_z", "num_pairs")]
        + [(name, ctypes.c_double) for name in ("Rcr", "Rca", "EtaR", "EtaA", "Zeta")]
        + [(name, ctypes.POINTER(ctypes.c_double)) for name in ("ShfR", "ShfA", "cos_z", "sin_z")]
        + [("pair_index", ctypes.POINTER(ctypes.c_int64))]
    )


#: Kernel backends: ``compiled`` (this folder's C++, on CPU tensors), ``tensor`` (torch
#: operations only, any device) and ``cuda``, a named slot for a GPU kernel backend that
#: does not exist yet (CUDA tensors run the tensor operations meanwhile).
BACKENDS = ("compiled", "tensor", "cuda")
_backend: list[str] = []


def _warn(message: str) -> None:
    """A RuntimeWarning attributed to the first frame outside aniserve and torch: the
    user's line that led here, not a line deep inside the packages."""
    inside = (str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(torch.__file__).resolve().parent))
    frame: types.FrameType | None = sys._getframe(0)
    level = 1
    while frame is not None and str(pathlib.Path(frame.f_code.co_filename).resolve()).startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def backend() -> str:
    """The kernel backend in use; initially from ANISERVE_KERNELS (read once: on or
    compiled → compiled; off or tensor → tensor), default compiled."""
    if not _backend:
        setting = os.environ.get("ANISERVE_KERNELS", "compiled").lower()
        _backend.append("tensor" if setting in ("off", "0", "no", "false", "tensor") else "compiled")
        if _backend[0] == "tensor":
            _warn(
                "aniserve: compiled CPU kernels switched off (ANISERVE_KERNELS); using tensor operations, slower on CPU"
            )
    return _backend[0]


def use(name: str) -> None:
    """Select the kernel backend for this process (``bench speed --kernels`` calls it)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "cuda":
        raise NotImplementedError(
            "no CUDA kernel backend yet: on CUDA devices the tensor backend runs, use('tensor') or leave the default"
        )
    _backend[:] = [name]


@contextlib.contextmanager
def using(name: str):
    """Run a block with another kernel backend (tests compare the two)."""
    previous = backend()
    use(name)
    try:
        yield
    finally:
        use(previous)


def enabled() -> bool:
    return backend() == "compiled"


def library_for(tensor: torch.Tensor) -> ctypes.CDLL | None:
    """The compiled kernels when they may run on ``tensor`` (the backend is
    ``compiled``, the tensor is a float32/float64 or integer CPU tensor), else None:
    the one place that decides whether a kernel runs."""
    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64, torch.int64):
        return None
    return library()


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


def _build() -> ctypes.CDLL:
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
        print(
            f"aniserve: compiling the CPU kernels once for this machine ({compiler}, into {target.parent}) …",
            file=sys.stderr,
            flush=True,
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
        forward.argtypes = [
            ctypes.POINTER(_Constants),
            i64,
            i64,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            ctypes.c_int,
        ]
        backward.argtypes = [
            ctypes.POINTER(_Constants),
            i64,
            i64,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            ctypes.c_int,
        ]
        forward.restype = backward.restype = ctypes.c_int
    for suffix in ("f32", "f64"):
        mlp = getattr(lib, f"mlp_{suffix}")
        mlp.argtypes = [
            i64,
            i64,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            i64,
            i64,
            pointer,
            pointer,
            pointer,
            ctypes.c_int,
        ]
        mlp.restype = ctypes.c_int
        backward = getattr(lib, f"mlp_backward_{suffix}")
        backward.argtypes = [i64, i64, i64, pointer, pointer, pointer]
        backward.restype = None
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
    lib.neighbors_free.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.neighbors_free.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (kernels switched off, or no working compiler: then
    one warning says why).  Called on every evaluation, so the loaded case is a lookup."""
    if not enabled():
        return None
    try:
        return _loaded["lib"]
    except KeyError:
        pass
    with _lock:
        if "lib" not in _loaded:
            try:
                _loaded["lib"] = _build()
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:
                _warn(f"aniserve: compiled CPU kernels unavailable, using tensor operations (slower on CPU): {error}")
                _loaded["lib"] = None
        return _loaded["lib"]


class AEVKernelConstants:
    """The AEV constants in the kernel's layout (arrays kept alive with the struct)."""

    def __init__(
        self,
        num_species: int,
        num_pairs: int,
        Rcr: float,
        Rca: float,
        EtaR: float,
        EtaA: float,
        Zeta: float,
        ShfR,
        ShfA,
        ShfZ,
        pair_index: torch.Tensor,
    ):
        as_array = lambda values: np.ascontiguousarray(np.asarray(values, dtype=np.float64).ravel())  # noqa: E731
        shf_z = as_array(ShfZ)
        self._arrays = [as_array(ShfR), as_array(ShfA), np.cos(shf_z), np.sin(shf_z)]
        self._pair_index = np.ascontiguousarray(pair_index.cpu().numpy(), dtype=np.int64)
        double_p = ctypes.POINTER(ctypes.c_double)
        self.struct = _Constants(
            num_species,
            len(self._arrays[0]),
            len(self._arrays[1]),
            len(shf_z),
            num_pairs,
            Rcr,
            Rca,
            EtaR,
            EtaA,
            Zeta,
            *(a.ctypes.data_as(double_p) for a in self._arrays),
            self._pair_index.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
        )
        self.width = num_species * len(self._arrays[0]) + num_pairs * len(self._arrays[1]) * len(shf_z)
        self.fits = (
            len(self._arrays[0]) <= MAX_RADIAL_SHIFTS and max(len(self._arrays[1]), len(shf_z)) <= MAX_ANGULAR_SHIFTS
        )


def _suffix(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.float64:
        return "f64"
    raise TypeError(f"the AEV kernel computes in float32 or float64, not {dtype}")


def aev_forward(
    lib: ctypes.CDLL,
    constants: AEVKernelConstants,
    species: torch.Tensor,
    center: torch.Tensor,
    neighbor: torch.Tensor,
    vectors: torch.Tensor,
) -> torch.Tensor:
    """AEVs (N, width) from species (N,), pairs sorted by center (P,), vectors (P, 3) Å."""
    out = vectors.new_zeros(len(species), constants.width)
    status = getattr(lib, f"aev_forward_{_suffix(vectors.dtype)}")(
        ctypes.byref(constants.struct),
        len(species),
        len(center),
        species.data_ptr(),
        center.data_ptr(),
        neighbor.data_ptr(),
        vectors.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise ValueError("AEV constant arrays longer than the compiled kernel allows")
    return out


def pack_panels(weights: torch.Tensor) -> torch.Tensor:
    """(k, K, N) → (k, K·N) in mlp.cpp's column panels: panels of two vectors' width,
    then at most one of one vector, then single columns (a vector: 8 float32 or 4
    float64), each panel's K rows stored one after another."""
    width = 32 // weights.element_size()
    N = weights.shape[2]
    wide, narrow = N - N % (2 * width), N - N % width
    edges = [*range(0, wide, 2 * width), *range(wide, narrow, width), *range(narrow, N + 1)]
    return torch.cat([weights[:, :, a:b].reshape(weights.shape[0], -1) for a, b in zip(edges, edges[1:])], dim=1)


class MLPKernelLayers:
    """A frozen ensemble's layers as the MLP kernel reads them: each hidden layer's
    weights (k, in, out) and their transpose, packed in column panels
    (``pack_panels``), the output layer's (k, in, 1) and the biases (k, 1, out) as they
    are, and arrays of their addresses (the tensors are kept alive here)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], alpha: float):
        hidden = weights[:-1]
        packed = [pack_panels(w) for w in hidden] + [weights[-1].contiguous()]
        transposed = [pack_panels(w.transpose(1, 2)) for w in hidden]
        self.tensors = [*packed, *transposed, *(b.contiguous() for b in biases)]
        layers = len(weights)
        self.weights = (ctypes.c_void_p * layers)(*(t.data_ptr() for t in packed))
        self.transposed = (ctypes.c_void_p * max(1, len(transposed)))(*(t.data_ptr() for t in transposed))
        self.biases = (ctypes.c_void_p * layers)(*(t.data_ptr() for t in self.tensors[-layers:]))
        self.sizes = np.array([weights[0].shape[1], *(w.shape[2] for w in weights)], dtype=np.int64)
        self.layers, self.members, self.dtype, self.alpha = layers, weights[0].shape[0], weights[0].dtype, alpha


class MLPKernelNetworks:
    """Several frozen ensembles as one MLP kernel call reads them: ``groups[g]`` lists
    the networks (``MLPKernelLayers``, the same member count, dtype and input width)
    whose outputs add up to the energies of the g-th group of rows."""

    def __init__(self, groups: list[list[MLPKernelLayers]]):
        networks = [net for group in groups for net in group]
        if len({(net.members, net.dtype, int(net.sizes[0])) for net in networks}) != 1:
            raise ValueError("the networks of one kernel call differ in members, dtype or input width")
        self.groups, self.networks = groups, networks
        self.members, self.dtype, self.width = networks[0].members, networks[0].dtype, int(networks[0].sizes[0])
        self.group_of = [g for g, group in enumerate(groups) for _ in group]
        count, array = len(networks), ctypes.c_void_p * len(networks)
        self.layers = np.array([net.layers for net in networks], dtype=np.int64)
        self.alphas = torch.tensor([net.alpha for net in networks], dtype=self.dtype)
        self.arrays = [
            array(*(net.sizes.ctypes.data for net in networks)),
            array(*(ctypes.addressof(net.weights) for net in networks)),
            array(*(ctypes.addressof(net.transposed) for net in networks)),
            array(*(ctypes.addressof(net.biases) for net in networks)),
        ]
        # (numpy's .ctypes costs ~50 µs a call: the addresses are taken once)
        self.arguments = (
            count,
            self.members,
            self.layers.ctypes.data,
            *(ctypes.addressof(a) for a in self.arrays),
            self.alphas.data_ptr(),
        )


def mlp(
    lib: ctypes.CDLL, networks: MLPKernelNetworks, features: torch.Tensor, counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Member energies (k, n) and input gradients ∂E_mi/∂x_i (k, n, in) of features
    (n, in) whose rows come in groups of ``counts[g]``, each through ``networks.groups[g]``."""
    features = features.to(networks.dtype).contiguous()
    if features.dim() != 2 or features.shape[1] != networks.width:
        raise ValueError(f"features of shape {tuple(features.shape)} for networks of input width {networks.width}")
    n = features.shape[0]
    if sum(counts) != n or len(counts) != len(networks.groups) or min(counts, default=0) < 0:
        raise ValueError(f"row counts {counts} do not match {n} feature rows in {len(networks.groups)} groups")
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    # Each network's first row and row count, as one int64 array (a tensor: its address is cheap).
    rows = torch.tensor([starts[g] for g in networks.group_of] + [counts[g] for g in networks.group_of])
    energies = features.new_empty(networks.members, n)
    gradients = features.new_empty(networks.members, n, features.shape[1])
    status = getattr(lib, f"mlp_{_suffix(networks.dtype)}")(
        *networks.arguments,
        rows.data_ptr(),
        rows.data_ptr() + 8 * len(networks.group_of),
        n,
        features.shape[1],
        features.data_ptr(),
        energies.data_ptr(),
        gradients.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise ValueError(
            f"the MLP kernel refused features of shape {tuple(features.shape)}: a network's widths do not match them"
        )
    return energies, gradients


def mlp_backward(lib: ctypes.CDLL, grad: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Σ_m grad[m, i] gradients[m, i, :]: the features' gradient (n, in), given that of
    the member energies (k, n) and ``mlp``'s input gradients (k, n, in)."""
    grad = grad.to(gradients.dtype).contiguous()
    k, n, width = gradients.shape
    if tuple(grad.shape) != (k, n) or not gradients.is_contiguous():
        raise ValueError(f"gradient of shape {tuple(grad.shape)} for input gradients of shape {(k, n, width)}")
    out = gradients.new_empty(n, width)
    getattr(lib, f"mlp_backward_{_suffix(gradients.dtype)}")(
        k, n, width, grad.data_ptr(), gradients.data_ptr(), out.data_ptr()
    )
    return out


def aev_backward(
    lib: ctypes.CDLL,
    constants: AEVKernelConstants,
    species: torch.Tensor,
    center: torch.Tensor,
    neighbor: torch.Tensor,
    vectors: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """The gradient (P, 3) with respect to the vectors, given that of the AEVs (N, width)."""
    grad = grad.to(vectors.dtype).contiguous()
    out = torch.zeros_like(vectors)
    status = getattr(lib, f"aev_backward_{_suffix(vectors.dtype)}")(
        ctypes.byref(constants.struct),
        len(species),
        len(center),
        species.data_ptr(),
        center.data_ptr(),
        neighbor.data_ptr(),
        vectors.data_ptr(),
        grad.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise ValueError("AEV constant arrays longer than the compiled kernel allows")
    return out


def cell_list(
    lib: ctypes.CDLL,
    queries: torch.Tensor,
    sources: torch.Tensor,
    source_atom: torch.Tensor,
    central: torch.Tensor | None,
    cutoff: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, source) index pairs within ``cutoff``, sorted by query, without a query's
    own atom (``source_atom[s] == q`` where ``central[s]``; all sources central when
    None).  queries (Q, 3), sources (S, 3) Å, float64 on the CPU."""
    queries, sources = queries.to(torch.float64).contiguous(), sources.to(torch.float64).contiguous()
    source_atom = source_atom.long().contiguous()
    central = torch.ones(len(sources), dtype=torch.uint8) if central is None else central.to(torch.uint8).contiguous()
    found = ctypes.POINTER(ctypes.c_int64)()
    total = lib.neighbors_cell_list(
        len(queries),
        queries.data_ptr(),
        len(sources),
        sources.data_ptr(),
        source_atom.data_ptr(),
        central.data_ptr(),
        cutoff,
        torch.get_num_threads(),
        ctypes.byref(found),
    )
    if total < 0:
        raise MemoryError("out of memory in the neighbour search")
    try:
        pairs = (
            torch.from_numpy(np.ctypeslib.as_array(found, shape=(2, total)).copy())
            if total
            else torch.zeros(2, 0, dtype=torch.long)
        )
    finally:
        lib.neighbors_free(found)
    return pairs[0], pairs[1]
