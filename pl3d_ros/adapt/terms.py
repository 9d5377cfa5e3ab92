"""The loss terms of the adaptation methods, one small object each, so that a method is a list of
terms and an ablation is that list without one.

Each term sees a :class:`StepContext` (the frame's state, the student's outputs, the reliability
split) and returns its unweighted loss, or None when it does not apply to this step; the method
adds ``weight * loss`` over its terms in their order. Hard-label terms act on both branches: the
3D branch at every point, the 2D branch at the in-view points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from pl3d_ros.adapt import losses
from pl3d_ros.adapt.prototypes import PrototypeBank
from pl3d_ros.adapt.reliability import Split
from pl3d_ros.adapt.state import FrameState
from pl3d_ros.inputs import PointOutputs


@dataclass
class StepContext:
    """One student step on one frame: its state, the student's per-point outputs and fused
    probabilities q_fused (N, C), and the reliability split (None for methods without one)."""

    state: FrameState
    out: PointOutputs
    q_fused: torch.Tensor
    split: Split | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # numbers a term adds for the log


class LossTerm:
    """A weighted term of the student's loss."""

    name: ClassVar[str] = "term"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)

    def loss(self, ctx: StepContext) -> torch.Tensor | None:
        """The unweighted loss of this step, or None when the term does not apply."""
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        """Runs after the optimizer step (e.g. prototype updates)."""

    def reset(self) -> None:
        """Back to no online state (after a restore to the source)."""


def branch_cross_entropy(out: PointOutputs, target: torch.Tensor, in_view: torch.Tensor,
                         balanced: bool = False) -> torch.Tensor:
    """CE of the 3D branch on every labelled point plus the 2D branch on the labelled in-view ones.

    target: (N,) int64, -1 = no label; balanced: class-balanced (losses.cross_entropy)."""
    return (losses.cross_entropy(out.logits_3d, target, balanced)
            + losses.cross_entropy(out.logits_2d, target[in_view], balanced))


class FusedEntropy(LossTerm):
    """TENT: mean entropy of the student's fused prediction; with ``margin`` > 0 EATA's reliable
    entropy instead (losses.reliable_entropy: only points below margin * ln C, weighted)."""

    name = "entropy"

    def __init__(self, weight: float = 1.0, margin: float = 0.0) -> None:
        super().__init__(weight)
        self.margin = float(margin)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        if self.margin > 0:
            return losses.reliable_entropy(ctx.q_fused, self.margin)
        return losses.entropy(ctx.q_fused)


class BranchEntropy(LossTerm):
    """Mean entropy of each branch's own prediction (2D at the in-view points, 3D at every
    point), averaged over the two. The fused entropy can also fall by moving the fusion's weight
    onto whichever branch is already the more confident, right or not; this one only sharpens
    each branch where it stands."""

    name = "entropy"

    def loss(self, ctx: StepContext) -> torch.Tensor:
        out = ctx.out
        return 0.5 * (losses.entropy(out.logits_2d.softmax(1)) + losses.entropy(out.logits_3d.softmax(1)))


class PseudoLabelCE(LossTerm):
    """Cross-entropy on the frame's pseudo-labels, every labelled point (xMUDA-PL online)."""

    name = "ce"

    def loss(self, ctx: StepContext) -> torch.Tensor:
        return branch_cross_entropy(ctx.out, ctx.state.train_labels, ctx.state.in_view)


class ReliableCE(LossTerm):
    """Cross-entropy on the reliable points' classes (LASS3D's split, section 4.1)."""

    name = "ce"

    def __init__(self, weight: float = 1.0, balanced: bool = False) -> None:
        super().__init__(weight)
        self.balanced = bool(balanced)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.split is not None
        return branch_cross_entropy(ctx.out, ctx.split.target, ctx.state.in_view, self.balanced)


