"""ERDA class prototypes (METHODS.md section 3.1).

A prototype is the EMA (momentum 0.999) of the mean L2-normalised student feature over the
reliable points of its class. A class's prototype is initialised from the frozen source model's
features (mean normalised feature of the points the source predicts as that class) on the first
frame where the source predicts the class; until then it does not exist and gets probability 0
in ERDA's soft label.

Feature choice: one bank per branch. The 3D bank holds range-branch features gathered at every
point's range cell; the 2D bank holds image-branch features bilinearly sampled at the in-view
points' pixels. ERDA is applied to each branch with its own bank (the 3D loss on all points, the
2D loss on in-view points), the same per-branch pattern as the cross-entropy terms. Mixing the
branches into one feature would tie the prototype dimension to both branches' widths (they may
differ) and give out-of-view points a different feature space from in-view ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean L2-normalised feature per class.

    features: (N, F); labels: (N,) int64, -1 ignored -> (means (C, F), counts (C,) int64).
    Classes without points have a zero mean.
    """
    keep = labels >= 0
    f = F.normalize(features[keep].detach().float(), dim=1)
    lab = labels[keep]
    sums = torch.zeros(num_classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, lab, f)
    counts = torch.bincount(lab, minlength=num_classes)
    means = sums / counts.clamp_min(1)[:, None].to(f.dtype)
    return means, counts


class PrototypeBank:
    """(C, F) prototypes of one branch with an ``initialised`` (C,) bool mask."""

    def __init__(self, num_classes: int, dim: int, momentum: float, device: torch.device | str = "cpu") -> None:
        self.num_classes = int(num_classes)
        self.momentum = float(momentum)
        self.vectors = torch.zeros(num_classes, dim, device=device)
        self.initialised = torch.zeros(num_classes, dtype=torch.bool, device=device)

    def reset(self) -> None:
        """Forget everything: prototypes are re-initialised from the source on later frames."""
        self.vectors.zero_()
        self.initialised.zero_()

    @property
    def ready(self) -> bool:
        return bool(self.initialised.any())

    def init_missing(self, source_features: torch.Tensor, source_labels: torch.Tensor) -> int:
        """Initialise the classes that have no prototype yet and that occur in ``source_labels``.

        source_features: (N, F) source-model features; source_labels: (N,) int64 source
        predictions (-1 ignored) -> number of classes initialised now.
        """
        means, counts = class_means(source_features, source_labels, self.num_classes)
        new = (counts > 0) & ~self.initialised
        self.vectors[new] = means[new]
        self.initialised |= new
        return int(new.sum())

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA step with student features (N, F) over reliable points with classes (N,) (-1 not
        reliable): v_c <- m v_c + (1 - m) mean_i normalise(f_i), for initialised classes present."""
        means, counts = class_means(features, labels, self.num_classes)
        upd = (counts > 0) & self.initialised
        m = self.momentum
        self.vectors[upd] = m * self.vectors[upd] + (1.0 - m) * means[upd]
