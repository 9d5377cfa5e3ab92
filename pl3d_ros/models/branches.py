"""The two branches: an image U-Net and a range-image U-Net, each with a per-pixel class head.

Both normalise their raw input inside the network, so a runtime feeds plain float32 tensors:
the image as RGB in [0, 1], the range image as metric channels (range, x, y, z in metres,
intensity) with zeros in empty cells.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pl3d_ros.models.blocks import UNet

if TYPE_CHECKING:
    from pl3d_ros.models.checkpoint import CheckpointHeader

IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: a convention, not a trained value
IMAGE_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of KITTI HDL-64 scans (RangeNet++'s arch_cfg): range, x, y, z, intensity.
RANGE_MEAN = (12.12, 10.88, 0.23, -1.04, 0.21)
RANGE_STD = (12.32, 11.47, 6.91, 0.86, 0.16)


class _Branch(nn.Module):
    """Normalise, U-Net, 1x1 classifier. (B, Cin, H, W) -> logits (B, C, H, W), features (B, F, H, W)."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int],
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.unet = UNet(in_channels, widths)
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.feature_dim = widths[0]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.unet(self.normalise(x))
        return self.head(features), features


class ImageBranch(_Branch):
    """(B, 3, H, W) RGB in [0, 1] -> logits (B, C, H, W), features (B, F, H, W)."""

    def __init__(self, num_classes: int, widths: list[int]) -> None:
        super().__init__(3, num_classes, widths, IMAGE_MEAN, IMAGE_STD)


class RangeBranch(_Branch):
    """(B, 5, rows, cols) range, x, y, z, intensity -> logits (B, C, rows, cols), features.

    Empty cells (range 0) are zeroed after normalisation, so "no return" reads as one value
    whatever the channel statistics.
    """

    def __init__(self, num_classes: int, widths: list[int]) -> None:
        super().__init__(5, num_classes, widths, RANGE_MEAN, RANGE_STD)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        occupied = (x[:, :1] > 0).to(x.dtype)
        return super().normalise(x) * occupied


class UNetArch:
    """The ``unet`` architecture of one branch (registry.IMAGE_BRANCHES / RANGE_BRANCHES): sized
    by ``model.image_widths`` / ``range_widths``, which ModelConfig.check validates; it has no
    entry in the header's ``branches``."""

    imported = False

    def __init__(self, kind: str, branch: type[_Branch]) -> None:
        self.kind, self.branch = kind, branch

    def check(self, header: CheckpointHeader) -> None:
        """Nothing beyond ModelConfig.check / check_sensor."""

    def build(self, header: CheckpointHeader) -> _Branch:
        return self.branch(header.class_set.num_classes, list(getattr(header.model, f"{self.kind}_widths")))


UNetImage = UNetArch("image", ImageBranch)
UNetRange = UNetArch("range", RangeBranch)
