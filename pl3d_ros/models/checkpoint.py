"""Checkpoints: safetensors weights with a JSON header in the file's metadata. Never pickle.

One file holds everything needed to rebuild and use the network:

    header = {
      "format": "pl3d_ros.checkpoint", "version": 2,
      "model": ModelConfig as a dict,         # input size, branch architectures, unet widths
      "class_set": ClassSet.to_dict(),        # names, colours, raw-id map
      "sensor": RangeImageConfig as a dict,   # range-image geometry the 3D branch was trained on
      "input": {"image": [1, 3, H, W], "range_image": [1, 5, rows, cols]},
      "preprocessing": {...},                 # how inputs are made (documented, checked)
      "training": {...},                      # data summary, epochs, metrics; free-form
      "branches": {"image": BranchSpec, "range": BranchSpec},  # imported branches only
    }

A unet branch is sized by ``model.*_widths``. An imported branch (``model.image_arch`` /
``range_arch`` other than unet, made by ``pl3d import``) has a ``branches`` entry: its sizes,
input normalisation, source classes, the map onto the class set, and where its weights came from
(file names, sha256, licence note). Every field is checked when the header is read: unknown or
missing keys, sizes its architecture cannot have, a class map that does not name the class set's
classes, an input size the architecture cannot take; the error names the field.

Version 1 (before imported branches: no ``branches``, no ``*_arch``) is read as unet + unet.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pl3d_ros import registry
from pl3d_ros.atomic_write import atomic_write
from pl3d_ros.config import ConfigError, ModelConfig, RangeImageConfig
from pl3d_ros.labels import ClassSet, ClassSetError
from pl3d_ros.models.pretrained import PretrainedError, load_strict
from pl3d_ros.models.two_stream import TwoStreamNet, build_from_header

FORMAT = "pl3d_ros.checkpoint"
VERSION = 2
READS = (1, 2)  # version 1: unet branches only, no "branches"
#: Top-level header keys per version: anything else is refused.
KEYS = {1: {"format", "version", "model", "class_set", "sensor", "input", "preprocessing", "training"}}
KEYS[2] = KEYS[1] | {"branches"}
BRANCH_KINDS = ("image", "range")
PREPROCESSING = {
    "image": "RGB float32 in [0, 1], resized then centre-cropped to the input size (camera K adjusted)",
    "range_image": "spherical projection, nearest point per cell; channels range, x, y, z (m), intensity; 0 = empty",
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what it is used for."""


@dataclass(frozen=True)
class BranchSpec:
    """An imported branch as the header records it (``branches.image`` / ``branches.range``).

    arch: its architecture (= ``model.image_arch`` / ``range_arch``).
    params: the architecture's sizes (checked by the architecture, e.g. ``{"scale": 2.0}``).
    normalisation: ``{"channels": [...], "mean": [...], "std": [...]}``: what the network does to
        the raw input inside (RGB in [0, 1]; metric range channels), (x - mean) / std per channel.
    source_classes: the network's own outputs, in order.
    class_map: {target class: [source classes]} for every class of the class set (an empty list
        for a class with no source); the source classes listed nowhere are left out.
    source: provenance, free-form: file names, sha256, licence note.
    notes: where the import departed from the upstream configuration, one line each.
    """

    arch: str
    params: dict[str, Any]
    normalisation: dict[str, list]
    source_classes: list[str]
    class_map: dict[str, list[str]]
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BranchSpec:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where} must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise CheckpointError(f"{where}: " + "; ".join(
                part for part in (f"missing {missing}" if missing else "",
                                  f"unknown key(s) {unknown}" if unknown else "") if part))
        types = {"arch": str, "params": dict, "normalisation": dict, "source_classes": list,
                 "class_map": dict, "source": dict, "notes": list}
        for name, kind in types.items():
            if not isinstance(data[name], kind):
                raise CheckpointError(f"{where}.{name} must be a {kind.__name__}, got {data[name]!r:.80}")
        return cls(**{n: data[n] for n in names})


