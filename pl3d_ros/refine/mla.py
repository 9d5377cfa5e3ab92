"""Mask Label Assignment (MLA, METHODS.md section 1.3).

Each mask k collects P_k, the points whose projection falls in it, and L_k, those of P_k with a
base pseudo-label. The mask's class c_k is the majority label of L_k; the mask is kept only if
it passes, in this order (a rejected mask is counted under the first rule it fails):

- size: |P_k| >= mla_min_points and |L_k| >= mla_min_labeled,
- purity: votes(c_k) / |L_k| >= mla_purity,
- representativity: |L_k| / |P_k| >= mla_representativity,
- area: mask area / image area <= mla_max_area.

Everything is computed for all masks at once with bincount / unique; no loop over points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pl3d_ros.config import RefineConfig

#: Rejection rules in the order they are checked.
MLA_RULES = ("size", "purity", "representativity", "area")


@dataclass(frozen=True, eq=False)
class MlaResult:
    """Per-mask outcome of the label assignment.

    Attributes:
        mask_class: (K,) int64 class c_k of every mask, -1 where the mask was rejected.
        majority: (K,) int64 majority label of L_k whether kept or not, -1 where L_k is empty.
        num_points: (K,) int64 |P_k|.
        num_labeled: (K,) int64 |L_k|.
        votes: (K,) int64 votes for the majority label.
        rejected_by: (K,) object array, the first rule a mask failed ("" where kept).
        rejected: counts per rule, keys ``MLA_RULES``.
    """

    mask_class: np.ndarray
    majority: np.ndarray
    num_points: np.ndarray
    num_labeled: np.ndarray
    votes: np.ndarray
    rejected_by: np.ndarray
    rejected: dict[str, int]

    @property
    def num_masks(self) -> int:
        return int(self.mask_class.shape[0])

    @property
    def num_kept(self) -> int:
        return int(np.count_nonzero(self.mask_class >= 0))


def majority_labels(
    mask_id: np.ndarray, labels: np.ndarray, num_masks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Majority label per mask among its labeled points.

    Args:
        mask_id: (N,) int mask id per point, -1 for none.
        labels: (N,) int label per point, -1 for unlabeled.
        num_masks: K; ids must lie in [-1, K).

    Returns:
        (majority, votes): two (K,) int64 arrays; majority is -1 and votes 0 for masks without a
        labeled point. Ties go to the lowest class id (deterministic).
    """
    majority = np.full(num_masks, -1, dtype=np.int64)
    votes = np.zeros(num_masks, dtype=np.int64)
    sel = (mask_id >= 0) & (labels >= 0)
    if not sel.any():
        return majority, votes
    m = mask_id[sel].astype(np.int64)
    c = labels[sel].astype(np.int64)
    n_cls = int(c.max()) + 1
    pairs, counts = np.unique(m * n_cls + c, return_counts=True)
    pm, pc = pairs // n_cls, pairs % n_cls
    # Sort by (mask, -count, class): each mask's first row is its majority, lowest class on ties.
    order = np.lexsort((pc, -counts, pm))
    pm, pc, counts = pm[order], pc[order], counts[order]
    first = np.ones(pm.shape[0], dtype=bool)
    first[1:] = pm[1:] != pm[:-1]
    majority[pm[first]] = pc[first]
    votes[pm[first]] = counts[first]
    return majority, votes


def assign_mask_labels(
    mask_id: np.ndarray,
    labels: np.ndarray,
    areas: np.ndarray,
    image_area: int,
    cfg: RefineConfig,
) -> MlaResult:
    """Mask Label Assignment for every mask of one image.

    Args:
        mask_id: (N,) int64 mask id of every point, -1 for points in no mask (or out of view).
        labels: (N,) int64 base pseudo-label of every point, -1 unlabeled.
        areas: (K,) mask areas in pixels; K is the number of masks (ids 0 .. K-1).
        image_area: H * W, pixels.
        cfg: thresholds ``mla_*``.

    Returns:
        An ``MlaResult``.
    """
    mask_id = np.asarray(mask_id, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    areas = np.asarray(areas, dtype=np.int64)
    if mask_id.shape != labels.shape or mask_id.ndim != 1:
        raise ValueError(f"mask_id and labels must be (N,) of equal length, got {mask_id.shape}, {labels.shape}")
    k = int(areas.shape[0])
    if mask_id.size and (mask_id.max() >= k or mask_id.min() < -1):
        raise ValueError(f"mask ids must lie in [-1, {k}), got [{mask_id.min()}, {mask_id.max()}]")
    if image_area <= 0:
        raise ValueError(f"image_area must be positive, got {image_area}")

    in_mask = mask_id >= 0
    num_points = np.bincount(mask_id[in_mask], minlength=k).astype(np.int64)
    num_labeled = np.bincount(mask_id[in_mask & (labels >= 0)], minlength=k).astype(np.int64)
    majority, votes = majority_labels(mask_id, labels, k)

    # Divisions guarded against empty masks; those fail the size rule first anyway.
    with np.errstate(divide="ignore", invalid="ignore"):
        purity = np.where(num_labeled > 0, votes / np.maximum(num_labeled, 1), 0.0)
        represent = np.where(num_points > 0, num_labeled / np.maximum(num_points, 1), 0.0)
    fails = {
        "size": (num_points < cfg.mla_min_points) | (num_labeled < cfg.mla_min_labeled),
        "purity": purity < cfg.mla_purity,
        "representativity": represent < cfg.mla_representativity,
        "area": areas / float(image_area) > cfg.mla_max_area,
    }
    rejected_by = np.full(k, "", dtype=object)
    rejected: dict[str, int] = {}
    open_ = np.ones(k, dtype=bool)  # not yet rejected by an earlier rule
    for rule in MLA_RULES:
        hit = open_ & fails[rule]
        rejected_by[hit] = rule
        rejected[rule] = int(np.count_nonzero(hit))
        open_ &= ~hit
    mask_class = np.where(open_, majority, -1).astype(np.int64)
    return MlaResult(
        mask_class=mask_class,
        majority=majority,
        num_points=num_points,
        num_labeled=num_labeled,
        votes=votes,
        rejected_by=rejected_by,
        rejected=rejected,
    )
