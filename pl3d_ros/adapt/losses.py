"""Adaptation losses (METHODS.md sections 3-6), each a pure function of tensors.

Shapes: N points, C classes, F feature channels. "logits" are unnormalised student scores (they
carry the gradient); teacher distributions are probabilities and are treated as constants
(callers pass them detached or computed under ``torch.no_grad``). Every loss is a 0-d tensor,
averaged over the points it applies to, and an exact zero that still belongs to the graph when no
point qualifies, so callers can add the terms unconditionally.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pl3d_ros.models.points import entropy as point_entropy

IGNORE = -1  # "no label" in every integer label array of pl3d_ros.adapt


def _zero(like: torch.Tensor) -> torch.Tensor:
    """0 that keeps ``like`` in the graph (backward through it is a no-op, never an error)."""
    return like.sum() * 0.0


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, balanced: bool = False) -> torch.Tensor:
    """Mean cross-entropy over labelled points.

    logits: (N, C); target: (N,) int64 class ids, ``IGNORE`` (-1) for unlabelled points -> ().
    balanced: weight each class by 1 / log(1.2 + its share of the labelled points) (ENet, as the
    source training does): pseudo-labels are mostly road and vegetation, and a plain mean would
    trade the rare classes that mIoU counts alike for the common ones.
    """
    keep = target >= 0
    if not bool(keep.any()):
        return _zero(logits)
    if not balanced:
        return F.cross_entropy(logits[keep], target[keep])
    t = target[keep]
    freq = torch.bincount(t, minlength=logits.shape[1]).to(logits.dtype) / t.numel()
    weight = torch.where(freq > 0, 1.0 / torch.log(1.2 + freq), torch.zeros_like(freq))
    return F.cross_entropy(logits[keep], t, weight=weight)


def select_negative_classes(p_teacher: torch.Tensor, used: torch.Tensor, candidates: torch.Tensor,
                            max_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of LASS3D's progressive class selection (section 4.2).

    For each candidate point, the class of lowest teacher probability among the classes not yet
    used for that point, if that probability is <= ``max_prob``.

    p_teacher: (N, C) probabilities; used: (N, C) bool, classes already taken in earlier rounds of
    this frame; candidates: (N,) bool, the unreliable points.
    Returns (classes (N,) int64, -1 where none, used' (N, C) bool = used plus the new picks).
    """
    masked = p_teacher.masked_fill(used, float("inf"))  # a used class can never be the minimum
    low, cls = masked.min(dim=1)
    pick = candidates & (low <= max_prob)  # inf (all used) never passes
    classes = torch.where(pick, cls, torch.full_like(cls, IGNORE))
    new_used = used.clone()
    rows = torch.nonzero(pick, as_tuple=True)[0]
    new_used[rows, cls[rows]] = True
    return classes, new_used


def negative_learning(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - q_ic) over points with a negative class (section 4.2).

    logits: (N, C) student; classes: (N,) int64 complementary label, -1 for none -> ().
    log(1 - q_c) is computed as logsumexp over the other classes minus logsumexp over all, which
    stays finite when q_c -> 1 (the case negative learning exists to push down).
    """
    keep = classes >= 0
    if not bool(keep.any()):
        return _zero(logits)
    lg = logits[keep]
    cls = classes[keep]
    others = lg.scatter(1, cls[:, None], float("-inf"))
    log_one_minus_q = torch.logsumexp(others, dim=1) - torch.logsumexp(lg, dim=1)
    return -log_one_minus_q.mean()


def erda(features: torch.Tensor, prototypes: torch.Tensor, logits: torch.Tensor, *, tau: float = 1.0,
         lam: float = 1.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy-regularised distribution alignment (section 3): mean of lam * H(p) + KL(p || q).

    features: (N, F) student features; prototypes: (C, F) class prototypes (constants);
    logits: (N, C) student scores, q = softmax(logits); valid: (C,) bool, classes whose
    prototype exists (others get p = 0) -> (). p = softmax_c(cos(feature, prototype_c) / tau).
    No stop-gradient on p: the gradient reaches the features
    through p as well as the logits through q (ERDA's design). With lam = 1 the value is the
    cross-entropy -sum_c p_c log q_c.
    """
    if features.shape[0] == 0:
        return _zero(logits) + _zero(features)
    log_q = F.log_softmax(logits, dim=1)
    if valid is not None:
        # Only the classes with a prototype: p is exactly 0 elsewhere, and keeping those columns
        # would put 0 * log 0 into the graph, whose gradient is NaN.
        idx = torch.nonzero(valid, as_tuple=True)[0]
        prototypes, log_q = prototypes[idx], log_q[:, idx]
    cos = F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).t()
    log_p = F.log_softmax(cos / tau, dim=1)
    p = log_p.exp()
    neg_h = (p * log_p).sum(1)  # sum p log p
    kl = neg_h - (p * log_q).sum(1)
    return (-lam * neg_h + kl).mean()


def cross_modal_kl(logits_2d: torch.Tensor, logits_3d: torch.Tensor,
                   p2d_teacher: torch.Tensor, p3d_teacher: torch.Tensor) -> torch.Tensor:
    """xMUDA cross-modal consistency on in-view points (section 5.3).

    logits_2d, logits_3d: (M, C) student scores of the two branches at the same M points;
    p2d_teacher, p3d_teacher: (M, C) teacher probabilities (constants).
    -> () mean over points of KL(p2d_teacher || q3d) + KL(p3d_teacher || q2d).
    """
    if logits_2d.shape[0] == 0:
        return _zero(logits_2d) + _zero(logits_3d)
    p2 = p2d_teacher.detach()
    p3 = p3d_teacher.detach()
    kl_3 = (torch.xlogy(p2, p2) - p2 * F.log_softmax(logits_3d, dim=1)).sum(1)
    kl_2 = (torch.xlogy(p3, p3) - p3 * F.log_softmax(logits_2d, dim=1)).sum(1)
    return (kl_3 + kl_2).mean()


def entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """TENT: mean Shannon entropy (nats) of (N, C) probabilities -> ()."""
    if probs.shape[0] == 0:
        return _zero(probs)
    return point_entropy(probs, eps, dim=1).mean()


def reliable_entropy(probs: torch.Tensor, margin: float, eps: float = 1e-12) -> torch.Tensor:
    """EATA's reliable entropy over (N, C) probabilities -> (): the points whose entropy H is
    below E0 = margin * ln C, each weighted exp(E0 - H) (no gradient through the weight), mean
    over those points; 0 when none is. High-entropy points give the noisiest gradients and are
    the ones a confident-wrong step is least able to fix."""
    h = point_entropy(probs, eps, dim=1)
    e0 = float(margin) * math.log(probs.shape[1])
    keep = h < e0
    if not bool(keep.any()):
        return _zero(probs)
    hk = h[keep]
    return (torch.exp(e0 - hk.detach()) * hk).mean()