@dataclass
class CheckpointHeader:
    model: ModelConfig
    class_set: ClassSet
    sensor: RangeImageConfig
    training: dict[str, Any] = field(default_factory=dict)
    branches: dict[str, BranchSpec] = field(default_factory=dict)

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        m, s = self.model, self.sensor
        return {"image": [1, 3, m.image_height, m.image_width], "range_image": [1, 5, s.rows, s.cols]}

    def validate(self, source: str = "checkpoint header") -> CheckpointHeader:
        """Check the whole header (settings, each branch against its architecture) -> self.

        Raises CheckpointError naming the field. Used when a header is read and before one is
        written, so no checkpoint that cannot be rebuilt is ever saved.
        """
        try:
            self.model.validate()
            self.sensor.validate()
            self.model.check_sensor(self.sensor)
        except ConfigError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        unknown = sorted(set(self.branches) - set(BRANCH_KINDS))
        if unknown:
            raise CheckpointError(f"{source}: branches has unknown entries {unknown} (image, range)")
        for kind, archs in (("image", registry.IMAGE_BRANCHES), ("range", registry.RANGE_BRANCHES)):
            name = getattr(self.model, f"{kind}_arch")
            arch = archs.get(name)
            spec = self.branches.get(kind)
            if arch.imported and spec is None:
                raise CheckpointError(f"{source}: the {kind} branch is {name}, but branches.{kind} is missing")
            if not arch.imported and spec is not None:
                raise CheckpointError(f"{source}: branches.{kind} is given, but the {kind} branch is {name} "
                                      f"(sized by model.{kind}_widths)")
            if spec is not None and spec.arch != name:
                raise CheckpointError(f"{source}: branches.{kind}.arch is {spec.arch!r}, model.{kind}_arch {name!r}")
            try:
                arch.check(self)
            except ValueError as exc:  # ConfigError, PretrainedError, ClassMapError
                raise CheckpointError(f"{source}: {kind} branch ({name}): {exc}") from exc
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": dataclasses.asdict(self.model),
            "class_set": self.class_set.to_dict(),
            "sensor": dataclasses.asdict(self.sensor),
            "input": self.input_shapes,
            "preprocessing": PREPROCESSING,
            "training": self.training,
            "branches": {k: v.to_dict() for k, v in self.branches.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> CheckpointHeader:
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not a pl3d_ros checkpoint (format {data.get('format')!r})")
        version = data.get("version")
        if version not in READS:
            raise CheckpointError(f"{source}: checkpoint version {version} unsupported "
                                  f"(this pl3d_ros reads versions {', '.join(map(str, READS))})")
        unknown = sorted(set(data) - KEYS[version])
        if unknown:
            raise CheckpointError(f"{source}: unknown header key(s) {unknown} for version {version}")
        if version >= 2 and "branches" not in data:
            raise CheckpointError(f"{source}: header version {version} without 'branches'")
        try:
            model_data = dict(data["model"])
            if version == 1 and ({"image_arch", "range_arch"} & set(model_data)):
                raise CheckpointError(f"{source}: version 1 headers have unet branches only")
            missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in model_data]
            if version >= 2 and missing:  # no silent defaults for what decides the architecture
                raise CheckpointError(f"{source}: model is missing {missing}")
            model = ModelConfig(**model_data)
            sensor = RangeImageConfig(**data["sensor"])
            class_set = ClassSet.from_dict(data["class_set"], source=source)
            raw = data.get("branches", {})
            if not isinstance(raw, dict):
                raise CheckpointError(f"{source}: branches must be a mapping")
            branches = {k: BranchSpec.from_dict(v, f"{source}: branches.{k}") for k, v in raw.items()}
        except (KeyError, TypeError, ClassSetError) as exc:
            raise CheckpointError(f"{source}: malformed header: {exc}") from exc
        header = cls(model, class_set, sensor, dict(data.get("training", {})), branches).validate(source)
        if data.get("input") != header.input_shapes:
            raise CheckpointError(f"{source}: input spec {data.get('input')} disagrees with its "
                                  f"model and sensor ({header.input_shapes})")
        return header


def save_checkpoint(path: str | Path, model: TwoStreamNet, header: CheckpointHeader) -> Path:
    """Write weights + header atomically (``atomic_write``: temp file, fsync, rename): a crash
    never leaves half a file, and the temps of earlier interrupted writes are removed."""
    from safetensors.torch import save_file

    header.validate(str(path))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"pl3d": json.dumps(header.to_dict())}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_header(path: str | Path) -> CheckpointHeader:
    """The header alone (no weights loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "pl3d" not in meta:
        raise CheckpointError(f"{path} has no pl3d_ros header (a plain safetensors file?)")
    try:
        data = json.loads(meta["pl3d"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: header is not valid JSON: {exc}") from exc
    return CheckpointHeader.from_dict(data, str(path))


def load_checkpoint(path: str | Path, *, class_set: str | None = None,
                    sensor: RangeImageConfig | None = None,
                    device: str | torch.device = "cpu") -> tuple[TwoStreamNet, CheckpointHeader]:
    """Rebuild the network from the header and load its weights (strict).

    ``class_set`` / ``sensor``, when given, must match the checkpoint's: a model trained on other
    classes or another range-image geometry is refused with the difference spelled out.
    """
    from safetensors.torch import load_file

    header = read_header(path)
    if class_set is not None and class_set != header.class_set.name:
        raise CheckpointError(f"{path} was trained on class set {header.class_set.name!r}, "
                              f"but {class_set!r} is configured")
    if sensor is not None and dataclasses.asdict(sensor) != dataclasses.asdict(header.sensor):
        raise CheckpointError(f"{path} expects range images {dataclasses.asdict(header.sensor)}, "
                              f"but the sensor is configured as {dataclasses.asdict(sensor)}")
    model = build_from_header(header)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from exc
    try:  # every missing, unexpected and mis-shaped tensor named in one message
        load_strict(model, state, "the weights")
    except PretrainedError as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture in its header: {exc}") from exc
    return model.to(device).eval(), header
