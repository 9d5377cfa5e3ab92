"""Reliability split (METHODS.md section 4.1, LASS3D's dual score).

A point is reliable for class c if the teacher is confident in c and teacher and student agree
about c: the population variance of the two probabilities, ((p_c - q_c) / 2)^2, is at most
``max_variance`` (0.05 allows a gap |p_c - q_c| of up to 0.447).

How the split meets the pseudo-labels of sections 0-2 (METHODS.md leaves this open): a point
that carries a (refined, filtered) pseudo-label y has already passed a confidence gate upstream
(the class-wise threshold, capped at 0.9, or mask label assignment + propagation), so for it
c = y and only the variance half of the score applies. Applying the 0.9 teacher-confidence gate
to these points too would discard every label the class-wise thresholds and the SAM propagation
add (their confidence is < 0.9 by construction), which would make sections 0-2 dead code. An
unlabelled point is reliable under the literal rule (teacher max probability >= min_confidence,
c = argmax) unless ``veto`` marks it: the connectivity filter's noisy components are vetoed so
that they go to negative learning rather than back to cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pl3d_ros.adapt.losses import IGNORE


@dataclass
class Split:
    """reliable (N,) bool; target (N,) int64 CE class of reliable points, -1 elsewhere;
    variance (N,) float of the chosen class's two probabilities."""

    reliable: torch.Tensor
    target: torch.Tensor
    variance: torch.Tensor

    @property
    def unreliable(self) -> torch.Tensor:
        return ~self.reliable


def pair_variance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Population variance of two values, elementwise: ((a - b) / 2)^2."""
    return ((a - b) * 0.5) ** 2


def reliability_split(p_teacher: torch.Tensor, q_student: torch.Tensor, labels: torch.Tensor, *,
                      min_confidence: float, max_variance: float,
                      veto: torch.Tensor | None = None) -> Split:
    """p_teacher, q_student: (N, C) probabilities (no gradient needed); labels: (N,) int64 pseudo-
    labels, -1 unlabelled; veto: (N,) bool points that may not be reliable -> Split."""
    labelled = labels >= 0
    cls = torch.where(labelled, labels, p_teacher.argmax(dim=1))
    pt = p_teacher.gather(1, cls[:, None])[:, 0]
    qs = q_student.detach().gather(1, cls[:, None])[:, 0]
    var = pair_variance(pt, qs)
    confident = labelled | (pt >= min_confidence)
    reliable = confident & (var <= max_variance)
    if veto is not None:
        reliable &= ~veto
    target = torch.where(reliable, cls, torch.full_like(cls, IGNORE))
    return Split(reliable, target, var)
