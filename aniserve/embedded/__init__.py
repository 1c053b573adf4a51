"""Models shipped inside aniserve (small, demonstration scale; see MODEL_CARD.md)."""

from __future__ import annotations

import pathlib

FOLDER = pathlib.Path(__file__).resolve().parent

#: The model the CLI serves when none is named: works offline, no download.
DEFAULT_MODEL = "aniserve-ccx-demo"


class EmbeddedModels:
    description = "Models shipped inside aniserve (aniserve-ccx-demo: transfer-learned to CCSD(T), demo scale)"

    def names(self) -> list[str]:
        return sorted(p.stem for p in FOLDER.glob("*.safetensors"))

    def locate(self, name: str):
        path = FOLDER / f"{name}.safetensors"
        return (path if path.is_file() else None), [str(path)]
