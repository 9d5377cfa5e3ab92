"""One dataclass tree for every setting of pl3d_ros, and the one place each setting is described.

Every leaf is declared with ``settings.setting``: its default, a one-line description, its unit and
its allowed values (range, choices). From that one declaration come

* validation (:meth:`Config.validate`, at load: wrong types, non-finite numbers, out-of-range
  values and unknown choices raise :class:`ConfigError` naming the setting),
* the node's ROS parameters (``ros_params.parameter_specs``: names, types, descriptions),
* ``config/pl3d.yaml`` and ``config/pl3d.schema.json`` (``pl3d config --write config``; a test
  fails when either is stale; see ``params_files.py``).

Two roots. :class:`Config` is what the node and the offline tools (replay, eval, demo, bench) run
with; its dotted leaf names are exactly the node's ROS parameters. :class:`TrainingConfig` holds
what only training decides (network shape, range-image geometry); at run time those come from
the checkpoint's header, never from a setting.

YAML in: the plain nested form, or a ROS 2 params file (``/**:`` or ``node_name:`` then
``ros__parameters:``). YAML 1.1 reads ``1e-3`` as a string: numeric strings are accepted for
numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pl3d_ros import registry
from pl3d_ros.io.odometry import ODOM_FRAME
from pl3d_ros.settings import ConfigError, Leaf, Root, Section, leaves, section, sections, setting

__all__ = ["Config", "ConfigError", "TrainingConfig", "ModelConfig", "RangeImageConfig", "Leaf", "leaves",
           "sections", "MODEL_PRESETS"]


# --------------------------------------------------------------------------------------------------
# What the network and the checkpoint fix (training settings; at run time: the checkpoint header)
# --------------------------------------------------------------------------------------------------

@dataclass
class RangeImageConfig(Section):
    """Spherical range image of a spinning LiDAR (defaults: Velodyne HDL-64E as in KITTI).

    rows x cols cells; rows span the vertical field of view [fov_down_deg, fov_up_deg] (degrees,
    up positive), columns span 360 degrees of azimuth starting behind the sensor.
    """

    key = "sensor"

    rows: int = setting(64, "range image rows (beams)", min=1)
    cols: int = setting(2048, "range image columns (azimuth bins over 360 degrees)", min=1)
    fov_up_deg: float = setting(3.0, "upper vertical field of view (up positive)", unit="deg",
                                min=-90.0, max=90.0)
    fov_down_deg: float = setting(-25.0, "lower vertical field of view", unit="deg", min=-90.0, max=90.0)

    def check(self) -> None:
        if not self.fov_up_deg > self.fov_down_deg:
            raise ConfigError(f"sensor.fov_up_deg ({self.fov_up_deg}) must exceed "
                              f"sensor.fov_down_deg ({self.fov_down_deg})")

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


#: Network sizes. "cpu" meets the 2-core latency budget; "gpu" is for TensorRT on a desktop GPU
#: or a Jetson Orin. Image input sizes keep KITTI's ~3.3:1 aspect (other cameras are cropped).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"image_width": 640, "image_height": 192, "image_widths": [16, 32, 64, 128],
            "range_widths": [16, 32, 64, 128]},
    "gpu": {"image_width": 1216, "image_height": 352, "image_widths": [32, 64, 128, 256, 256],
            "range_widths": [32, 64, 128, 256, 256]},
}


@dataclass
class ModelConfig(Section):
    """Two-stream network shape. The image is resized and centre-cropped to image_width x
    image_height (pixels) before the image branch; widths are channels per U-Net stage.

    image_arch / range_arch name each branch's architecture (``registry.IMAGE_BRANCHES`` /
    ``RANGE_BRANCHES``). ``unet`` branches are what ``pl3d train`` trains from scratch and are
    sized by the widths; an imported branch (``pl3d import``) is sized by its entry in the
    checkpoint header's ``branches`` and has no widths ([]).
    """

    key = "model"

    preset: str = setting("cpu", "name of the network size (a preset's, or any for custom widths)",
                          choices=tuple(MODEL_PRESETS), open_choices=True)
    image_width: int = setting(640, "image branch input width (resize + centre crop)", unit="px", min=1)
    image_height: int = setting(192, "image branch input height", unit="px", min=1)
    image_widths: list[int] = setting([16, 32, 64, 128], "channels per U-Net stage of the image branch", min=1)
    range_widths: list[int] = setting([16, 32, 64, 128], "channels per U-Net stage of the range branch", min=1)
    image_arch: str = setting("unet", "image branch architecture (unet: pl3d train; others: pl3d import)",
                              choices=lambda: registry.IMAGE_BRANCHES.names)
    range_arch: str = setting("unet", "range branch architecture (unet: pl3d train; others: pl3d import)",
                              choices=lambda: registry.RANGE_BRANCHES.names)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
        return cls(preset=name, **MODEL_PRESETS[name])

    def check(self) -> None:
        for key, arch in (("image_widths", self.image_arch), ("range_widths", self.range_arch)):
            widths = getattr(self, key)
            if arch == "unet" and len(widths) < 2:
                raise ConfigError(f"model.{key} needs >= 2 positive integers, got {widths}")
            if arch != "unet" and widths:
                raise ConfigError(f"model.{key} sizes unet branches only; it must be [] for a {arch} "
                                  f"branch, got {widths}")
        if self.image_arch != "unet":
            return  # an imported branch checks its input size itself (models/imported.py)
        div = 2 ** (len(self.image_widths) - 1)
        if self.image_width % div or self.image_height % div:
            raise ConfigError(
                f"model.image_width/height ({self.image_width}x{self.image_height}) must be "
                f"divisible by {div} for {len(self.image_widths)} U-Net stages")

    def check_sensor(self, sensor: RangeImageConfig) -> None:
        if self.range_arch != "unet":
            return  # an imported branch checks the range-image size itself
        div = 2 ** (len(self.range_widths) - 1)
        if sensor.rows % div or sensor.cols % div:
            raise ConfigError(
                f"sensor.rows/cols ({sensor.rows}x{sensor.cols}) must be divisible by {div} "
                f"for {len(self.range_widths)} range U-Net stages")


@dataclass
class TrainingConfig(Root):
    """What ``pl3d train`` fixes and the checkpoint header carries: classes, network, sensor."""

    class_set: str = setting("xmuda10", "class set to train (pl3d_ros/classes/*.yaml or a path)",
                             choices=("xmuda10", "semantickitti19"), open_choices=True)
    model: ModelConfig = section()
    sensor: RangeImageConfig = section()

    def check(self) -> None:
        _check_class_set(self.class_set, "class_set")
        if self.model.image_arch != "unet" or self.model.range_arch != "unet":
            raise ConfigError(f"model.image_arch / range_arch {self.model.image_arch} / {self.model.range_arch}: "
                              "training from scratch builds unet branches only; to fine-tune an imported "
                              "model use `pl3d train --init CKPT` (the architecture comes from CKPT)")
        self.model.check_sensor(self.sensor)


# --------------------------------------------------------------------------------------------------
# What the node and the offline tools run with (the node's ROS parameters)
# --------------------------------------------------------------------------------------------------

@dataclass
class SyncConfig(Section):
    """Pairing of image, camera info and cloud by header stamp (message_filters
    ApproximateTimeSynchronizer)."""

    key = "sync"

    slop_s: float = setting(0.05, "largest stamp difference that still pairs (at least half the camera period)",
                            unit="s", gt=0.0, max=10.0)
    queue_size: int = setting(10, "messages kept per input while pairing (5-10: the cost grows as queue_size^2)",
                              min=1, max=1000)


@dataclass
class PseudoLabelConfig(Section):
    """Base pseudo-labels (METHODS.md section 0): class-wise thresholds over a running window."""

    key = "pseudo_labels"

    confidence_cap: float = setting(0.9, "keep class c if confidence >= min(running median of c, cap)",
                                    min=0.0, max=1.0)
    out_of_view: bool = setting(True, "pseudo-label points the camera does not see (only the 3D branch votes "
                                "there: under a LiDAR shift those labels are the least precise)")
    median_window_frames: int = setting(50, "frames in the running window of class medians", min=1)


@dataclass
class RefineConfig(Section):
    """SAM-guided refinement: masks, mask label assignment (MLA), propagation (GAPP) (METHODS.md 1)."""

    key = "refine"

    mask_provider: str = setting("auto", "mask provider (auto = sam / mobile_sam given sam_checkpoint, else superpixel)",
                                 choices=lambda: registry.MASK_PROVIDERS.names)
    sam_checkpoint: str = setting("", "segment-anything / MobileSAM checkpoint path; \"\" = none")
    sam_model_type: str = setting("vit_b", "SAM architecture (vit_t = MobileSAM)",
                                  choices=("vit_b", "vit_l", "vit_h", "vit_t"))
    sam_every_k_frames: int = setting(5, "run SAM / MobileSAM on every k-th adapted frame (they are slow)", min=1)
    sam_points_per_side: int = setting(16, "SAM automatic mask generator grid", min=1)
    superpixel_scale: float = setting(200.0, "Felzenszwalb scale", gt=0.0)
    superpixel_sigma: float = setting(0.8, "Felzenszwalb Gaussian pre-smoothing sigma", unit="px", min=0.0)
    superpixel_min_size: int = setting(200, "Felzenszwalb minimum segment size", unit="px", min=1)
    slic_segments: int = setting(150, "SLIC: approximate number of segments per image", min=1)
    slic_compactness: float = setting(10.0, "SLIC: colour vs. space trade-off (higher: squarer segments)", gt=0.0)
    accumulate_scans: int = setting(0, "refine with the last k scans brought into the current one through "
                                    "odometry (Frame.pose); 0 = the current scan alone", min=0, max=100)
    accumulate_voxel_m: float = setting(0.1, "voxel size that thins the accumulated scans", unit="m",
                                        min=0.0, max=10.0)
    mla_min_points: int = setting(10, "MLA: a mask needs at least this many points (|P_k|)", min=1)
    mla_min_labeled: int = setting(3, "MLA: ... and this many pseudo-labeled points (|L_k|)", min=1)
    mla_purity: float = setting(0.8, "MLA: share of the majority label among the labeled points", min=0.0, max=1.0)
    mla_representativity: float = setting(0.2, "MLA: labeled points / all points of the mask", min=0.0, max=1.0)
    mla_max_area: float = setting(0.25, "MLA: largest share of the image a kept mask may cover", min=0.0, max=1.0)
    gapp_max_rounds: int = setting(10, "GAPP: propagation rounds at most", min=1)
    gapp_radius_m: float = setting(0.3, "GAPP: r = max(radius_m, radius_beams * range * vertical resolution)",
                                   unit="m", gt=0.0)
    gapp_radius_beams: float = setting(3.0, "GAPP: beams in the range-dependent radius", min=0.0)
    gapp_depth_abs_m: float = setting(0.5, "GAPP: depth gate = max(depth_abs_m, depth_rel * depth)",
                                      unit="m", min=0.0)
    gapp_depth_rel: float = setting(0.05, "GAPP: relative part of the depth gate", min=0.0, max=1.0)
    protect_confident: bool = setting(True, "never overwrite a point's own confident pseudo-label")

    def check(self) -> None:
        if self.mask_provider in ("sam", "mobile_sam") and not self.sam_checkpoint:
            raise ConfigError(f"refine.mask_provider {self.mask_provider} needs refine.sam_checkpoint "
                              "(no SAM weights are bundled); use auto or superpixel without one")
        if self.sam_checkpoint and self.mask_provider != "superpixel" and not Path(self.sam_checkpoint).expanduser().is_file():
            raise ConfigError(f"refine.sam_checkpoint {self.sam_checkpoint} does not exist")


@dataclass
class ConnectivityConfig(Section):
    """Connectivity noise filter (METHODS.md section 2)."""

    key = "connectivity"

    buffer_frames: int = setting(50, "frames of component losses in the sliding buffer", min=1)
    min_components: int = setting(20, "below this many components: median rule instead of the mixture", min=1)
    clean_posterior: float = setting(0.5, "a component is clean if its low-loss posterior >= this", min=0.0, max=1.0)


@dataclass
class AdaptConfig(Section):
    """Online adaptation (METHODS.md sections 3-5) and the adaptation thread."""

    key = "adapt"

    method: str = setting("full", "adaptation method (source = no adaptation)",
                          choices=lambda: registry.METHODS.names)
    disable: list[str] = setting([], "components of full to switch off (the ablation)",
                                 items=registry.COMPONENTS)
    enable: list[str] = setting([], "components of full that are off by default to switch on: "
                                + ", ".join(registry.OFF_BY_DEFAULT), items=registry.OFF_BY_DEFAULT)
    trainable: str = setting("norm", "student parameters that adapt (norm = normalisation layers, norm_heads = "
                             "those and the classifier heads)", choices=registry.TRAINABLE)
    optimizer: str = setting("adam", "optimizer of the student", choices=registry.OPTIMIZERS)
    lr: float = setting(1e-3, "learning rate of the student's normalisation parameters (Adam: 1e-3 as TENT, CoTTA)",
                        gt=0.0, max=10.0)
    other_lr_scale: float = setting(0.1, "learning rate of the other trainable parameters, relative to lr",
                                    min=0.0, max=10.0)
    deploy: str = setting("teacher", "network handed to the backend (full; tent and pl deploy their adapted network)",
                          choices=("teacher", "student"))
    precision: str = setting("auto", "arithmetic of adaptation forwards and backwards: bf16 autocast (same mIoU, "
                             "about half the time where the CPU has AVX512-BF16 / AMX or the GPU bf16) or fp32; "
                             "auto = bf16 where the hardware has it", choices=("auto", "fp32", "bf16"))
    steps_per_frame: int = setting(1, "adaptation steps per new frame (lockstep replay; the step budget of every "
                                   "method)", min=1, max=1000)
    every_n_frames: int = setting(1, "lockstep replay: adapt on every n-th frame only (the others are labelled and "
                                  "scored, not adapted on), as a node that cannot keep up drops frames", min=1, max=1000)
    batch_frames: int = setting(1, "frames per step: the newest and batch_frames - 1 from the memory", min=1, max=64)
    memory_frames: int = setting(32, "target-frame memory: frames kept for later steps (0 = none)", min=0, max=10000)
    memory_mb: float = setting(512.0, "target-frame memory: size bound", unit="MB", gt=0.0)
    memory_refresh_steps: int = setting(10, "re-label the memory with the teacher every n steps (0 = never)",
                                        min=0)
    memory_steps_per_frame: int = setting(0, "realtime: steps on memory frames alone while no new frame waits, "
                                          "at most this many per new frame (0 = none)", min=0, max=1000)
    buffer_frames: int = setting(4, "bounded drop-oldest buffer between inference and adaptation", min=1)
    swap_every_steps: int = setting(5, "hand the teacher to the inference backend every m steps", min=1)
    teacher_momentum: float = setting(0.999, "EMA momentum of the teacher per step", min=0.0, max=1.0)
    reliable_confidence: float = setting(0.9, "reliable point: teacher probability >= this ...", min=0.0, max=1.0)
    reliable_variance: float = setting(0.05, "... and teacher/student variance <= this", min=0.0, max=1.0)
    weight_ce: float = setting(1.0, "weight of the cross-entropy on the reliable pseudo-labels (full)", min=0.0,
                               max=100.0)
    ce_class_balanced: bool = setting(False, "weight the cross-entropy's classes by 1 / log(1.2 + their share of "
                                      "the pseudo-labels) (ENet, as source training)")
    negative_max_prob: float = setting(0.2, "negative learning: class probability at most this", min=0.0, max=1.0)
    negative_rounds: int = setting(1, "negative classes per point per frame", min=1)
    weight_negative: float = setting(0.1, "weight of the negative learning loss", min=0.0, max=100.0)
    weight_erda: float = setting(0.1, "weight of the ERDA soft loss", min=0.0, max=100.0)
    erda_tau: float = setting(1.0, "ERDA temperature of the prototype softmax", gt=0.0, max=100.0)
    erda_lambda: float = setting(1.0, "ERDA entropy weight (1 = cross-entropy with the soft label)",
                                 min=0.0, max=100.0)
    prototype_momentum: float = setting(0.999, "EMA momentum of the class prototypes", min=0.0, max=1.0)
    weight_xm: float = setting(0.1, "weight of the cross-modal consistency loss", min=0.0, max=100.0)
    weight_entropy: float = setting(1.0, "weight of full's entropy term (adapt.entropy_of)",
                                    min=0.0, max=100.0)
    entropy_of: str = setting("fused", "full's entropy term: the entropy of the fused prediction (TENT's) or the "
                              "mean of each branch's own", choices=("fused", "branches"))
    entropy_margin: float = setting(0.0, "the fused entropy term (tent, full): only points with entropy below this x ln C, "
                                    "weighted exp(margin ln C - entropy) (EATA's reliable entropy; 0 = all points, "
                                    "TENT's)", min=0.0, max=1.0)
    restore_prob: float = setting(0.01, "stochastic restore: per-element probability per step", min=0.0, max=1.0)
    fusion_beta: float = setting(3.0, "shift-aware fusion: branch log-weight per unit of BN-statistics shift",
                                 min=0.0, max=1000.0)
    fusion_reference: bool = setting(False, "shift-aware fusion: each branch's log-weight from its shift in excess "
                                     "of the source data's own (adapt.gate_reference frames), not the raw shift: a "
                                     "branch trained on other data (an imported image network) is not held down on "
                                     "clean target frames")
    loss_fusion: str = setting("deployed", "full's fused prediction in the loss terms: the fusion inference deploys "
                               "(with the shift and consistency terms), or the branches' plain product (tent's): "
                               "a branch the shift term holds down then still gets the full entropy gradient",
                               choices=("deployed", "plain"))
    fusion_consistency: float = setting(0.0, "full's fusion: branch log-weight per unit of log temporal consistency "
                                        "of its labels (adapt/consistency.py; needs odometry; 0 = off)",
                                        min=0.0, max=1000.0)
    consistency_voxel_m: float = setting(0.3, "temporal consistency: voxel edge that matches a point to the previous "
                                         "scan's, metres", gt=0.0, max=10.0)
    fusion_momentum: float = setting(0.9, "shift-aware fusion: smoothing of the branch shifts over frames",
                                     min=0.0, max=1.0)
    shift_reset_min_jump: float = setting(0.08, "domain-change reset: smallest jump of a branch's shift that counts",
                                          gt=0.0, max=100.0)
    shift_reset_min_ratio: float = setting(0.5, "domain-change reset: ... and smallest jump relative to the shift level",
                                           min=0.0, max=1.0)
    gate_full_ratio: float = setting(3.0, "shift gate: a branch's shift, relative to the source data's, from which "
                                     "it learns at the full rate (at 1x it does not learn)", gt=1.0, max=1000.0)
    gate_statistics: bool = setting(False, "shift gate: scale each branch's BN running-statistics momentum by "
                                    "its gate too (gate 0: the statistics stay the source's)")
    gate_reference: str = setting("", "shift gate and fusion_reference: frames of the model's training data that "
                                  "give the source data's shift (as runtime.int8_calibration); \"\" = "
                                  "runtime.int8_calibration")
    gate_reference_frames: int = setting(16, "shift gate and fusion_reference: frames of gate_reference measured (once, when full is "
                                         "built; scenes alone vary the shift, so not few)", min=1, max=1000)
    bn_prior_steps: float = setting(0.0, "BN running statistics of the student: a cumulative average of its batch "
                                    "statistics since the source, with the source's counted as this many steps "
                                    "(momentum 1 / (prior + n + 1), DUA-like; 0 = BN's own momentum)",
                                    min=0.0, max=1e6)
    bn_momentum_floor: float = setting(0.02, "... the cumulative average's momentum never below this (a "
                                       "domain the change reset missed is still followed)", min=0.0, max=1.0)
    select_margin: float = setting(0.02, "source selection (component select): lead of the source's smoothed "
                                   "cross-modal agreement over the adapted network's that serves the source",
                                   min=0.0, max=1.0)
    select_momentum: float = setting(0.7, "source selection: smoothing of each network's agreement over adapted "
                                     "frames", min=0.0, max=1.0)
    collapse_window: int = setting(20, "collapse guard window", unit="frames", min=1)
    collapse_max_class_share: float = setting(0.95, "collapse: share of the most frequent predicted class above this",
                                              min=0.0, max=1.0)
    collapse_max_disagreement: float = setting(1.0, "collapse: disagreement with the frozen source model above this "
                                               "(1 = never: where the source is the worse model, as in the sim "
                                               "mixed domain, the adapted one disagrees with it by 0.6 without any "
                                               "collapse)", min=0.0, max=1.0)
    checkpoint_every_steps: int = setting(100, "periodic checkpoint of the adapted teacher every n steps", min=1)
    checkpoint_path: str = setting("", "adapted checkpoint (periodic, at shutdown, ~/save_checkpoint); \"\" = none")
    resume: str = setting("source", "start from the source, or from the adapted checkpoint_path when it exists",
                          choices=("source", "adapted"))

    def check(self) -> None:
        if (self.disable or self.enable) and self.method != "full":
            raise ConfigError(f"adapt.disable / adapt.enable apply to adapt.method full only, not {self.method}")
        both = sorted(set(self.enable) & set(self.disable))
        if both:
            raise ConfigError(f"adapt.enable and adapt.disable both name {', '.join(both)}")
        if self.method == "full" and not any(self.enabled(c) for c in registry.LOSS_COMPONENTS):
            raise ConfigError(f"adapt.method full with no loss term: keep one of {', '.join(registry.LOSS_COMPONENTS)} "
                              f"(on: {', '.join(self.components()) or 'none'})")

    def enabled(self, component: str) -> bool:
        """Whether a component of ``full`` is on (always False for the other methods): on by
        default unless in registry.OFF_BY_DEFAULT, then ``enable`` and ``disable`` change it."""
        if self.method != "full" or component in self.disable:
            return False
        return component not in registry.OFF_BY_DEFAULT or component in self.enable

    def components(self) -> list[str]:
        """The components of ``full`` that are on, in registry order."""
        return [c for c in registry.COMPONENTS if self.enabled(c)]


@dataclass
class RuntimeConfig(Section):
    """Inference backend, and the CPU split between inference and adaptation."""

    key = "runtime"

    backend: str = setting("onnxruntime", "inference backend", choices=lambda: registry.BACKENDS.names)
    precision: str = setting("auto", "auto = tensorrt fp16, onnxruntime int8, torch fp32; fp16 / fp32: TensorRT's "
                             "engine (the CPU backends run fp32); int8: onnxruntime's calibrated QDQ graph",
                             choices=registry.PRECISIONS)
    int8_calibration: str = setting("sim:source", "int8 calibration frames, of the model's training data: "
                                    "sim:PRESET (simulated drive) or bags / KITTI sequences, comma-separated")
    int8_calibration_frames: int = setting(4, "frames of int8_calibration measured for the activation ranges "
                                           "(once at start-up; weight swaps keep them)", min=1, max=1000)
    model: str = setting("", "checkpoint (.safetensors); \"\" = the bundled model (launch argument model:=)")
    fusion: str = setting("product", "how the branches' per-point class probabilities combine in view, at inference "
                          "and in adaptation: product (renormalised product: both branches must allow a class) or "
                          "entropy (Latte's certainty-weighted mixture)", choices=registry.FUSION_RULES)
    device: str = setting("", "torch backend device: cpu | cuda | cuda:N; \"\" = cuda when available")
    engine_cache_dir: str = setting("", "TensorRT engine cache; \"\" = the user's cache directory")
    force_rebuild: bool = setting(False, "rebuild the TensorRT engine even when a cached one fits")
    threads: int = setting(0, "inference CPU threads; 0 = all (less adapt_threads when adapt_nice is 0)",
                           min=0, max=1024)
    adapt_threads: int = setting(1, "torch intra-op threads of the adaptation thread", min=1, max=1024)
    adapt_nice: int = setting(10, "nice increment of the adaptation threads (Linux, 0-19): inference first",
                              min=0, max=19)

    def check(self) -> None:
        dev = self.device
        if dev and not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"runtime.device must be cpu, cuda or cuda:N (or empty), got {dev!r}")


@dataclass
class TopicsConfig(Section):
    """Input topics; relative names resolve in the node's namespace (remap them in launch)."""

    key = "topics"

    image: str = setting("~/input/image", "sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, mono16)")
    camera_info: str = setting("~/input/camera_info", "sensor_msgs/CameraInfo of that image")
    pointcloud: str = setting("~/input/pointcloud", "sensor_msgs/PointCloud2 with x, y, z and an intensity field")

    def check(self) -> None:
        for name in ("image", "camera_info", "pointcloud"):
            if not getattr(self, name).strip():
                raise ConfigError(f"topics.{name} must not be empty")


