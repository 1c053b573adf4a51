"""Which kernels run: one switch for the process (``use``), and one function that
decides whether a compiled kernel may run on a tensor (``library_for``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import subprocess
import sys
import threading
import types
import warnings

import torch

from aniserve.kernels import build

#: Kernel backends: ``compiled`` (this folder's C++, on CPU tensors) and ``tensor``
#: (torch operations only, any device: CUDA tensors always run these).
BACKENDS = ("compiled", "tensor")
_backend: list[str] = []
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


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
    if name == "cuda":  # a natural thing to ask for: say what happens on GPUs instead
        raise NotImplementedError(
            "no CUDA kernel backend yet: on CUDA devices the tensor backend runs, use('tensor') or leave the default"
        )
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
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
                _loaded["lib"] = build.build()
            except (OSError, subprocess.SubprocessError, RuntimeError) as error:
                _warn(f"aniserve: compiled CPU kernels unavailable, using tensor operations (slower on CPU): {error}")
                _loaded["lib"] = None
        return _loaded["lib"]
