"""Imported (pretrained) branches of the two-stream network, and how a checkpoint header's
``branches`` entry is checked and built for each architecture.

    ImportedBranch(net, class_map): x -> (class_map(net's source logits), net's features)

    ESPNetv2Image   registry.IMAGE_BRANCHES "espnetv2": params {"scale"}; the input image's
                    width and height multiples of 16; RGB in [0, 1] normalised inside
    MiniNet3DRange  registry.RANGE_BRANCHES "mininet3d": params = MiniNet3DConfig's sizes; range
                    image rows and cols multiples of 8; metric channels normalised inside

Both networks take exactly what the runtime feeds the unet branches (``inputs.prepare``), so
every backend, the adapter and the trainer run an imported model unchanged. The class map
(log-sum-exp over each target's source classes, models/class_map.py) sits inside the branch, so
its logits are over the class set's classes like a unet branch's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pl3d_ros.labels import ClassSet
from pl3d_ros.models.class_map import ClassMap
from pl3d_ros.models.espnetv2 import CHANNELS as ESPNET_WIDTHS
from pl3d_ros.models.espnetv2 import SIZE_MULTIPLE, ESPNetv2
from pl3d_ros.models.mininet3d import CHANNELS as RANGE_CHANNELS
from pl3d_ros.models.mininet3d import GROUP, MiniNet3D, MiniNet3DConfig, RangeInputSpec
from pl3d_ros.models.pretrained import PretrainedError

if TYPE_CHECKING:
    from pl3d_ros.models.checkpoint import BranchSpec, CheckpointHeader

__all__ = ["IMAGE_CHANNELS", "MININET_SIZES", "ESPNetv2Image", "ImportedBranch", "MiniNet3DRange"]

#: Channel names of the image input, in order (documentation in the header, checked).
IMAGE_CHANNELS = ("red", "green", "blue")
#: The MiniNet3DConfig fields a header's params hold (num_classes comes from source_classes).
MININET_SIZES = tuple(f.name for f in dataclasses.fields(MiniNet3DConfig) if f.name != "num_classes")


class ImportedBranch(nn.Module):
    """A pretrained network followed by its class map.

    forward(x (B, Cin, H, W)) -> logits (B, T, H, W) over the T target classes, features
    (B, feature_dim, h, w) (the network's own, possibly at a coarser stride).
    """

    def __init__(self, net: nn.Module, class_map: ClassMap) -> None:
        super().__init__()
        self.net = net
        self.class_map = class_map
        self.feature_dim = int(net.feature_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.net.forward_features(x)
        return self.class_map(logits), features


# -- checks shared by the architectures ---------------------------------------------------------


def _params(spec: BranchSpec, kinds: dict[str, type]) -> dict[str, Any]:
    """spec.params with exactly the keys of ``kinds``, each of its type (an int is a float)."""
    p = spec.params
    missing, unknown = [k for k in kinds if k not in p], sorted(set(p) - set(kinds))
    if missing or unknown:
        raise PretrainedError(f"params: missing {missing}, unknown {unknown}; expected {list(kinds)}")
    out = {}
    for key, kind in kinds.items():
        v = p[key]
        ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        if not ok:
            raise PretrainedError(f"params.{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        out[key] = kind(v)
    return out


def _normalisation(spec: BranchSpec, channels: tuple[str, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of spec.normalisation, which must name ``channels`` in order; std > 0."""
    n = spec.normalisation
    if set(n) != {"channels", "mean", "std"}:
        raise PretrainedError(f"normalisation must have exactly channels, mean, std; got {sorted(n)}")
    if list(n["channels"]) != list(channels):
        raise PretrainedError(f"normalisation.channels must be {list(channels)} (the runtime's input "
                              f"order), got {n['channels']}")
    values = []
    for key in ("mean", "std"):
        v = n[key]
        if (not isinstance(v, list) or len(v) != len(channels)
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise PretrainedError(f"normalisation.{key} must be {len(channels)} finite numbers, got {v!r}")
        values.append(tuple(float(x) for x in v))
    if min(values[1]) <= 0:
        raise PretrainedError(f"normalisation.std must be > 0, got {list(values[1])}")
    return values[0], values[1]


def class_map_of(spec: BranchSpec, class_set: ClassSet) -> ClassMap:
    """The ClassMap of a header entry: class_map must list every class of the class set."""
    src = spec.source_classes
    if len(src) < 2 or not all(isinstance(s, str) for s in src) or len(set(src)) != len(src):
        raise PretrainedError(f"source_classes must be >= 2 distinct names, got {src!r:.200}")
    targets = list(class_set.names)
    missing = [t for t in targets if t not in spec.class_map]
    unknown = [t for t in spec.class_map if t not in targets]
    if missing or unknown:
        raise PretrainedError(f"class_map must have one entry per class of {class_set.name}: "
                              f"missing {missing}, unknown {unknown}")
    bad = {t: v for t, v in spec.class_map.items() if not isinstance(v, list)}
    if bad:
        raise PretrainedError(f"class_map entries must be lists of source classes, got {bad}")
    return ClassMap(src, targets, spec.class_map)  # ClassMapError: unknown or doubly mapped sources


# -- the architectures ----------------------------------------------------------------------------


class ESPNetv2Image:
    """``espnetv2`` image branch: EdgeNets' ESPNetv2 segmentation network (models/espnetv2.py)."""

    imported = True

    @staticmethod
    def check(header: CheckpointHeader) -> None:
        spec = header.branches["image"]
        scale = _params(spec, {"scale": float})["scale"]
        if scale not in ESPNET_WIDTHS:
            raise PretrainedError(f"params.scale {scale} is not an ESPNetv2 width ({sorted(ESPNET_WIDTHS)})")
        m = header.model
        if m.image_width % SIZE_MULTIPLE or m.image_height % SIZE_MULTIPLE:
            raise PretrainedError(f"model.image_width/height {m.image_width}x{m.image_height} must be "
                                  f"multiples of {SIZE_MULTIPLE} for ESPNetv2")
        _normalisation(spec, IMAGE_CHANNELS)
        class_map_of(spec, header.class_set)

    @staticmethod
    def build(header: CheckpointHeader) -> ImportedBranch:
        spec = header.branches["image"]
        mean, std = _normalisation(spec, IMAGE_CHANNELS)
        net = ESPNetv2(len(spec.source_classes), _params(spec, {"scale": float})["scale"],
                       tuple(spec.source_classes), mean, std)
        return ImportedBranch(net, class_map_of(spec, header.class_set))


class MiniNet3DRange:
    """``mininet3d`` range branch: 3D-MiniNet in the lidar-bonnetal layout (models/mininet3d.py)."""

    imported = True

    @staticmethod
    def _config(spec: BranchSpec) -> MiniNet3DConfig:
        cfg = MiniNet3DConfig(**_params(spec, {k: int for k in MININET_SIZES}),
                              num_classes=len(spec.source_classes))
        cfg.validate()
        return cfg

    @staticmethod
    def check(header: CheckpointHeader) -> None:
        spec = header.branches["range"]
        MiniNet3DRange._config(spec)
        s = header.sensor
        if s.rows % (2 * GROUP) or s.cols % (2 * GROUP):
            raise PretrainedError(f"sensor.rows/cols {s.rows}x{s.cols} must be multiples of {2 * GROUP} "
                                  "for 3D-MiniNet (4x4 point groups, then one stride-2 stage)")
        _normalisation(spec, RANGE_CHANNELS)
        class_map_of(spec, header.class_set)

    @staticmethod
    def build(header: CheckpointHeader) -> ImportedBranch:
        spec, s = header.branches["range"], header.sensor
        mean, std = _normalisation(spec, RANGE_CHANNELS)
        rspec = RangeInputSpec(str(spec.source.get("sensor", "")), s.rows, s.cols, s.fov_up_deg,
                               s.fov_down_deg, mean, std)
        net = MiniNet3D(MiniNet3DRange._config(spec), rspec, tuple(spec.source_classes))
        return ImportedBranch(net, class_map_of(spec, header.class_set))
