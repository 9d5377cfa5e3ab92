"""The two-stream network: image branch + range branch, built from a ModelConfig."""

from __future__ import annotations

import torch
from torch import nn

from pl3d_ros.config import ModelConfig
from pl3d_ros.models.branches import ImageBranch, RangeBranch


class TwoStreamNet(nn.Module):
    """Image branch and range branch side by side; no cross-talk until per-point fusion.

    forward(image (B, 3, Hi, Wi) RGB in [0, 1], range_image (B, 5, rows, cols))
        -> logits_2d (B, C, Hi, Wi), logits_3d (B, C, rows, cols)
    forward_features additionally returns both branches' features (B, F, ...).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.image = ImageBranch(num_classes, list(cfg.image_widths))
        self.range = RangeBranch(num_classes, list(cfg.range_widths))

    def forward_features(self, image: torch.Tensor, range_image: torch.Tensor):
        logits_2d, feat_2d = self.image(image)
        logits_3d, feat_3d = self.range(range_image)
        return logits_2d, logits_3d, feat_2d, feat_3d

    def forward(self, image: torch.Tensor, range_image: torch.Tensor):
        logits_2d, logits_3d, _, _ = self.forward_features(image, range_image)
        return logits_2d, logits_3d


def build_model(cfg: ModelConfig, num_classes: int) -> TwoStreamNet:
    """A freshly initialised network in eval mode."""
    return TwoStreamNet(cfg, num_classes).eval()
