"""The label map: label names in id order, saved with every run and export as ``labels.json``
(``{"id2label": {"0": name, …}}``), the single source of the name ↔ id mapping for every later stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .files import read_json, write_json

LABELS_FILE = "labels.json"


@dataclass
class LabelMap:
    names: list[str]

    def __post_init__(self):
        self.ids = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self.ids)

    def encode(self, labels) -> list[int]:
        return [self.ids[str(x)] for x in labels]

    def save(self, path: Path) -> None:
        write_json(path, {"id2label": {str(i): n for i, n in enumerate(self.names)}})

    @classmethod
    def load(cls, path: Path) -> LabelMap:
        """From a labels.json file, or from the folder that holds one."""
        path = Path(path)
        raw = read_json(path / LABELS_FILE if path.is_dir() else path)["id2label"]
        return cls([raw[str(i)] for i in range(len(raw))])
