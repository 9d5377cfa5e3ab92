"""Branch reliability per class from cross-modal agreement, tracked online (issue 13 item 5).

Entropy-weighted fusion trusts whichever branch is confident, and under a shift one branch is
often confidently wrong for some classes only: under night ESPNetv2 calls most dark pixels road,
under fog the range branch turns the fog's false returns into one class. Without labels, the
other branch is the reference at hand. For each branch b and class c, the agreement

    r_b(c) = P(the other branch's top class is c | branch b's top class is c)

over the in-view points is an estimate of b's precision for c (noisy: the other branch errs
too). It is not symmetric: a branch that calls everything dark "road" has a low r for road even
when the other branch's road points are all seen as road by it. Counts are decayed over frames
(``momentum``) and shrunk towards the frame's overall agreement (``prior_points`` pseudo-points),
so a class seen at a few points gets the average. The fusion adds gamma * log r_b(c_b) to branch
b's log-weight at each point, c_b its own top class there (``bias``: (2, C)).
"""

from __future__ import annotations

import torch


class ClassAgreement:
    """Per branch (image, range) and class: decayed counts of the in-view points the branch
    gives that class and of those the other branch agrees with.

    ``update(label_2d, label_3d)``: the two branches' top classes (M,) at the same in-view
    points of one frame. ``bias(gamma)`` (2, C): the fusion log-weights gamma * log r.
    """

    def __init__(self, num_classes: int, momentum: float = 0.9, prior_points: float = 50.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"agreement momentum must be in [0, 1), got {momentum}")
        self.num_classes = int(num_classes)
        self.momentum, self.prior_points = float(momentum), float(prior_points)
        self.reset()

    def reset(self) -> None:
        self.predicted = torch.zeros(2, self.num_classes, dtype=torch.float64)
        self.agreed = torch.zeros(self.num_classes, dtype=torch.float64)

    def update(self, label_2d: torch.Tensor, label_3d: torch.Tensor) -> None:
        """Fold one frame in: label_2d, label_3d (M,) int top classes at the same in-view points."""
        if label_2d.shape != label_3d.shape:
            raise ValueError(f"agreement needs labels at the same points, got {tuple(label_2d.shape)} "
                             f"and {tuple(label_3d.shape)}")
        c = self.num_classes
        l2, l3 = label_2d.detach().long().cpu(), label_3d.detach().long().cpu()
        frame = torch.stack([torch.bincount(l2, minlength=c), torch.bincount(l3, minlength=c)]).double()
        agree = torch.bincount(l2[l2 == l3], minlength=c).double()
        self.predicted = self.momentum * self.predicted + frame[:, :c]
        self.agreed = self.momentum * self.agreed + agree[:c]

    def reliability(self) -> torch.Tensor:
        """(2, C) r_b(c) in (0, 1]: agreement of branch b's class-c points, shrunk towards the
        overall agreement rate (0.5 before any point)."""
        total = self.predicted[0].sum()
        overall = float(self.agreed.sum() / total) if total > 0 else 0.5
        k = self.prior_points
        return (self.agreed[None] + k * overall) / (self.predicted + k)

    def bias(self, gamma: float) -> torch.Tensor:
        """(2, C) float32 fusion log-weights gamma * log r_b(c)."""
        return (float(gamma) * torch.log(self.reliability().clamp_min(1e-3))).float()
