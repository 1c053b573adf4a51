"""Models shipped inside aniserve (see MODEL_CARD.md; the weights derive from the official ANI-1x,
MIT-licensed: LICENSE-ani-model-zoo)."""

from __future__ import annotations

import pathlib

from aniserve.hookspecs import hookimpl

FOLDER = pathlib.Path(__file__).resolve().parent

#: The model the CLI serves when none is named: works offline, no download.
DEFAULT_MODEL = "aniserve-1x-ccsdt"


class EmbeddedModels:
    description = "Models shipped inside aniserve (aniserve-1x-ccsdt: ANI-1x transfer-learned to CCSD(T)/cc-pVDZ)"

    def names(self) -> list[str]:
        return sorted(p.stem for p in FOLDER.glob("*.safetensors"))

    def locate(self, name: str):
        path = FOLDER / f"{name}.safetensors"
        return (path if path.is_file() else None), [str(path)]


@hookimpl
def aniserve_model_sources():
    return {"embedded": EmbeddedModels()}
