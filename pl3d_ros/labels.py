"""Class sets: names, RViz colours, and the map from a dataset's raw label ids to train ids.

A class set is a YAML file (shipped ones live in ``pl3d_ros/classes/``; any other path works too):

    name: xmuda10
    ignore_index: 255
    classes:
      - {name: car, color: [100, 150, 245], raw_ids: [10, 252]}   # color is RGB

Raw ids are SemanticKITTI raw semantic ids (the lower 16 bits of a ``.label`` value, and of the
``label`` field of clouds written by ``pl3d kitti2bag`` and ``pl3d sim``). Raw ids that no class
lists map to ``ignore_index``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

CLASS_SET_DIR = Path(__file__).resolve().parent / "classes"
DEFAULT_CLASS_SET = "xmuda10"
IGNORE_COLOR = (128, 128, 128)  # points of no class: neutral grey in RViz
_RAW_ID_SPACE = 1 << 16


class ClassSetError(ValueError):
    """A class set file is missing or inconsistent."""


@dataclass(frozen=True, eq=False)
class ClassSet:
    """A set of C classes.

    Attributes:
        name: the set's name.
        names: C class names; train id i is names[i].
        colors: (C, 3) uint8 RGB colours.
        raw_to_train: (65536,) uint8 lookup from raw semantic id to train id or ignore_index.
        ignore_index: train id of points that belong to no class.
    """

    name: str
    names: tuple[str, ...]
    colors: np.ndarray
    raw_to_train: np.ndarray
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_train_ids(self, raw: np.ndarray) -> np.ndarray:
        """(N,) raw label values (instance id in the upper 16 bits is dropped) -> (N,) uint8 train ids."""
        raw = np.asarray(raw)
        return self.raw_to_train[(raw.astype(np.uint32, copy=False) & 0xFFFF)]

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """(N,) train ids -> (N, 3) uint8 RGB; ids outside the set get IGNORE_COLOR."""
        palette = np.full((256, 3), IGNORE_COLOR, dtype=np.uint8)
        palette[: self.num_classes] = self.colors
        return palette[np.asarray(train_ids, dtype=np.uint8)]

    def to_dict(self) -> dict:
        """A JSON/YAML-serialisable description (stored in checkpoint headers)."""
        raw_ids = [np.flatnonzero(self.raw_to_train == c).tolist() for c in range(self.num_classes)]
        return {
            "name": self.name,
            "ignore_index": self.ignore_index,
            "classes": [
                {"name": n, "color": self.colors[i].tolist(), "raw_ids": raw_ids[i]}
                for i, n in enumerate(self.names)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> ClassSet:
        try:
            name = str(data["name"])
            ignore = int(data.get("ignore_index", 255))
            entries = list(data["classes"])
        except (KeyError, TypeError) as exc:
            raise ClassSetError(f"class set {source}: needs 'name' and 'classes' ({exc})") from exc
        if not entries:
            raise ClassSetError(f"class set {source}: no classes")
        if not 0 < len(entries) <= ignore <= 255:
            raise ClassSetError(
                f"class set {source}: {len(entries)} classes need ignore_index in [{len(entries)}, 255]"
            )
        lut = np.full(_RAW_ID_SPACE, ignore, dtype=np.uint8)
        owner: dict[int, str] = {}
        names, colors = [], []
        for train_id, entry in enumerate(entries):
            cname = str(entry["name"])
            color = entry.get("color", IGNORE_COLOR)
            if len(color) != 3 or not all(0 <= int(c) <= 255 for c in color):
                raise ClassSetError(f"class set {source}: color of {cname} must be 3 values 0-255")
            for raw in entry.get("raw_ids", []):
                if not 0 <= int(raw) < _RAW_ID_SPACE:
                    raise ClassSetError(f"class set {source}: raw id {raw} of {cname} out of range")
                if int(raw) in owner:
                    raise ClassSetError(
                        f"class set {source}: raw id {raw} listed for both {owner[int(raw)]} and {cname}"
                    )
                owner[int(raw)] = cname
                lut[int(raw)] = train_id
            names.append(cname)
            colors.append([int(c) for c in color])
        if len(set(names)) != len(names):
            raise ClassSetError(f"class set {source}: duplicate class names {names}")
        lut.setflags(write=False)
        return cls(name, tuple(names), np.asarray(colors, dtype=np.uint8), lut, ignore)


def available_class_sets() -> list[str]:
    """Names of the class sets shipped with the package."""
    return sorted(p.stem for p in CLASS_SET_DIR.glob("*.yaml"))


@lru_cache(maxsize=16)
def load_class_set(name_or_path: str = DEFAULT_CLASS_SET) -> ClassSet:
    """Load a shipped class set by name, or any class-set YAML by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CLASS_SET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ClassSetError(
                f"unknown class set {name_or_path!r}; shipped: {available_class_sets()} "
                "(or pass the path of a class-set YAML)"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ClassSetError(f"cannot read class set {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ClassSetError(f"class set {path} must hold a mapping")
    return ClassSet.from_dict(data, source=str(path))
