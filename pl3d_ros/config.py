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
class PseudoLabelConfig:
    """Base pseudo-labels (METHODS.md section 0): class-wise thresholds over a running window."""

    confidence_cap: float = 0.9  # keep class c if confidence >= min(median_c, cap)
    median_window_frames: int = 50

    def validate(self) -> None:
        _check_range("pseudo_labels.confidence_cap", self.confidence_cap, 0.0, 1.0)
        _check_positive("pseudo_labels.median_window_frames", self.median_window_frames)


@dataclass
class RefineConfig:
    """SAM-guided refinement (METHODS.md section 1): masks, MLA, GAPP."""

    mask_provider: str = "auto"  # auto (sam/mobile_sam if a checkpoint is set, else superpixel)
    sam_checkpoint: str = ""  # path to a segment-anything / MobileSAM checkpoint
    sam_model_type: str = "vit_b"  # vit_b | vit_l | vit_h (sam) or vit_t (mobile_sam)
    sam_every_k_frames: int = 5  # SAM is slow: refine every k-th frame
    sam_points_per_side: int = 16
    superpixel_scale: float = 200.0  # Felzenszwalb parameters
    superpixel_sigma: float = 0.8
    superpixel_min_size: int = 200
    mla_min_points: int = 10  # |P_k|
    mla_min_labeled: int = 3  # |L_k|
    mla_purity: float = 0.8
    mla_representativity: float = 0.2  # |L_k| / |P_k|
    mla_max_area: float = 0.25  # share of the image a kept mask may cover
    gapp_max_rounds: int = 10
    gapp_radius_m: float = 0.3  # r = max(radius_m, radius_beams * range * vertical resolution)
    gapp_radius_beams: float = 3.0
    gapp_depth_abs_m: float = 0.5  # depth gate = max(abs, rel * depth)
    gapp_depth_rel: float = 0.05
    protect_confident: bool = True  # never overwrite a point's own confident pseudo-label

    def validate(self) -> None:
        if self.mask_provider not in ("auto", "sam", "mobile_sam", "superpixel"):
            raise ConfigError(f"refine.mask_provider must be auto, sam, mobile_sam or superpixel, "
                              f"got {self.mask_provider!r}")
        for name in ("sam_every_k_frames", "sam_points_per_side", "superpixel_min_size",
                     "gapp_max_rounds", "mla_min_points", "mla_min_labeled"):
            _check_positive(f"refine.{name}", getattr(self, name))
        for name in ("mla_purity", "mla_representativity", "mla_max_area", "gapp_depth_rel"):
            _check_range(f"refine.{name}", getattr(self, name), 0.0, 1.0)


@dataclass
class ConnectivityConfig:
    """Connectivity noise filter (METHODS.md section 2)."""

    buffer_frames: int = 50
    min_components: int = 20  # fewer in the buffer: median rule instead of the mixture
    clean_posterior: float = 0.5

    def validate(self) -> None:
        _check_positive("connectivity.buffer_frames", self.buffer_frames)
        _check_positive("connectivity.min_components", self.min_components)
        _check_range("connectivity.clean_posterior", self.clean_posterior, 0.0, 1.0)


ADAPT_METHODS = ("source", "tent", "pl", "full")
# "restore" is the stochastic restore (section 5.4); "guard" the collapse guard (section 5.5).
ADAPT_COMPONENTS = ("mla", "gapp", "connectivity", "negative", "erda", "xm", "restore", "guard")