class NegativeLearning(LossTerm):
    """Progressive negative learning on the unreliable points (section 4.2): in each of the
    first ``rounds`` steps on a frame, one new lowest-probability class per point."""

    name = "negative"

    def __init__(self, weight: float, max_prob: float, rounds: int) -> None:
        super().__init__(weight)
        self.max_prob = float(max_prob)
        self.rounds = int(rounds)

    def loss(self, ctx: StepContext) -> torch.Tensor | None:
        st = ctx.state
        if st.steps >= self.rounds:
            return None
        assert ctx.split is not None and st.teacher is not None
        if st.negatives_used is None:
            st.negatives_used = torch.zeros_like(st.teacher.fused, dtype=torch.bool)
        classes, st.negatives_used = losses.select_negative_classes(
            st.teacher.fused, st.negatives_used, ctx.split.unreliable, self.max_prob)
        ctx.stats["negative"] = int((classes >= 0).sum()) / max(1, st.num_points)
        return (losses.negative_learning(ctx.out.logits_3d, classes)
                + losses.negative_learning(ctx.out.logits_2d, classes[st.in_view]))


class ErdaSoftLoss(LossTerm):
    """ERDA (section 3): lambda * H(p) + KL(p || q) with p from class prototypes, per branch (one
    prototype bank each: 3D features at every point, 2D features at the in-view points).

    The banks are initialised from the frozen source model's features (``observe_source``) and
    follow the student's features on the reliable points (``after_step``)."""

    name = "erda"

    def __init__(self, weight: float, tau: float, lam: float, momentum: float, num_classes: int,
                 dim_2d: int, dim_3d: int, device: torch.device | str) -> None:
        super().__init__(weight)
        self.tau, self.lam = float(tau), float(lam)
        self.bank_2d = PrototypeBank(num_classes, dim_2d, momentum, device)
        self.bank_3d = PrototypeBank(num_classes, dim_3d, momentum, device)

    @property
    def needs_source(self) -> bool:
        """Whether a bank still has classes to initialise from the source model."""
        return not (bool(self.bank_2d.initialised.all()) and bool(self.bank_3d.initialised.all()))

    def observe_source(self, source_out: PointOutputs, source_labels: torch.Tensor, in_view: torch.Tensor) -> None:
        """Initialise missing prototypes: source features (PointOutputs) and its labels (N,)."""
        self.bank_3d.init_missing(source_out.feat_3d, source_labels)
        self.bank_2d.init_missing(source_out.feat_2d, source_labels[in_view])

    def loss(self, ctx: StepContext) -> torch.Tensor | None:
        b2, b3, out = self.bank_2d, self.bank_3d, ctx.out
        if not b3.ready:
            return None
        value = losses.erda(out.feat_3d, b3.vectors, out.logits_3d, tau=self.tau, lam=self.lam,
                            valid=b3.initialised)
        if b2.ready:
            value = value + losses.erda(out.feat_2d, b2.vectors, out.logits_2d, tau=self.tau, lam=self.lam,
                                        valid=b2.initialised)
        return value

    def after_step(self, ctx: StepContext) -> None:
        assert ctx.split is not None
        target = ctx.split.target
        self.bank_3d.update(ctx.out.feat_3d.detach(), target)
        self.bank_2d.update(ctx.out.feat_2d.detach(), target[ctx.state.in_view])

    def reset(self) -> None:
        self.bank_2d.reset()
        self.bank_3d.reset()


class CrossModalKL(LossTerm):
    """xMUDA cross-modal consistency (section 5.3): each branch's student towards the other
    branch's teacher, at the in-view points."""

    name = "xm"

    def loss(self, ctx: StepContext) -> torch.Tensor:
        st, out = ctx.state, ctx.out
        assert st.teacher is not None
        return losses.cross_modal_kl(out.logits_2d, out.logits_3d[st.in_view], st.teacher.p2,
                                     st.teacher.p3[st.in_view])


def total_loss(terms: list[LossTerm], ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
    """sum_t weight_t * loss_t over the terms that apply, in order -> (total, {name: loss_t});
    total None when no term applies (e.g. negative learning alone, after its rounds on a frame)."""
    total: torch.Tensor | None = None
    values: dict[str, float] = {}
    for term in terms:
        value = term.loss(ctx)
        if value is None:
            continue
        values[term.name] = float(value.detach())
        weighted = value if term.weight == 1.0 else term.weight * value
        total = weighted if total is None else total + weighted
    return total, values
