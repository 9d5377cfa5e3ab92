"""ESPNetv2 semantic segmentation (Mehta et al., CVPR 2019), written to load sacmehta/EdgeNets'
Cityscapes state dict (``espnetv2_s_2.0_city_1024x512.pth``) strictly. Parameter names follow
EdgeNets (``model/segmentation/espnetv2.py`` on ``model/classification/espnetv2.py``).

Structure at scale s = 2.0 (channels 32, 128, 256, 512; 4 parallel branches per EESP block):

* encoder ``base_net``: ``level1`` 3x3 stride-2 CBR (H/2); ``level2_0``, ``level3_0``, ``level4_0``
  stride-2 down-samplers (H/4, H/8, H/16: average pool || strided EESP, plus an "input
  reinforcement" path from the average-pooled RGB image); ``level3`` 3 and ``level4`` 7 EESP blocks.
  (The classification ``level5`` is not part of the segmentation network.)
* decoder: an efficient pyramid pooling module (EPP, pyramid scales 2, 1.5, 1, 0.5, 0.1) at H/16,
  then three times: bilinear x2, add the encoder level through a gated group conv
  (``merge_enc_dec_l*``), BN + PReLU, EPP. The last EPP (``bu_dec_l4``, at H/2) ends in the 1x1
  classifier; its output is bilinearly resized to the input size.

Input normalisation (EdgeNets ``transforms/segmentation/data_transforms.Normalize``): RGB scaled to
[0, 1], then ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225). Cityscapes images
(2048 x 1024) were resized to 1024 x 512 (PIL bilinear) for training and evaluation. ``ESPNetv2``
takes RGB in [0, 1] and normalises inside, like the project's image branch.

Exports to ONNX with static shapes: adaptive average pooling to sizes that do not divide the input
(EPP scales 1.5 and 0.1) is written as fixed gathers + weighted sums instead of
``adaptive_avg_pool2d``, which ONNX only has for output size 1.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pl3d_ros.models.pretrained import PretrainedError, load_strict, read_state_dict

__all__ = [
    "CITYSCAPES_CLASSES",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SIZE_MULTIPLE",
    "ESPNetv2",
    "load_espnetv2",
    "scale_of",
]

#: Output channels of EdgeNets' segmentation ESPNetv2 on Cityscapes, in order (19 + background).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle", "background",
)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
#: Input height and width must be multiples of this (four stride-2 levels whose decoder adds
#: each x2-upsampled level to the one above it).
SIZE_MULTIPLE = 16

#: EdgeNets' espnetv2_config: channels per level by scale s, EESP repeats, receptive-field limits.
CHANNELS = {0.5: (16, 32, 64, 128), 1.0: (32, 64, 128, 256), 1.25: (32, 80, 160, 320),
            1.5: (32, 96, 192, 384), 2.0: (32, 128, 256, 512)}
REPEATS = (3, 7)  # EESP blocks at level 3 and level 4
RECEPTIVE_LIMIT = (13, 11, 9, 7)
BRANCHES = 4
REINFORCE_CHANNELS = 3
DECODER_BASE = 16  # dec_feat_dict['city']
PYRAMID_SCALES = (2.0, 1.5, 1.0, 0.5, 0.1)


# -- layers with EdgeNets' two naming schemes -------------------------------------------------


class CBR(nn.Module):
    """Conv + BN + PReLU as attributes ``conv`` / ``bn`` / ``act`` (EdgeNets nn_layers/espnet_utils)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class CB(nn.Module):
    """Conv + BN (``conv`` / ``bn``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BR(nn.Module):
    """BN + PReLU (``bn`` / ``act``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class DilatedConv(nn.Module):
    """Depthwise 3x3 conv at a dilation, attribute ``conv`` (EdgeNets ``CDilated``)."""

    def __init__(self, c: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride, dilation, dilation=dilation, groups=c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SeqCBR(nn.Module):
    """Conv + BN + PReLU as ``cbr.0`` / ``cbr.1`` / ``cbr.2`` (EdgeNets nn_layers/cnn_utils)."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1) -> None:
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, bias=False, groups=groups),
                                 nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr(x)


class SeqBR(nn.Module):
    """BN + PReLU as ``br.0`` / ``br.1``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(c), nn.PReLU(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.br(x)


class ChannelShuffle(nn.Module):
    """(B, g * c, H, W) -> channels reordered c-major (ShuffleNet shuffle), no parameters."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# -- encoder ------------------------------------------------------------------------------------


class EESP(nn.Module):
    """Extremely efficient spatial pyramid block: (B, Cin, H, W) -> (B, Cout, H/stride, W/stride).

    Group 1x1 reduce to Cout/k channels, k depthwise 3x3 branches at growing dilation (capped by
    the receptive-field limit), hierarchical sums, BN-PReLU, group 1x1 expand, residual + PReLU
    (no activation when it down-samples: ``DownSampler`` applies it).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = BRANCHES, r_lim: int = 7,
                 downsample: bool = False) -> None:
        super().__init__()
        n = cout // k
        if n * k != cout:
            raise ValueError(f"EESP output {cout} must be divisible by {k} branches")
        self.stride, self.downsample = stride, downsample
        self.proj_1x1 = CBR(cin, n, 1, groups=k)
        # kernel size 3 + 2i as a dilated 3x3; beyond the limit fall back to 3x3 (dilation 1);
        # sorted so equal receptive fields sit first (EdgeNets).
        sizes = sorted(3 + 2 * i if 3 + 2 * i <= r_lim else 3 for i in range(k))
        self.spp_dw = nn.ModuleList(DilatedConv(n, stride, (s - 1) // 2) for s in sizes)
        self.conv_1x1_exp = CB(cout, cout, 1, groups=k)
        self.br_after_cat = BR(cout)
        self.module_act = nn.PReLU(cout)
        self.residual = cin == cout and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.proj_1x1(x)
        outs = [self.spp_dw[0](reduced)]
        for branch in self.spp_dw[1:]:
            outs.append(branch(reduced) + outs[-1])  # hierarchical feature fusion
        expanded = self.conv_1x1_exp(self.br_after_cat(torch.cat(outs, 1)))
        if self.downsample:
            return expanded
        if self.residual:
            expanded = expanded + x
        return self.module_act(expanded)


class DownSampler(nn.Module):
    """(B, Cin, H, W), image (B, 3, H0, W0) -> (B, Cout, ceil(H/2), ceil(W/2)).

    concat(avg-pool 3x3 s2, EESP s2) + 3x3/1x1 conv of the image average-pooled down to the same
    size (EdgeNets' input reinforcement), PReLU.
    """

    def __init__(self, cin: int, cout: int, k: int = BRANCHES, r_lim: int = 9) -> None:
        super().__init__()
        self.eesp = EESP(cin, cout - cin, stride=2, k=k, r_lim=r_lim, downsample=True)
        self.avg = nn.AvgPool2d(kernel_size=3, padding=1, stride=2)
        self.inp_reinf = nn.Sequential(CBR(REINFORCE_CHANNELS, REINFORCE_CHANNELS, 3),
                                       CB(REINFORCE_CHANNELS, cout, 1))
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        pooled = self.avg(x)
        out = torch.cat([pooled, self.eesp(x)], 1)
        target = pooled.shape[2]
        # Pool the image (3x3 s2, zero padding counted, as F.avg_pool2d's default) until its
        # height matches: a fixed number of steps for a given input size, unrolled when traced.
        for _ in range(16):
            image = F.avg_pool2d(image, kernel_size=3, padding=1, stride=2)
            if image.shape[2] == target:
                break
        else:
            raise ValueError(f"cannot pool the image down to height {target}")
        return self.act(out + self.inp_reinf(image))


class EESPNetEncoder(nn.Module):
    """ESPNetv2 encoder levels 1-4 (EdgeNets ``EESPNet`` without level 5 / classifier).

    forward(image (B, 3, H, W) normalised) -> [l1 (B, c0, H/2), l2 (B, c1, H/4), l3 (B, c2, H/8),
    l4 (B, c3, H/16)] (sizes rounded up).
    """

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        if scale not in CHANNELS:
            raise PretrainedError(f"ESPNetv2 scale s={scale} unknown; known: {sorted(CHANNELS)}")
        c = CHANNELS[scale]
        self.level1 = CBR(3, c[0], 3, 2)
        self.level2_0 = DownSampler(c[0], c[1], r_lim=RECEPTIVE_LIMIT[0])
        self.level3_0 = DownSampler(c[1], c[2], r_lim=RECEPTIVE_LIMIT[1])
        self.level3 = nn.ModuleList(EESP(c[2], c[2], r_lim=RECEPTIVE_LIMIT[2]) for _ in range(REPEATS[0]))
        self.level4_0 = DownSampler(c[2], c[3], r_lim=RECEPTIVE_LIMIT[2])
        self.level4 = nn.ModuleList(EESP(c[3], c[3], r_lim=RECEPTIVE_LIMIT[3]) for _ in range(REPEATS[1]))
        self.channels = c

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        l1 = self.level1(image)
        l2 = self.level2_0(l1, image)
        l3 = self.level3_0(l2, image)
        for block in self.level3:
            l3 = block(l3)
        l4 = self.level4_0(l3, image)
        for block in self.level4:
            l4 = block(l4)
        return [l1, l2, l3, l4]


# -- decoder ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _pool_taps(n_in: int, n_out: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """Adaptive-average-pool bins of one axis as K taps: index[k][i], weight[k][i].

    Output i averages input [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)), torch's
    adaptive_avg_pool definition; bins shorter than K get zero-weight taps.
    """
    starts = [(i * n_in) // n_out for i in range(n_out)]
    ends = [-((-(i + 1) * n_in) // n_out) for i in range(n_out)]
    k = max(e - s for s, e in zip(starts, ends))
    index = tuple(tuple(min(s + j, n_in - 1) for s in starts) for j in range(k))
    weight = tuple(tuple((1.0 / (e - s)) if s + j < e else 0.0 for s, e in zip(starts, ends)) for j in range(k))
    return index, weight


def _pool_axis(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    n_in = x.shape[dim]
    if n_in == n_out:
        return x
    if n_in % n_out == 0:  # equal bins: a plain average pool (ONNX AveragePool)
        r = n_in // n_out
        kernel = (r, 1) if dim == 2 else (1, r)
        return F.avg_pool2d(x, kernel, kernel)
    index, weight = _pool_taps(n_in, n_out)
    shape = [1, 1, 1, 1]
    shape[dim] = n_out
    out = None
    for idx, w in zip(index, weight):
        tap = x.index_select(dim, torch.tensor(idx, device=x.device))
        tap = tap * torch.tensor(w, dtype=x.dtype, device=x.device).view(shape)
        out = tap if out is None else out + tap
    return out


def adaptive_avg_pool2d(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` for a static output size, as separable fixed gathers and sums.

    (B, C, H, W) -> (B, C, h, w); equal to torch's result up to float rounding. Bins are
    rectangles of one row range by one column range, so pooling rows then columns is exact.
    """
    return _pool_axis(_pool_axis(x, 2, size[0]), 3, size[1])


class EfficientPyramidPool(nn.Module):
    """EdgeNets' EPP: (B, Cin, H, W) -> (B, Cout, H, W).

    1x1 CBR to P channels; at each scale s a depthwise 3x3 on the map resized to ceil(s H) x
    ceil(s W) (at least 5 x 5; bilinear up for s > 1 then adaptive-average back, adaptive-average
    down for s < 1 then bilinear back); concat, BN-PReLU, channel shuffle, grouped 3x3 CBR to P,
    1x1 conv to Cout (+ BN-PReLU unless it is the classifier, which has a bias instead).
    """

    def __init__(self, cin: int, proj: int, cout: int, last_layer_br: bool = True) -> None:
        super().__init__()
        self.scales = PYRAMID_SCALES
        self.projection_layer = SeqCBR(cin, proj, 1)
        self.stages = nn.ModuleList(nn.Conv2d(proj, proj, 3, 1, 1, bias=False, groups=proj) for _ in self.scales)
        n = proj * len(self.scales)
        self.merge_layer = nn.Sequential(SeqBR(n), ChannelShuffle(len(self.scales)),
                                         SeqCBR(n, proj, 3, groups=proj),
                                         nn.Conv2d(proj, cout, 1, bias=not last_layer_br))
        self.last_layer_br = last_layer_br
        if last_layer_br:
            self.br = SeqBR(cout)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output (B, Cout, H, W), the merged P-channel map before the last 1x1 conv)."""
        x = self.projection_layer(x)
        h, w = x.shape[2], x.shape[3]
        branches = []
        for scale, stage in zip(self.scales, self.stages):
            hs, ws = max(int(math.ceil(h * scale)), 5), max(int(math.ceil(w * scale)), 5)
            if scale < 1.0:
                y = stage(adaptive_avg_pool2d(x, (hs, ws)))
                y = F.interpolate(y, (h, w), mode="bilinear", align_corners=True)
            elif scale > 1.0:
                y = stage(F.interpolate(x, (hs, ws), mode="bilinear", align_corners=True))
                y = adaptive_avg_pool2d(y, (h, w))
            else:
                y = stage(x)
            branches.append(y)
        merged = self.merge_layer[:3](torch.cat(branches, 1))
        out = self.merge_layer[3](merged)
        return (self.br(out) if self.last_layer_br else out), merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


class GatedMerge(nn.Module):
    """EdgeNets' EfficientPWConv: (B, Cin, H, W) -> (B, Cout, H, W), a group 3x3 CBR scaled by a
    per-channel sigmoid gate of the global average."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.wt_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.Sigmoid())
        self.expansion_layer = SeqCBR(cin, cout, 3, groups=math.gcd(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class ESPNetv2(nn.Module):
    """ESPNetv2 segmentation on RGB in [0, 1].

    forward(image (B, 3, H, W)) -> logits (B, num_classes, H, W), H and W multiples of
    ``SIZE_MULTIPLE``. forward_features also returns the decoder feature map that enters the last
    pyramid-pool / classifier stage: (B, 2 * 16 = 32, H/2, W/2) (stride 2).
    """

    def __init__(self, num_classes: int = 20, scale: float = 2.0,
                 class_names: tuple[str, ...] | None = None,
                 mean: tuple[float, ...] = IMAGE_MEAN, std: tuple[float, ...] = IMAGE_STD) -> None:
        super().__init__()
        self.num_classes, self.scale = num_classes, scale
        self.class_names = tuple(class_names) if class_names else tuple(f"class{i}" for i in range(num_classes))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.base_net = EESPNetEncoder(scale)
        c = self.base_net.channels
        dec = (4 * DECODER_BASE, 3 * DECODER_BASE, 2 * DECODER_BASE)
        proj = min(num_classes // 2, DECODER_BASE)
        self.bu_dec_l1 = EfficientPyramidPool(c[3], proj, dec[0])
        self.bu_dec_l2 = EfficientPyramidPool(dec[0], proj, dec[1])
        self.bu_dec_l3 = EfficientPyramidPool(dec[1], proj, dec[2])
        self.bu_dec_l4 = EfficientPyramidPool(dec[2], proj, num_classes, last_layer_br=False)
        self.merge_enc_dec_l2 = GatedMerge(c[2], dec[0])
        self.merge_enc_dec_l3 = GatedMerge(c[1], dec[1])
        self.merge_enc_dec_l4 = GatedMerge(c[0], dec[2])
        self.bu_br_l2 = nn.Sequential(nn.BatchNorm2d(dec[0]), nn.PReLU(dec[0]))
        self.bu_br_l3 = nn.Sequential(nn.BatchNorm2d(dec[1]), nn.PReLU(dec[1]))
        self.bu_br_l4 = nn.Sequential(nn.BatchNorm2d(dec[2]), nn.PReLU(dec[2]))
        self.feature_dim, self.feature_stride = dec[2], 2

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std

    def forward_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = image.shape
        if c != 3 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"image must be (B, 3, H, W) with H, W multiples of {SIZE_MULTIPLE}, "
                             f"got {tuple(image.shape)}")
        l1, l2, l3, l4 = self.base_net(self.normalise(image))
        x = _up2(self.bu_dec_l1(l4))
        x = self.bu_dec_l2(self.bu_br_l2(x + self.merge_enc_dec_l2(l3)))
        x = _up2(x)
        x = self.bu_dec_l3(self.bu_br_l3(x + self.merge_enc_dec_l3(l2)))
        x = _up2(x)
        features = self.bu_br_l4(x + self.merge_enc_dec_l4(l1))
        logits = F.interpolate(self.bu_dec_l4(features), (h, w), mode="bilinear", align_corners=True)
        return logits, features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_features(image)[0]


def scale_of(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> float:
    """The width s of an EdgeNets ESPNetv2 state dict, from its level-4 channels (unique per s)."""
    key = "base_net.level4_0.act.weight"
    if key not in state_dict:
        raise PretrainedError(f"{source}: no {key}; not an EdgeNets ESPNetv2 segmentation state dict")
    channels = int(state_dict[key].shape[0])
    by_channels = {c[3]: s for s, c in CHANNELS.items()}
    if channels not in by_channels:
        raise PretrainedError(f"{source}: level 4 has {channels} channels; known ESPNetv2 widths: "
                              + ", ".join(f"s={s} ({c[3]})" for s, c in CHANNELS.items()))
    return by_channels[channels]


def load_espnetv2(path: str | Path, scale: float | None = None, num_classes: int | None = None,
                  class_names: tuple[str, ...] = CITYSCAPES_CLASSES) -> ESPNetv2:
    """An ESPNetv2 from an EdgeNets segmentation state dict, loaded strictly, in eval mode.

    Args:
        path: e.g. ``espnetv2_s_2.0_city_1024x512.pth`` (a plain tensor state dict).
        scale: the network width s (default: read from the file, ``scale_of``).
        num_classes: outputs; default: from the classifier's weight in the file.
        class_names: names of the outputs (default: Cityscapes' 19 + background).

    Raises:
        PretrainedError: unreadable / not a tensor state dict, or it does not fit.
    """
    sd = read_state_dict(path)
    if scale is None:
        scale = scale_of(sd, str(path))
    key = "bu_dec_l4.merge_layer.3.weight"
    if num_classes is None:
        if key not in sd:
            raise PretrainedError(f"{path}: no {key}; not an EdgeNets ESPNetv2 segmentation state dict")
        num_classes = int(sd[key].shape[0])
    if len(class_names) != num_classes:
        raise PretrainedError(f"{path}: {num_classes} outputs but {len(class_names)} class names")
    model = ESPNetv2(num_classes, scale, class_names)
    load_strict(model, sd, str(path))
    return model.eval()