@dataclass
class AdaptConfig:
    """Online adaptation (METHODS.md sections 3-5) and the adaptation thread."""

    method: str = "full"  # source | tent | pl | full
    disable: list[str] = field(default_factory=list)  # components of full to switch off
    trainable: str = "norm"  # norm (normalisation layers) | all
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3  # Adam on normalisation layers, as TENT and CoTTA use online
    steps_per_frame: int = 1  # lockstep mode: adaptation steps per frame
    buffer_frames: int = 4  # bounded drop-oldest buffer between inference and adaptation
    swap_every_steps: int = 5  # hand the teacher to the backend every m steps
    teacher_momentum: float = 0.999
    reliable_confidence: float = 0.9
    reliable_variance: float = 0.05
    negative_max_prob: float = 0.2
    negative_rounds: int = 1
    weight_negative: float = 0.1
    weight_erda: float = 0.1
    erda_tau: float = 1.0
    erda_lambda: float = 1.0
    prototype_momentum: float = 0.999
    weight_xm: float = 0.1
    restore_prob: float = 0.01
    collapse_window: int = 20  # frames
    collapse_max_class_share: float = 0.95
    collapse_max_disagreement: float = 0.6  # with the frozen source model
    checkpoint_every_steps: int = 100
    checkpoint_path: str = ""  # empty: no periodic checkpoint
    resume: str = "source"  # source | adapted (from checkpoint_path when it exists)

    def validate(self) -> None:
        if self.method not in ADAPT_METHODS:
            raise ConfigError(f"adapt.method must be one of {ADAPT_METHODS}, got {self.method!r}")
        unknown = sorted(set(self.disable) - set(ADAPT_COMPONENTS))
        if unknown:
            raise ConfigError(f"adapt.disable has unknown component(s) {unknown}; known: {ADAPT_COMPONENTS}")
        if self.trainable not in ("norm", "all"):
            raise ConfigError(f"adapt.trainable must be norm or all, got {self.trainable!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"adapt.optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.resume not in ("source", "adapted"):
            raise ConfigError(f"adapt.resume must be source or adapted, got {self.resume!r}")
        for name in ("steps_per_frame", "buffer_frames", "swap_every_steps", "negative_rounds",
                     "collapse_window", "checkpoint_every_steps"):
            _check_positive(f"adapt.{name}", getattr(self, name))
        for name in ("teacher_momentum", "reliable_confidence", "reliable_variance",
                     "negative_max_prob", "prototype_momentum", "restore_prob",
                     "collapse_max_class_share", "collapse_max_disagreement"):
            _check_range(f"adapt.{name}", getattr(self, name), 0.0, 1.0)
        if self.lr <= 0 or self.erda_tau <= 0:
            raise ConfigError("adapt.lr and adapt.erda_tau must be positive")

    def enabled(self, component: str) -> bool:
        """Whether a component of ``full`` is on (always False for the other methods)."""
        return self.method == "full" and component not in self.disable


RUNTIME_BACKENDS = ("onnxruntime", "torch", "tensorrt")
RUNTIME_PRECISIONS = ("fp16", "fp32")
#: QoS presets of the node's topics, turned into settings by ``runner.qos_settings``:
#: sensor_data and best_effort are BEST_EFFORT, reliable is RELIABLE; all VOLATILE, KEEP_LAST.
QOS_PRESETS = ("sensor_data", "best_effort", "reliable")


@dataclass
class RuntimeConfig:
    """Inference backend, and how the CPU is split between inference and adaptation."""

    backend: str = "onnxruntime"  # onnxruntime | torch | tensorrt
    precision: str = "fp16"  # TensorRT engine precision: fp16 | fp32 (the other backends run fp32)
    model: str = ""  # checkpoint (.safetensors); "" = the bundled default model
    device: str = ""  # torch backend device (cpu, cuda, cuda:1); "" = cuda when available
    engine_cache_dir: str = ""  # TensorRT engine cache; "" = the user's cache directory
    force_rebuild: bool = False  # rebuild the TensorRT engine even when a cached one fits
    threads: int = 0  # inference CPU threads; 0 = all (less adapt_threads if adapting unniced)
    adapt_threads: int = 1  # torch intra-op threads of the adaptation thread
    adapt_nice: int = 10  # nice increment of the adaptation threads (Linux), 0 = same priority

    def validate(self) -> None:
        if self.backend not in RUNTIME_BACKENDS:
            raise ConfigError(f"runtime.backend must be one of {RUNTIME_BACKENDS}, got {self.backend!r}")
        if self.precision not in RUNTIME_PRECISIONS:
            raise ConfigError(f"runtime.precision must be one of {RUNTIME_PRECISIONS}, "
                              f"got {self.precision!r}")
        if self.threads < 0:
            raise ConfigError(f"runtime.threads must be >= 0 (0 = automatic), got {self.threads}")
        _check_positive("runtime.adapt_threads", self.adapt_threads)
        if not 0 <= self.adapt_nice <= 19:
            raise ConfigError(f"runtime.adapt_nice must be in [0, 19], got {self.adapt_nice}")


@dataclass
class TopicsConfig:
    """Input topics. Relative names resolve in the node's namespace; remap them in launch."""

    image: str = "~/input/image"
    camera_info: str = "~/input/camera_info"
    pointcloud: str = "~/input/pointcloud"

    def validate(self) -> None:
        for name in ("image", "camera_info", "pointcloud"):
            if not getattr(self, name).strip():
                raise ConfigError(f"topics.{name} must not be empty")


@dataclass
class FramesConfig:
    """Where the LiDAR -> camera extrinsics come from: tf2 (default) or a fixed matrix."""

    static_extrinsics: list[float] = field(default_factory=list)  # 16 floats, row-major T_cam_lidar; [] = tf2
    camera_frame: str = ""  # "" = the CameraInfo's header.frame_id
    lidar_frame: str = ""  # "" = the cloud's header.frame_id
    tf_retry_s: float = 1.0  # period of the tf2 lookup until the transform is found

    def validate(self) -> None:
        values = self.static_extrinsics
        if values:
            if len(values) != 16 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                        for v in values):
                raise ConfigError("frames.static_extrinsics must be 16 numbers (row-major 4x4 "
                                  f"T_cam_lidar) or empty for tf2, got {values!r}")
            from pl3d_ros.frame import FrameError, check_rigid

            try:
                check_rigid([float(v) for v in values], "frames.static_extrinsics")
            except FrameError as exc:
                raise ConfigError(str(exc)) from exc
            self.static_extrinsics = [float(v) for v in values]
        _check_positive("frames.tf_retry_s", self.tf_retry_s)