@dataclass
class FramesConfig(Section):
    """LiDAR -> camera extrinsics: tf2 (default) or a fixed matrix; the odometry frame."""

    key = "frames"

    static_extrinsics: list[float] = setting([], "16 numbers, row-major 4x4 T_cam_lidar (LiDAR -> camera optical); "
                                             "[] = tf2", lengths=(0, 16))
    camera_frame: str = setting("", "camera optical frame for tf2; \"\" = the CameraInfo's header.frame_id")
    lidar_frame: str = setting("", "LiDAR frame for tf2; \"\" = the cloud's header.frame_id")
    tf_retry_s: float = setting(1.0, "period of the tf2 lookup until the transform is found", unit="s",
                                gt=0.0, max=3600.0)
    odom_frame: str = setting(ODOM_FRAME, "odometry frame: T_odom_lidar looked up in tf2 at each cloud's "
                              "stamp (never waiting; a frame without it has no pose); \"\" = no odometry")

    def check(self) -> None:
        if self.static_extrinsics:
            from pl3d_ros.frame import FrameError, check_rigid

            try:
                check_rigid(self.static_extrinsics, "frames.static_extrinsics")
            except FrameError as exc:
                raise ConfigError(str(exc)) from exc


@dataclass
class QosConfig(Section):
    """QoS presets: sensor_data | best_effort (BEST_EFFORT) or reliable (RELIABLE); VOLATILE, KEEP_LAST."""

    key = "qos"

    input: str = setting("sensor_data", "QoS of the three inputs (sensor_data matches both kinds of publisher)",
                         choices=registry.QOS_PRESETS)
    input_depth: int = setting(5, "history depth of each input", min=1, max=10000)
    output: str = setting("reliable", "QoS of the output clouds (rviz/pl3d.rviz subscribes reliable)",
                          choices=registry.QOS_PRESETS)
    output_depth: int = setting(1, "history depth of each output", min=1, max=10000)


