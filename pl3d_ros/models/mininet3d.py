"""3D-MiniNet (Alonso et al., IROS 2020 / RA-L): a range-image LiDAR segmenter in the
lidar-bonnetal layout, written to load the released ``backbone`` / ``segmentation_decoder`` /
``segmentation_head`` state dicts strictly.

Architecture, as in the paper and Shathe/3D-MiniNet's PyTorch code (parameter names match it):

1. Point grouping (``group_points``, upstream does it in its data loader). The H x W range image
   is cut into non-overlapping 4 x 4 cells, P = (H/4)(W/4) groups of N = 16 points each, groups
   in row-major order, points in row-major order inside a group. Each point gets 11 features:
   its 5 normalised channels (range, x, y, z, remission), its 5 raw channels minus the mean over
   the group's valid points, and the Euclidean norm of the relative x, y, z. Empty cells are 0 in
   all 11 features (normalised channels are zeroed after normalisation).
2. Projection module (``ProjectionModule``, upstream ``moduleProyection``): on the (B, 11, 16, P)
   groups, a local branch (four 1x1 conv-BN-ReLU, max over the 16 points), a spatial branch (one
   16 x 1 convolution over each group), and a context branch: the second local layer max-pooled
   per group, laid out as the (H/4, W/4) grid, each group joined by its 3 x 3 neighbour groups at
   dilations 1, 2 and 3 (zero padding), 1x1 conv-BN-ReLU, max over the 9. Concatenated, scaled
   by a channel attention (global average, 1x1 conv, sigmoid), 1x1 conv-BN-ReLU to F channels.
3. Backbone: ``enc1`` (depthwise 3x3 stride 2 + pointwise on the normalised image, the H/2 skip),
   ``enc2`` (``block_1`` ERS blocks on the projection, H/4), ``enc3`` (stride-2 downsample +
   ``block_2`` multi-dilation ERS blocks, H/8).
4. Decoder: bilinear x2 (align_corners=True) + skip, ERS blocks, twice, then x2 to H x W.
5. Head: 3x3 conv to the classes (20 for SemanticKITTI: index 0 is "unlabeled").

Input of ``MiniNet3D.forward``: the raw (B, 5, H, W) range image of ``pl3d_ros.geometry``
(range, x, y, z in metres, remission; 0 in empty cells); normalisation and grouping happen inside
the network so a runtime feeds the same tensor as for the project's own range branch.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pl3d_ros.config import RangeImageConfig
from pl3d_ros.models.pretrained import PretrainedError, load_strict, read_state_dict

__all__ = [
    "ARCH_FILE",
    "DATA_FILE",
    "WEIGHT_FILES",
    "KnnParams",
    "MiniNet3D",
    "MiniNet3DConfig",
    "RangeInputSpec",
    "blocks_in_weights",
    "group_points",
    "load_mininet3d",
    "read_lidar_bonnetal_weights",
]

ARCH_FILE = "arch_cfg.yaml"
DATA_FILE = "data_cfg.yaml"
#: lidar-bonnetal file name -> the MiniNet3D sub-module it fills.
WEIGHT_FILES = {"backbone": "backbone", "segmentation_decoder": "decoder", "segmentation_head": "head"}
#: Side of the square point group (paper: N = 16 points = 4 x 4 range-image cells).
GROUP = 4
#: The published variants, by backbone features_bottleneck (their block counts in arch_cfg.yaml do
#: not always match the released weights, see ``load_mininet3d``).
VARIANTS = {96: "tiny", 128: "small", 192: "full"}
CHANNELS = ("range", "x", "y", "z", "remission")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RangeInputSpec:
    """How the network's range image is made (``dataset.sensor`` of arch_cfg.yaml).

    rows x cols spherical image spanning [fov_down_deg, fov_up_deg] vertically (RangeNet++
    projection, as ``pl3d_ros.geometry.range_projection``); channels ``CHANNELS`` normalised as
    (x - mean) / std per channel, empty cells 0 after normalisation (done inside the network).

    Upstream's LaserScan differs from ``pl3d_ros.geometry`` only in rounding and edge cases, none
    of which changes the accuracy measurably (bench/pretrained_check.py --projection upstream):
    float32 angles (0.006 % of KITTI points land in a neighbouring cell), an unstable nearest-point
    tie-break, the cell won by point 0 treated as empty (its ``proj_idx > 0`` test), and a total
    fov of |fov_up| + |fov_down| (equal to fov_up - fov_down only when fov_down <= 0 <= fov_up).
    """

    sensor: str
    rows: int
    cols: int
    fov_up_deg: float
    fov_down_deg: float
    means: tuple[float, float, float, float, float]
    stds: tuple[float, float, float, float, float]
    channels: tuple[str, ...] = CHANNELS

    def range_image_config(self) -> RangeImageConfig:
        """The project's geometry settings for this sensor."""
        return RangeImageConfig(rows=self.rows, cols=self.cols, fov_up_deg=self.fov_up_deg,
                                fov_down_deg=self.fov_down_deg)

    @classmethod
    def from_arch_cfg(cls, arch: dict[str, Any], source: str = ARCH_FILE) -> RangeInputSpec:
        try:
            s = arch["dataset"]["sensor"]
            spec = cls(
                sensor=str(s.get("name", "unknown")),
                rows=int(s["img_prop"]["height"]),
                cols=int(s["img_prop"]["width"]),
                fov_up_deg=float(s["fov_up"]),
                fov_down_deg=float(s["fov_down"]),
                means=tuple(float(v) for v in s["img_means"]),
                stds=tuple(float(v) for v in s["img_stds"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PretrainedError(f"{source}: dataset.sensor is incomplete ({exc!r})") from exc
        if len(spec.means) != 5 or len(spec.stds) != 5 or min(spec.stds) <= 0:
            raise PretrainedError(f"{source}: img_means/img_stds need 5 values (stds > 0): "
                                  f"{spec.means}, {spec.stds}")
        if spec.rows % (2 * GROUP) or spec.cols % (2 * GROUP):
            raise PretrainedError(f"{source}: 3D-MiniNet needs height and width divisible by "
                                  f"{2 * GROUP}, got {spec.rows}x{spec.cols}")
        if not spec.fov_down_deg < spec.fov_up_deg:
            raise PretrainedError(f"{source}: fov_down {spec.fov_down_deg} >= fov_up {spec.fov_up_deg}")
        return spec


@dataclass(frozen=True)
class KnnParams:
    """lidar-bonnetal's KNN post-processing settings (``post.KNN`` of arch_cfg.yaml)."""

    use: bool
    knn: int = 5
    search: int = 5
    sigma: float = 1.0
    cutoff: float = 1.0

    @classmethod
    def from_arch_cfg(cls, arch: dict[str, Any]) -> KnnParams:
        knn = (arch.get("post") or {}).get("KNN") or {}
        p = knn.get("params") or {}
        return cls(use=bool(knn.get("use", False)), knn=int(p.get("knn", 5)),
                   search=int(p.get("search", 5)), sigma=float(p.get("sigma", 1.0)),
                   cutoff=float(p.get("cutoff", 1.0)))


@dataclass(frozen=True)
class MiniNet3DConfig:
    """Network sizes (``backbone`` / ``decoder`` of arch_cfg.yaml) and the number of classes."""

    features: int = 96  # backbone.features_bottleneck F
    enc_blocks_1: int = 6  # backbone.block_1: ERS blocks at H/4
    enc_blocks_2: int = 5  # backbone.block_2: multi-dilation ERS blocks at H/8
    dec_features: int = 96  # decoder.features_bottleneck (must equal F: skips are added)
    dec_blocks_1: int = 2  # decoder.block_1: blocks at H/4
    dec_blocks_2: int = 1  # decoder.block_2: blocks at H/2
    num_classes: int = 20

    @property
    def variant(self) -> str:
        """"tiny", "small", "full" for the published sizes, else "custom"."""
        return VARIANTS.get(self.features, "custom")

    @property
    def feature_dim(self) -> int:
        """Channels of the decoder output (the features before the head)."""
        return self.dec_features // 2

    def validate(self) -> None:
        if self.features % 8 or self.features <= 0:
            raise PretrainedError(f"features_bottleneck must be a positive multiple of 8, got {self.features}")
        if self.dec_features != self.features:
            raise PretrainedError(f"decoder.features_bottleneck ({self.dec_features}) must equal the "
                                  f"backbone's ({self.features}): the decoder adds the encoder skips")
        if min(self.enc_blocks_1, self.enc_blocks_2, self.dec_blocks_1, self.dec_blocks_2) < 1:
            raise PretrainedError("block_1 / block_2 of backbone and decoder must be >= 1")

    @classmethod
    def from_arch_cfg(cls, arch: dict[str, Any], num_classes: int, source: str = ARCH_FILE) -> MiniNet3DConfig:
        try:
            bb, dec = arch["backbone"], arch["decoder"]
            name = str(bb.get("name", "3dmininet"))
            if not name.startswith("3dmininet"):  # before the sizes: other backbones have others
                raise PretrainedError(f"{source}: backbone {name!r} is not 3D-MiniNet")
            depth = bb.get("input_depth", {})
            cfg = cls(features=int(bb["features_bottleneck"]), enc_blocks_1=int(bb["block_1"]),
                      enc_blocks_2=int(bb["block_2"]), dec_features=int(dec["features_bottleneck"]),
                      dec_blocks_1=int(dec["block_1"]), dec_blocks_2=int(dec["block_2"]),
                      num_classes=int(num_classes))
            os_ = int(bb.get("OS", 16))
        except (KeyError, TypeError, ValueError) as exc:
            raise PretrainedError(f"{source}: backbone/decoder settings incomplete ({exc!r})") from exc
        # Upstream's data loader always builds all 11 point features; other flags cannot run there.
        if not all(bool(depth.get(k, True)) for k in ("range", "xyz", "remission")):
            raise PretrainedError(f"{source}: 3D-MiniNet needs input_depth range, xyz and remission all True")
        # OS 16 and 8 give the same network (stride 16 is never reached); smaller ones change
        # enc3's stride, which upstream's decoder cannot undo.
        if os_ not in (8, 16):
            raise PretrainedError(f"{source}: backbone OS {os_} is not supported (8 or 16)")
        cfg.validate()
        return cfg


# -- building blocks (upstream names: conv1 / conv2 / pointwise / bn1 / bn2 / bn) -------------


class ERS(nn.Module):
    """Depthwise 3x3 + pointwise conv (upstream ``moduleERS``): (B, Cin, H, W) -> (B, Cout, H, W).

    Residual after the activation when Cin == Cout, as upstream.
    """

    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-3)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu1 = nn.LeakyReLU(0.1)
        self.relu2 = nn.LeakyReLU(0.1)
        self.dropout = nn.Dropout2d(dropout)
        self.residual = cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.pointwise(self.relu1(self.bn1(self.conv1(inputs)))))
        x = self.relu2(self.dropout(x))
        return x + inputs if self.residual else x


class ERSMultiDilation(nn.Module):
    """ERS with a second, dilated depthwise branch summed in (upstream ``moduleERS_muldil``).

    dilation: (along rows, along columns) of the second branch; (B, Cin, H, W) -> (B, Cout, H, W).
    """

    def __init__(self, cin: int, cout: int, dilation: tuple[int, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.conv2 = nn.Conv2d(cin, cin, 3, 1, dilation, dilation, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-3)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-3)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.relu1 = nn.LeakyReLU(0.1)
        self.relu2 = nn.LeakyReLU(0.1)
        self.relu3 = nn.LeakyReLU(0.1)
        self.dropout = nn.Dropout2d(dropout)
        self.residual = cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(inputs))) + self.relu2(self.bn2(self.conv2(inputs)))
        x = self.relu3(self.dropout(self.bn(self.pointwise(x))))
        return x + inputs if self.residual else x