@dataclass
class QosConfig:
    """QoS of the node's topics (names as Isaac ROS's input_qos / output_qos)."""

    input: str = "sensor_data"  # sensor_data | best_effort | reliable
    input_depth: int = 5
    output: str = "reliable"  # reliable | best_effort | sensor_data (RViz defaults to reliable)
    output_depth: int = 1

    def validate(self) -> None:
        for name in ("input", "output"):
            if getattr(self, name) not in QOS_PRESETS:
                raise ConfigError(f"qos.{name} must be one of {QOS_PRESETS}, got {getattr(self, name)!r}")
        _check_positive("qos.input_depth", self.input_depth)
        _check_positive("qos.output_depth", self.output_depth)


@dataclass
class NodeConfig:
    """The ROS node: processing budget, diagnostics, debug topics, shutdown."""

    max_allowed_processing_time_ms: float = 100.0  # WARN above this per frame
    max_acceptable_consecutive_delay_ms: float = 1000.0  # ERROR when over budget this long
    diagnostics_period_s: float = 1.0
    stats_window: int = 100  # frames behind the mean / p90 processing time
    debug_topics: bool = True  # publish ~/debug/processing_time/*, pipeline latency, cyclic time
    intensity_field: str = ""  # cloud field read as intensity; "" = intensity, i or reflectivity
    stop_timeout_s: float = 5.0  # bound on joining the inference and adaptation threads

    def validate(self) -> None:
        for name in ("max_allowed_processing_time_ms", "max_acceptable_consecutive_delay_ms",
                     "diagnostics_period_s", "stats_window", "stop_timeout_s"):
            _check_positive(f"node.{name}", getattr(self, name))


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def _check_range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key} must be in [{lo}, {hi}], got {value}")


@dataclass
class Config:
    """The root of the settings tree."""

    class_set: str = "xmuda10"
    sensor: RangeImageConfig = field(default_factory=RangeImageConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    connectivity: ConnectivityConfig = field(default_factory=ConnectivityConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    qos: QosConfig = field(default_factory=QosConfig)
    node: NodeConfig = field(default_factory=NodeConfig)

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
