"""Where aniserve keeps what it downloads or builds: one root for all of it."""

from __future__ import annotations

import os
import pathlib


def cache_root() -> pathlib.Path:
    """``$ANISERVE_CACHE``, default ``~/.cache/aniserve``: compiled kernels (``kernels/``),
    downloaded models (``models/``), benchmark work (``bench-transfer/``)."""
    return pathlib.Path(os.environ.get("ANISERVE_CACHE") or pathlib.Path.home() / ".cache" / "aniserve")


def size_mb(folder) -> float:
    """Bytes under ``folder`` (files only, links not followed), in MB."""
    folder = pathlib.Path(folder)
    if not folder.exists():
        return 0.0
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def entries() -> list[tuple[str, float]]:
    """(name, MB) of each folder in the cache."""
    root = cache_root()
    return [(p.name, size_mb(p)) for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []


def clear(names=None) -> list[tuple[str, float]]:
    """Remove the named cache folders (every one when None); what was removed, with sizes."""
    import shutil

    known = dict(entries())
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise LookupError(
            f"no cache folder {', '.join(map(repr, unknown))} in {cache_root()} "
            f"(there: {', '.join(known) or 'nothing'})"
        )
    removed = []
    for name in names or sorted(known):
        shutil.rmtree(cache_root() / name)
        removed.append((name, known[name]))
    return removed
