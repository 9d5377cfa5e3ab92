"""One dataclass tree for every setting of pl3d_ros.

Each leaf has one name, one default and one place it is read. The tree loads from YAML (either the
plain nested form or the ROS 2 ``node_name: ros__parameters:`` form) and flattens to dotted names
that are exactly the node's ROS parameters (``sensor.rows``, ``sync.slop_s``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting is unknown, has the wrong type, or is out of range."""


@dataclass
class RangeImageConfig:
    """Spherical range image of a spinning LiDAR (defaults: Velodyne HDL-64E as in KITTI).

    rows x cols cells; rows span the vertical field of view [fov_down_deg, fov_up_deg] (degrees,
    up positive), columns span 360 degrees of azimuth starting behind the sensor.
    """

    rows: int = 64
    cols: int = 2048
    fov_up_deg: float = 3.0
    fov_down_deg: float = -25.0

    def validate(self) -> None:
        if self.rows <= 0 or self.cols <= 0:
            raise ConfigError(f"sensor.rows and sensor.cols must be positive, got {self.rows}x{self.cols}")
        if not self.fov_up_deg > self.fov_down_deg:
            raise ConfigError(
                f"sensor.fov_up_deg ({self.fov_up_deg}) must exceed sensor.fov_down_deg ({self.fov_down_deg})"
            )

    @property
    def fov_up(self) -> float:
        """Upper vertical field-of-view bound in radians."""
        return math.radians(self.fov_up_deg)

    @property
    def fov_down(self) -> float:
        """Lower vertical field-of-view bound in radians."""
        return math.radians(self.fov_down_deg)

    @property
    def vertical_resolution(self) -> float:
        """Vertical angle per row in radians."""
        return (self.fov_up - self.fov_down) / self.rows


@dataclass
class SyncConfig:
    """Pairing of image, camera info and cloud by header stamp."""

    slop_s: float = 0.05  # half of a 10 Hz camera period
    queue_size: int = 10

    def validate(self) -> None:
        if self.slop_s <= 0:
            raise ConfigError(f"sync.slop_s must be positive, got {self.slop_s}")
        if self.queue_size <= 0:
            raise ConfigError(f"sync.queue_size must be positive, got {self.queue_size}")


#: Network sizes. "cpu" meets the 2-core latency budget; "gpu" is for TensorRT on a desktop GPU
#: or a Jetson Orin. Image input sizes keep KITTI's ~3.3:1 aspect (other cameras are cropped).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"image_width": 640, "image_height": 192, "image_widths": [16, 32, 64, 128],
            "range_widths": [16, 32, 64, 128]},
    "gpu": {"image_width": 1216, "image_height": 352, "image_widths": [32, 64, 128, 256, 256],
            "range_widths": [32, 64, 128, 256, 256]},
}


@dataclass
class ModelConfig:
    """Two-stream network shape. The image is resized and centre-cropped to image_width x
    image_height (pixels) before the image branch; widths are channels per U-Net stage."""

    preset: str = "cpu"
    image_width: int = 640
    image_height: int = 192
    image_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    range_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
        return cls(preset=name, **MODEL_PRESETS[name])

    def validate(self) -> None:
        for key in ("image_widths", "range_widths"):
            widths = getattr(self, key)
            if len(widths) < 2 or any(int(w) != w or w <= 0 for w in widths):
                raise ConfigError(f"model.{key} needs >= 2 positive integers, got {widths}")
        div = 2 ** (len(self.image_widths) - 1)
        if self.image_width % div or self.image_height % div:
            raise ConfigError(
                f"model.image_width/height ({self.image_width}x{self.image_height}) must be "
                f"divisible by {div} for {len(self.image_widths)} U-Net stages"
            )

    def check_sensor(self, sensor: RangeImageConfig) -> None:
        div = 2 ** (len(self.range_widths) - 1)
        if sensor.rows % div or sensor.cols % div:
            raise ConfigError(
                f"sensor.rows/cols ({sensor.rows}x{sensor.cols}) must be divisible by {div} "
                f"for {len(self.range_widths)} range U-Net stages"
            )


@dataclass
class Config:
    """The root of the settings tree."""

    class_set: str = "xmuda10"
    sensor: RangeImageConfig = field(default_factory=RangeImageConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> Config:
        from pl3d_ros.labels import available_class_sets

        if self.class_set not in available_class_sets():
            raise ConfigError(
                f"class_set {self.class_set!r} unknown; available: {available_class_sets()}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        self.model.check_sensor(self.sensor)
        return self

    # -- YAML and ROS parameter mapping -------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from a nested dict; unknown keys and wrong types raise ConfigError."""
        return _build(cls, data, "").validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        """Load a YAML file: nested settings, or a ROS 2 params file (``node: ros__parameters:``)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a mapping, got {type(data).__name__}")
        if len(data) == 1:
            (inner,) = data.values()
            if isinstance(inner, dict) and "ros__parameters" in inner:
                data = inner["ros__parameters"] or {}
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-name -> value: the ROS parameter names and their values."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    walk(f"{prefix}{f.name}.", value)
                else:
                    out[prefix + f.name] = value

        walk("", self)
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> Config:
        """Inverse of ``flat``: dotted names (e.g. from ROS parameters) -> Config."""
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            node = nested
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.from_dict(nested)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {[prefix + u for u in unknown]}; known: {[prefix + n for n in fields]}"
        )
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        key = prefix + name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key + ".")
        else:
            kwargs[name] = _coerce(value, default, key)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Check ``value`` against the type of the default; ints are accepted for float settings."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return value
    return value
