"""The two-stream network: image branch + range branch, built from a ModelConfig (unet branches)
or from a checkpoint header (any registered branch architecture)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pl3d_ros import registry
from pl3d_ros.config import ModelConfig
from pl3d_ros.models.branches import ImageBranch, RangeBranch

if TYPE_CHECKING:
    from pl3d_ros.models.checkpoint import CheckpointHeader


class TwoStreamNet(nn.Module):
    """Image branch and range branch side by side; no cross-talk until per-point fusion.

    forward(image (B, 3, Hi, Wi) RGB in [0, 1], range_image (B, 5, rows, cols))
        -> logits_2d (B, C, Hi, Wi), logits_3d (B, C, rows, cols), C = the target classes
    forward_features additionally returns both branches' features (B, F, ...) (the image
    features may be coarser than the image: points.sample_pixels handles that).

    A branch is any module mapping its input to (target-class logits, features) with a
    ``feature_dim``; without one given, the unet branch of ``cfg`` is built.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, image: nn.Module | None = None,
                 range_branch: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.image = image if image is not None else ImageBranch(num_classes, list(cfg.image_widths))
        self.range = range_branch if range_branch is not None else RangeBranch(num_classes, list(cfg.range_widths))

    def forward_features(self, image: torch.Tensor, range_image: torch.Tensor):
        logits_2d, feat_2d = self.image(image)
        logits_3d, feat_3d = self.range(range_image)
        return logits_2d, logits_3d, feat_2d, feat_3d

    def forward(self, image: torch.Tensor, range_image: torch.Tensor):
        logits_2d, logits_3d, _, _ = self.forward_features(image, range_image)
        return logits_2d, logits_3d


def build_model(cfg: ModelConfig, num_classes: int) -> TwoStreamNet:
    """A freshly initialised unet two-stream network in eval mode (what ``pl3d train`` trains)."""
    if cfg.image_arch != "unet" or cfg.range_arch != "unet":
        raise ValueError(f"build_model makes unet branches; a {cfg.image_arch} / {cfg.range_arch} "
                         "network is built from its checkpoint header (build_from_header)")
    return TwoStreamNet(cfg, num_classes).eval()


def build_from_header(header: CheckpointHeader) -> TwoStreamNet:
    """The network a (validated) checkpoint header describes, with initial weights, in eval mode."""
    m = header.model
    image = registry.IMAGE_BRANCHES.get(m.image_arch).build(header)
    range_branch = registry.RANGE_BRANCHES.get(m.range_arch).build(header)
    return TwoStreamNet(m, header.class_set.num_classes, image, range_branch).eval()
