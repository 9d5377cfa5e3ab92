"""Checkpoints: safetensors weights with a JSON header in the file's metadata. Never pickle.

One file holds everything needed to rebuild and use the network:

    header = {
      "format": "pl3d_ros.checkpoint", "version": 1,
      "model": ModelConfig as a dict,         # architecture
      "class_set": ClassSet.to_dict(),        # names, colours, raw-id map
      "sensor": RangeImageConfig as a dict,   # range-image geometry the 3D branch was trained on
      "input": {"image": [1, 3, H, W], "range_image": [1, 5, rows, cols]},
      "preprocessing": {...},                 # how inputs are made (documented, checked)
      "training": {...},                      # data summary, epochs, metrics; free-form
    }
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pl3d_ros.atomic_write import atomic_write
from pl3d_ros.config import ConfigError, ModelConfig, RangeImageConfig
from pl3d_ros.labels import ClassSet, ClassSetError
from pl3d_ros.models.two_stream import TwoStreamNet, build_model

FORMAT = "pl3d_ros.checkpoint"
VERSION = 1
PREPROCESSING = {
    "image": "RGB float32 in [0, 1], resized then centre-cropped to the input size (camera K adjusted)",
    "range_image": "spherical projection, nearest point per cell; channels range, x, y, z (m), intensity; 0 = empty",
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what it is used for."""


@dataclass
class CheckpointHeader:
    model: ModelConfig
    class_set: ClassSet
    sensor: RangeImageConfig
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        m, s = self.model, self.sensor
        return {"image": [1, 3, m.image_height, m.image_width], "range_image": [1, 5, s.rows, s.cols]}

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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> CheckpointHeader:
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not a pl3d_ros checkpoint (format {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise CheckpointError(f"{source}: checkpoint version {data.get('version')} unsupported "
                                  f"(this pl3d_ros reads version {VERSION})")
        try:
            model = ModelConfig(**data["model"])
            model.validate()
            sensor = RangeImageConfig(**data["sensor"])
            sensor.validate()
            model.check_sensor(sensor)
            class_set = ClassSet.from_dict(data["class_set"], source=source)
        except (KeyError, TypeError, ConfigError, ClassSetError) as exc:
            raise CheckpointError(f"{source}: malformed header: {exc}") from exc
        header = cls(model, class_set, sensor, dict(data.get("training", {})))
        if data.get("input") != header.input_shapes:
            raise CheckpointError(f"{source}: input spec {data.get('input')} disagrees with its "
                                  f"model and sensor ({header.input_shapes})")
        return header


def save_checkpoint(path: str | Path, model: TwoStreamNet, header: CheckpointHeader) -> Path:
    """Write weights + header atomically (``atomic_write``: temp file, fsync, rename): a crash
    never leaves half a file, and the temps of earlier interrupted writes are removed."""
    from safetensors.torch import save_file

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
    model = build_model(header.model, header.class_set.num_classes)
    try:
        state = load_file(str(path), device="cpu")
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture in its header: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from exc
    return model.to(device).eval(), header