class ERSBlock(nn.Module):
    """Two ERS modules (upstream ``BasicBlock``); (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = ERS(cin, cin, dropout)
        self.conv2 = ERS(cin, cout, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ERSMultiBlock(nn.Module):
    """Two multi-dilation ERS modules, the second at twice the dilation (upstream ``BasicBlock_mul``)."""

    def __init__(self, cin: int, cout: int, dilation: tuple[int, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = ERSMultiDilation(cin, cin, dilation, dropout)
        self.conv2 = ERSMultiDilation(cin, cout, (2 * dilation[0], 2 * dilation[1]), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class _HalfBlock(nn.Module):
    """One ERS module under the name ``conv1`` (upstream decoder ``BasicBlock_half``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ERS(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


def _conv_bn_relu(cin: int, cout: int, kernel: tuple[int, int] | int = 1) -> tuple[nn.Module, nn.Module, nn.Module]:
    return nn.Conv2d(cin, cout, kernel, bias=False), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU()


def _downsample(cin: int, cout: int, suffix: str) -> list[tuple[str, nn.Module]]:
    """Depthwise 3x3 stride 2 + pointwise, BN (default eps, as upstream) + LeakyReLU after each."""
    return [
        (f"conv{suffix}", nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)),
        (f"bn{suffix}", nn.BatchNorm2d(cin, momentum=0.1)),
        (f"relu{suffix}", nn.LeakyReLU(0.1)),
        ("conv01", nn.Conv2d(cin, cout, 1, bias=False)),
        ("bn01", nn.BatchNorm2d(cout, momentum=0.1)),
        ("relu01", nn.LeakyReLU(0.1)),
    ]


def enc3_dilations(blocks: int) -> list[tuple[int, int]]:
    """Dilations (rows, cols) of enc3's blocks: column dilation 1, 4, then back to 1, as upstream
    (x4 per block, reset to (1, 1) once above 8)."""
    out, dil = [], (1, 1)
    for _ in range(blocks):
        out.append(dil)
        dil = (dil[0], dil[1] * 4)
        if dil[1] > 8:
            dil = (1, 1)
    return out


# -- point grouping and the projection module --------------------------------------------------


def group_points(range_image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network input of upstream's data loader, built from a raw range image.

    Args:
        range_image: (B, 5, H, W) range, x, y, z (m), remission of the winning point per cell;
            a cell is empty where range <= 0 (its channels are ignored; upstream's mask is the
            same except for its point-0 cell).
        mean, std: (1, 5, 1, 1) channel statistics.

    Returns:
        normalised: (B, 5, H, W) (x - mean) / std, 0 in empty cells (enc1's input).
        points: (B, 11, 16, P), P = (H/4)(W/4) groups in row-major order, 16 points per group in
            row-major order (identical to ``F.unfold(kernel_size=4, stride=4)``): 5 normalised
            channels, 5 raw channels minus the group mean over its valid points, norm of the
            relative x, y, z; all 0 for empty cells.
    """
    b, c, h, w = range_image.shape
    if c != 5 or h % GROUP or w % GROUP:
        raise ValueError(f"range image must be (B, 5, H, W) with H, W divisible by {GROUP}, got {tuple(range_image.shape)}")
    mask = (range_image[:, :1] > 0).to(range_image.dtype)
    raw = range_image * mask
    normalised = (raw - mean) / std * mask

    def blocks(x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, 16, P): a reshape, not im2col, so ONNX sees Reshape/Transpose.
        ch = x.shape[1]
        x = x.reshape(b, ch, h // GROUP, GROUP, w // GROUP, GROUP).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, ch, GROUP * GROUP, (h // GROUP) * (w // GROUP))

    raw_g, mask_g = blocks(raw), blocks(mask)
    count = mask_g.sum(dim=2, keepdim=True)
    # Empty groups: sum is 0 there, so clamping the count gives upstream's NaN -> 0 mean.
    centre = raw_g.sum(dim=2, keepdim=True) / count.clamp_min(1.0)
    relative = (raw_g - centre) * mask_g
    distance = torch.sqrt((relative[:, 1:4] * relative[:, 1:4]).sum(dim=1, keepdim=True))
    points = torch.cat([blocks(normalised), relative, distance], dim=1)
    return normalised, points


class ProjectionModule(nn.Module):
    """3D-MiniNet's learned 2D projection (upstream ``moduleProyection``).

    forward(points (B, 11, 16, P), grid (h, w) with h * w = P) -> (B, F, h, w).
    """

    def __init__(self, cin: int, features: int, neighbours: int = GROUP * GROUP) -> None:
        super().__init__()
        c = [features // 8, features // 4, features // 2, features]
        self.neighbours = neighbours
        self.conv_fc1, self.bn1, self.relu1 = _conv_bn_relu(cin, c[0])
        self.conv_fc2, self.bn2, self.relu2 = _conv_bn_relu(c[0], c[1])
        self.conv_fc3, self.bn3, self.relu3 = _conv_bn_relu(c[1], c[2])
        self.conv_fc4, self.bn4, self.relu4 = _conv_bn_relu(c[2], c[3])
        self.conv_fc_context_1, self.bn_context_1, self.relu_context_1 = _conv_bn_relu(c[1], c[2])
        self.conv_fc_context_2, self.bn_context_2, self.relu_context_2 = _conv_bn_relu(c[1], c[1])
        self.conv_fc_context_3, self.bn_context_3, self.relu_context_3 = _conv_bn_relu(c[1], c[1])
        self.conv, self.bn_conv, self.relu_conv = _conv_bn_relu(cin, features, (neighbours, 1))
        fused = c[3] + features + c[2] + 2 * c[1]  # local + spatial + context = 3F
        self.conv_atten = nn.Conv2d(fused, fused, 1, bias=True)
        self.conv_out, self.bn_out, self.relu_out = _conv_bn_relu(fused, features)

    def _context(self, grid: torch.Tensor, dilation: int, conv: nn.Module, bn: nn.Module,
                 relu: nn.Module) -> torch.Tensor:
        """(B, C, h, w) -> (B, C', h, w): each group with its 3x3 neighbours at ``dilation``
        (zero padding, as ``F.unfold(padding=dilation)``), conv-BN-ReLU, max over the 9."""
        b, c, h, w = grid.shape
        d = dilation
        padded = F.pad(grid, (d, d, d, d))
        shifted = [padded[:, :, i * d: i * d + h, j * d: j * d + w] for i in range(3) for j in range(3)]
        x = torch.stack(shifted, dim=2).reshape(b, c, 9, h * w)
        x = relu(bn(conv(x))).amax(dim=2)
        return x.reshape(b, -1, h, w)

    def forward(self, points: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, n, p = points.shape
        h, w = grid
        if n != self.neighbours or h * w != p:
            raise ValueError(f"points must be (B, 11, {self.neighbours}, {h * w}), got {tuple(points.shape)}")
        x = self.relu1(self.bn1(self.conv_fc1(points)))
        x2 = self.relu2(self.bn2(self.conv_fc2(x)))
        x = self.relu3(self.bn3(self.conv_fc3(x2)))
        local = self.relu4(self.bn4(self.conv_fc4(x))).amax(dim=2)  # (B, F, P)

        ctx = x2.amax(dim=2).reshape(b, -1, h, w)  # (B, F/4, h, w)
        context = torch.cat([
            self._context(ctx, 1, self.conv_fc_context_1, self.bn_context_1, self.relu_context_1),
            self._context(ctx, 2, self.conv_fc_context_2, self.bn_context_2, self.relu_context_2),
            self._context(ctx, 3, self.conv_fc_context_3, self.bn_context_3, self.relu_context_3),
        ], dim=1)

        spatial = self.relu_conv(self.bn_conv(self.conv(points)))[:, :, 0]  # (B, F, P)
        x = torch.cat([local, spatial], dim=1).reshape(b, -1, h, w)
        x = torch.cat([x, context], dim=1)  # (B, 3F, h, w)
        x = x * torch.sigmoid(self.conv_atten(x.mean(dim=(2, 3), keepdim=True)))
        return self.relu_out(self.bn_out(self.conv_out(x)))


# -- backbone, decoder, network ---------------------------------------------------------------


class Backbone(nn.Module):
    """forward(normalised (B, 5, H, W), points (B, 11, 16, P)) -> (B, F, H/8, W/8), skips
    {2: (B, F, H/2, W/2), 4: (B, F, H/4, W/4)}."""

    def __init__(self, cfg: MiniNet3DConfig) -> None:
        super().__init__()
        f = cfg.features
        self.proj = ProjectionModule(11, f)
        self.enc1 = nn.Sequential(OrderedDict(_downsample(5, f, "0")))
        self.enc2 = nn.Sequential(OrderedDict(
            (f"residual_{i}", ERSBlock(f, f, dropout=0.25)) for i in range(cfg.enc_blocks_1)))
        self.enc3 = nn.Sequential(OrderedDict(_downsample(f, f, "00") + [
            (f"residual_{i}", ERSMultiBlock(f, f, d, dropout=0.25))
            for i, d in enumerate(enc3_dilations(cfg.enc_blocks_2))]))

    def forward(self, normalised: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        _, _, h, w = normalised.shape
        skip2 = self.enc1(normalised)
        skip4 = self.enc2(self.proj(points, (h // GROUP, w // GROUP)))
        return self.enc3(skip4), {2: skip2, 4: skip4}


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=True)


class Decoder(nn.Module):
    """forward((B, F, H/8, W/8), skips) -> (B, F/2, H, W)."""

    def __init__(self, cfg: MiniNet3DConfig) -> None:
        super().__init__()
        f, fd = cfg.features, cfg.dec_features

        def stage(cin: int, cout: int, n: int) -> nn.Sequential:
            layers = [("residual", _HalfBlock(cin, cout))]
            layers += [(f"residual{i}", _HalfBlock(cout, cout)) for i in range(n - 1)]
            return nn.Sequential(OrderedDict(layers))

        self.dec4 = stage(f, fd, cfg.dec_blocks_1)
        self.dec3 = stage(fd, fd // 2, cfg.dec_blocks_2)

    def forward(self, x: torch.Tensor, skips: dict[int, torch.Tensor]) -> torch.Tensor:
        x = self.dec4(_up2(x) + skips[4])
        x = self.dec3(_up2(x) + skips[2])
        return _up2(x)


class MiniNet3D(nn.Module):
    """3D-MiniNet on a raw range image.

    forward(range_image (B, 5, H, W)) -> logits (B, num_classes, H, W); with the SemanticKITTI
    weights class 0 is "unlabeled" (``class_names``). forward_features also returns the decoder
    output (B, feature_dim, H, W) (stride 1), the input of the 3x3 head. H and W must equal the
    spec's rows and cols (divisible by 8).

    Sub-modules ``backbone`` / ``decoder`` / ``head`` hold exactly the tensors of the
    lidar-bonnetal files ``backbone`` / ``segmentation_decoder`` / ``segmentation_head``.
    """

    def __init__(self, cfg: MiniNet3DConfig, spec: RangeInputSpec,
                 class_names: tuple[str, ...] | None = None, knn: KnnParams | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.spec = cfg, spec
        self.class_names = tuple(class_names) if class_names else tuple(f"class{i}" for i in range(cfg.num_classes))
        if len(self.class_names) != cfg.num_classes:
            raise PretrainedError(f"{len(self.class_names)} class names for {cfg.num_classes} classes")
        self.knn = knn or KnnParams(use=False)
        self.config_notes: tuple[str, ...] = ()  # where the weights overrode arch_cfg.yaml
        self.register_buffer("mean", torch.tensor(spec.means).view(1, 5, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.stds).view(1, 5, 1, 1), persistent=False)
        self.backbone = Backbone(cfg)
        self.decoder = Decoder(cfg)
        self.head = nn.Sequential(nn.Conv2d(cfg.feature_dim, cfg.num_classes, 3, padding=1))

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    def forward_features(self, range_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, h, w = range_image.shape
        if (h, w) != (self.spec.rows, self.spec.cols):
            raise ValueError(f"range image is {h}x{w}, the network's sensor is {self.spec.rows}x{self.spec.cols}")
        normalised, points = group_points(range_image, self.mean, self.std)
        x, skips = self.backbone(normalised, points)
        features = self.decoder(x, skips)
        return self.head(features), features

    def forward(self, range_image: torch.Tensor) -> torch.Tensor:
        return self.forward_features(range_image)[0]

    def load_lidar_bonnetal(self, weights: dict[str, dict[str, torch.Tensor]], source: str = "") -> None:
        """Fill backbone / decoder / head from ``read_lidar_bonnetal_weights``'s dicts, strictly."""
        for fname, attr in WEIGHT_FILES.items():
            if fname not in weights:
                raise PretrainedError(f"{source}: no {fname} weights")
            load_strict(getattr(self, attr), weights[fname], f"{source}/{fname}" if source else fname)


def read_lidar_bonnetal_weights(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{file name: state dict} of the three weight files of a lidar-bonnetal model folder."""
    folder = Path(folder)
    return {fname: read_state_dict(folder / fname) for fname in WEIGHT_FILES}


def blocks_in_weights(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    """Number of ERS blocks per stage that the weight files hold, by MiniNet3DConfig field."""
    def count(sd: dict[str, torch.Tensor], pattern: str) -> int:
        return len({m.group(1) for k in sd if (m := re.match(pattern, k))})

    bb, dec = weights.get("backbone", {}), weights.get("segmentation_decoder", {})
    return {
        "enc_blocks_1": count(bb, r"enc2\.residual_(\d+)\."),
        "enc_blocks_2": count(bb, r"enc3\.residual_(\d+)\."),
        # decoder blocks are named residual, residual0, residual1, ...
        "dec_blocks_1": count(dec, r"dec4\.residual(\d*)\."),
        "dec_blocks_2": count(dec, r"dec3\.residual(\d*)\."),
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PretrainedError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PretrainedError(f"{path} must hold a mapping")
    return data


def _class_names(data_cfg: dict[str, Any], source: str) -> tuple[str, ...]:
    """Train-id order names from data_cfg.yaml: learning_map_inv (train id -> raw id) + labels."""
    try:
        inv = {int(k): int(v) for k, v in data_cfg["learning_map_inv"].items()}
        labels = {int(k): str(v) for k, v in data_cfg["labels"].items()}
        if sorted(inv) != list(range(len(inv))):
            raise ValueError(f"train ids {sorted(inv)} are not 0..{len(inv) - 1}")
        return tuple(labels[inv[i]] for i in range(len(inv)))
    except (KeyError, TypeError, ValueError) as exc:
        raise PretrainedError(f"{source}: needs learning_map_inv and labels ({exc!r})") from exc


def load_mininet3d(folder: str | Path, *, blocks_from_config: bool = False) -> MiniNet3D:
    """A 3D-MiniNet from a lidar-bonnetal model folder, in eval mode.

    The folder holds ``arch_cfg.yaml`` (sizes, sensor projection, normalisation, KNN settings),
    ``data_cfg.yaml`` (classes: ``learning_map_inv`` + ``labels``) and the weight files
    ``backbone``, ``segmentation_decoder``, ``segmentation_head`` (plain tensor state dicts, read
    with ``weights_only=True`` and loaded strictly).

    Block counts: released arch_cfg.yaml files do not always state the number of ERS blocks the
    weights were trained with (3D-MiniNet-tiny says backbone block_1: 6, its weights and the
    paper's TensorFlow tiny model have 7). Upstream loads with ``strict=False`` and silently drops
    the 7th block. Here the counts come from the weight files, every other size from arch_cfg;
    a disagreement is logged and kept in ``model.config_notes``. ``blocks_from_config=True``
    raises instead.

    Raises:
        PretrainedError: a file is missing or malformed, or the weights do not fit.
    """
    folder = Path(folder)
    arch = _read_yaml(folder / ARCH_FILE)
    names = _class_names(_read_yaml(folder / DATA_FILE), str(folder / DATA_FILE))
    cfg = MiniNet3DConfig.from_arch_cfg(arch, len(names), str(folder / ARCH_FILE))
    spec = RangeInputSpec.from_arch_cfg(arch, str(folder / ARCH_FILE))
    weights = read_lidar_bonnetal_weights(folder)
    notes = []
    for field, n in blocks_in_weights(weights).items():
        if n != getattr(cfg, field):
            notes.append(f"{field}: arch_cfg.yaml says {getattr(cfg, field)}, the weights hold {n}")
    if notes and blocks_from_config:
        raise PretrainedError(f"{folder}: block counts differ from arch_cfg.yaml: " + "; ".join(notes))
    if notes:
        log.warning("%s: using the block counts of the weights (%s)", folder, "; ".join(notes))
        cfg = dataclasses.replace(cfg, **blocks_in_weights(weights))
    model = MiniNet3D(cfg, spec, names, KnnParams.from_arch_cfg(arch))
    model.config_notes = tuple(notes)
    model.load_lidar_bonnetal(weights, str(folder))
    return model.eval()
