"""Building blocks shared by both branches: conv-BN-ReLU, residual blocks, a small U-Net.

Everything here exports to ONNX opset 17 and builds in TensorRT 10 with static shapes: plain 3x3
convolutions, BatchNorm (folded into the convolution by both exporters), ReLU, strided
downsampling and nearest-neighbour x2 upsampling (no size-dependent interpolation arguments).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3x3 (or k x k) convolution, BatchNorm, ReLU. (B, cin, H, W) -> (B, cout, H/s, W/s)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN with an identity (or strided 1x1) shortcut. (B, cin, H, W) -> (B, cout, H/s, W/s)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class UpBlock(nn.Module):
    """x2 nearest upsampling, concatenation with the skip, conv-BN-ReLU.

    (B, cin, H, W) + skip (B, cskip, 2H, 2W) -> (B, cout, 2H, 2W).
    """

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = ConvBNReLU(cin + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Encoder-decoder with skips. Each encoder stage halves H and W.

    Input (B, in_channels, H, W) with H and W divisible by 2**(len(widths)-1); output features
    (B, widths[0], H, W) at full resolution.
    """

    def __init__(self, in_channels: int, widths: list[int], blocks_per_stage: int = 1) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"a U-Net needs at least 2 stage widths, got {widths}")
        self.stem = nn.Sequential(ConvBNReLU(in_channels, widths[0]), ResidualBlock(widths[0], widths[0]))
        self.down = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            stage = [ResidualBlock(cin, cout, stride=2)]
            stage += [ResidualBlock(cout, cout) for _ in range(blocks_per_stage - 1)]
            self.down.append(nn.Sequential(*stage))
        rev = widths[::-1]
        self.up = nn.ModuleList(UpBlock(cin, cskip, cskip) for cin, cskip in zip(rev[:-1], rev[1:]))
        self.divisor = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        y = skips.pop()
        for block in self.up:
            y = block(y, skips.pop())
        return y
