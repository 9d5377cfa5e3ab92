"""Shift-gated learning rates: each branch adapts in proportion to how far its input moved from
the source's own data.

Why: where a branch's BN input statistics are those of the source data, the entropy term has
nothing to repair in that branch and only drifts it away from a source that fits. In the
continual drive's ``layout`` domain (a new street layout, the same sensors) the source model is
at its best and ``full`` fell up to 7 points below it (README, continual stream); in ``night`` the
LiDAR input is the source's. Measured on the bundled model (BranchShift's per-frame KL, mean of
12 frames of each sim domain, image / range): source data 0.015 / 0.048, layout 0.037 / 0.057,
night 0.163 / 0.048, sensor 0.023 / 0.319, fog 0.496 / 0.172, mixed 0.179 / 0.295.

The gate of branch b is clip((shift_b / reference_b - 1) / (full_ratio - 1), 0, 1): 0 up to the
source data's own shift (the reference: a high quantile of it, measured once on frames of the
model's training data), 1 from ``full_ratio`` times it on. It scales the learning rate of that
branch's parameters; the BN running statistics still follow the target (what repairs a shifted
input is left alone) unless ``adapt.gate_statistics`` scales their momentum too.

Off by default (registry.OFF_BY_DEFAULT): on the real grid (imported 3D-MiniNet + ESPNetv2) it
costs 2.8 fused mIoU. The image branch's BN statistics are Cityscapes', so clean KITTI already
reads 0.33-0.37 and night lower than clean, and the range branch, gated to 0.14-0.67 under the
LiDAR shifts, then misses the adaptation that gives ``full`` its gain (README, shift gate).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from pl3d_ros.adapt.fusion import BRANCHES, BranchShift

#: The reference is this quantile of the per-frame shifts on the source data, not their mean:
#: scenes alone move a frame's shift by up to 10x there (bundled model, 24 sim:source frames:
#: image 0.006-0.082, range 0.027-0.081), so a target frame only counts as shifted once it is
#: beyond what most source frames show.
REFERENCE_QUANTILE = 0.9


@torch.no_grad()
def reference_shift(model: nn.Module, feeds: Iterable[Mapping[str, np.ndarray]]) -> torch.Tensor:
    """(image, range) shift (2,) of ``model`` (the frozen source, eval mode) on its own data: the
    REFERENCE_QUANTILE of the per-frame BranchShift over ``feeds`` ({"image" (1, 3, H, W),
    "range_image" (1, C, h, w)} float32). ValueError when no feed gives a shift (no feeds, or a branch without BN)."""
    shift = BranchShift(model, 0.0)
    frames = []
    dev = next(model.parameters()).device
    for feed in feeds:
        with shift:
            # copies: cached calibration feeds are read-only arrays
            model.forward_features(torch.tensor(feed["image"], device=dev),
                                   torch.tensor(feed["range_image"], device=dev))
        value = shift.frame_shift()
        if value is not None:
            frames.append(value.float().cpu())
    if not frames:
        raise ValueError("shift gate: no reference shift measured (no reference frames, or a branch without BatchNorm)")
    return torch.quantile(torch.stack(frames), REFERENCE_QUANTILE, dim=0)


class ShiftGate:
    """Learning-rate gains (2,) of the image and range branches from their smoothed shift.

    reference: the source data's (image, range) shift (2,), > 0. full_ratio: the shift, relative
    to the reference, at which a branch learns at the full rate (> 1).
    """

    def __init__(self, reference: torch.Tensor, full_ratio: float = 3.0) -> None:
        if float(full_ratio) <= 1.0:
            raise ValueError(f"shift gate: full_ratio must be > 1, got {full_ratio}")
        self.reference = reference.detach().float().cpu().clamp_min(1e-6)
        self.full_ratio = float(full_ratio)

    def gains(self, shift: torch.Tensor | None) -> dict[str, float]:
        """{"image": g, "range": g}, each in [0, 1]; all 1 before the first measured frame."""
        if shift is None:
            return dict.fromkeys(BRANCHES, 1.0)
        ratio = shift.detach().float().cpu() / self.reference
        g = ((ratio - 1.0) / (self.full_ratio - 1.0)).clamp(0.0, 1.0)
        return {b: float(g[i]) for i, b in enumerate(BRANCHES)}
