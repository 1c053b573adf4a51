"""Where aniserve keeps what it downloads or builds: one root for all of it."""

from __future__ import annotations

import os
import pathlib


def cache_root() -> pathlib.Path:
    """``$ANISERVE_CACHE``, default ``~/.cache/aniserve``: compiled kernels (``kernels/``),
    downloaded models (``models/``), benchmark work (``bench-transfer/``)."""
    return pathlib.Path(os.environ.get("ANISERVE_CACHE") or pathlib.Path.home() / ".cache" / "aniserve")