@dataclass
class NodeConfig(Section):
    """Processing budget, diagnostics, debug topics, shutdown."""

    key = "node"

    max_allowed_processing_time_ms: float = setting(100.0, "diagnostics WARN when a frame takes longer",
                                                    unit="ms", gt=0.0)
    max_acceptable_consecutive_delay_ms: float = setting(1000.0, "diagnostics ERROR when over budget this long",
                                                         unit="ms", gt=0.0)
    diagnostics_period_s: float = setting(1.0, "period of /diagnostics", unit="s", gt=0.0, max=3600.0)
    stats_window: int = setting(100, "frames behind the mean and p90 processing time", min=1, max=100000)
    debug_topics: bool = setting(True, "publish ~/debug/processing_time/*_ms, pipeline_latency_ms, cyclic_time_ms")
    intensity_field: str = setting("", "cloud field read as intensity; \"\" = intensity, i or reflectivity")
    stop_timeout_s: float = setting(5.0, "bound on stopping the inference and adaptation threads at shutdown",
                                    unit="s", gt=0.0, max=3600.0)


@dataclass
class Config(Root):
    """The settings the node and the offline tools run with; leaves = the node's ROS parameters."""

    class_set: str = setting("", "class set the checkpoint must have (xmuda10, semantickitti19 or a class-set "
                             "YAML path); \"\" = the checkpoint's", choices=("", "xmuda10", "semantickitti19"),
                             open_choices=True)
    sync: SyncConfig = section()
    pseudo_labels: PseudoLabelConfig = section()
    refine: RefineConfig = section()
    connectivity: ConnectivityConfig = section()
    adapt: AdaptConfig = section()
    runtime: RuntimeConfig = section()
    topics: TopicsConfig = section()
    frames: FramesConfig = section()
    qos: QosConfig = section()
    node: NodeConfig = section()

    def check(self) -> None:
        if self.class_set:
            _check_class_set(self.class_set, "class_set")


def _check_class_set(name: str, key: str) -> None:
    from pl3d_ros.labels import available_class_sets

    if name not in available_class_sets() and not Path(name).expanduser().is_file():
        raise ConfigError(f"{key} {name!r} unknown; available: {available_class_sets()} or a class-set YAML path")
