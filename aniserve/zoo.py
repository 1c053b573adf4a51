"""The official ANI models (ANI-1x, ANI-1ccx, ANI-2x): where to find them.

Looked for, in order: ``$ANISERVE_MODEL_DIR`` (a folder laid out like the official
model zoo: ``ani-1x_8x.info`` beside ``ani-1x_8x/``), the user cache folder
(``$ANISERVE_CACHE``, default ``~/.cache/aniserve/models``), and, where online, the
model-zoo archive downloaded into that cache.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile

from aniserve.cache import cache_root
from aniserve.hookspecs import hookimpl

OFFICIAL = {"ani-1x": "ani-1x_8x.info", "ani-1ccx": "ani-1ccx_8x.info", "ani-2x": "ani-2x_8x.info"}
ARCHIVE_URL = os.environ.get(
    "ANISERVE_MODEL_ZOO_URL", "https://github.com/aiqm/ani-model-zoo/archive/refs/heads/master.zip"
)


def cache_dir() -> pathlib.Path:
    return cache_root() / "models"


def _find_info(folder: pathlib.Path, info: str) -> pathlib.Path | None:
    direct = folder / info
    if direct.is_file():
        return direct
    found = sorted(folder.glob(f"**/{info}")) if folder.is_dir() else []
    return found[0] if found else None


class OfficialZoo:
    description = "Official ANI-1x, ANI-1ccx, ANI-2x (NeuroChem weights): $ANISERVE_MODEL_DIR, cache, download"

    def names(self) -> list[str]:
        return list(OFFICIAL)

    def locate(self, name: str):
        if name not in OFFICIAL:
            return None, []
        info = OFFICIAL[name]
        looked = []
        env = os.environ.get("ANISERVE_MODEL_DIR")
        if env:
            looked.append(f"$ANISERVE_MODEL_DIR={env}")
            hit = _find_info(pathlib.Path(env), info)
            if hit:
                return hit, looked
        else:
            looked.append("$ANISERVE_MODEL_DIR (not set)")
        cache = cache_dir()
        looked.append(f"cache {cache}")
        hit = _find_info(cache, info)
        if hit:
            return hit, looked
        try:
            _download(cache)
        except (urllib.error.URLError, OSError, zipfile.BadZipFile) as error:
            looked.append(f"download {ARCHIVE_URL} failed ({error})")
            return None, looked
        hit = _find_info(cache, info)
        if hit is None:
            looked.append(f"download {ARCHIVE_URL} did not contain {info}")
        return hit, looked


def _download(cache: pathlib.Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        archive = pathlib.Path(tmp) / "zoo.zip"
        with urllib.request.urlopen(ARCHIVE_URL, timeout=30) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        with zipfile.ZipFile(archive) as z:
            z.extractall(pathlib.Path(tmp) / "unpacked")
        # Publish atomically so a concurrent or interrupted download never leaves half a zoo.
        os.replace(pathlib.Path(tmp) / "unpacked", cache / "ani-model-zoo")


@hookimpl
def aniserve_model_sources():
    return {"official-zoo": OfficialZoo()}
