"""SAM-guided pseudo-label refinement (METHODS.md sections 1-2).

``refine_pseudo_labels`` takes one frame's base pseudo-labels and a mask image and returns
denser labels: Mask Label Assignment (``mla``) picks a class per mask, Geometry-Aware Progressive
Propagation (``gapp``) spreads it through the mask's 3D points. Every point a mask labeled is
tagged with the mask id (its "component"), which the connectivity noise filter
(``connectivity.ComponentFilter``) later keeps or drops as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pl3d_ros.config import RangeImageConfig, RefineConfig
from pl3d_ros.refine.connectivity import ComponentFilter, fit_gmm_1d
from pl3d_ros.refine.gapp import PropagationResult, assign_whole_masks, propagate, propagation_radius
from pl3d_ros.refine.masks import (
    MaskProvider,
    MaskProviderError,
    MobileSamProvider,
    SamProvider,
    SuperpixelProvider,
    build_mask_provider,
    mask_areas,
    resolve_overlaps,
)
from pl3d_ros.refine.mla import MLA_RULES, MlaResult, assign_mask_labels

__all__ = [
    "MLA_RULES",
    "ComponentFilter",
    "MaskProvider",
    "MaskProviderError",
    "MlaResult",
    "MobileSamProvider",
    "PointMasks",
    "PropagationResult",
    "RefineResult",
    "SamProvider",
    "SuperpixelProvider",
    "assign_mask_labels",
    "assign_whole_masks",
    "build_mask_provider",
    "fit_gmm_1d",
    "mask_areas",
    "point_mask_ids",
    "propagate",
    "propagation_radius",
    "refine_pseudo_labels",
    "refine_with_masks",
    "resolve_overlaps",
]


@dataclass(frozen=True, eq=False)
class RefineResult:
    """Refined pseudo-labels of one frame.

    Attributes:
        labels: (N,) int64 base labels plus the labels masks gave (MLA + GAPP), -1 unlabeled.
        component: (N,) int64 id of the mask that labeled the point, -1 for points no mask
            labeled. Base-labelled points inside kept mask k whose label equals c_k belong to
            component k too.
        stats: ``masks_total``, ``masks_kept``, ``rejected_<rule>`` for each MLA rule,
            ``points_in_masks``, ``labeled_before``, ``labeled_after``, ``points_added``,
            ``points_relabeled``, ``gapp_rounds``, ``density_before``, ``density_after``
            (labeled / all points).
    """

    labels: np.ndarray
    component: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def point_mask_ids(pixels: np.ndarray, in_view: np.ndarray, mask_image: np.ndarray) -> np.ndarray:
    """Mask id under every point's pixel.

    Args:
        pixels: (N, 2) int pixel (u, v) = (column, row); only read where ``in_view``.
        in_view: (N,) bool.
        mask_image: (H, W) int mask ids, -1 none.

    Returns:
        (N,) int64 mask id, -1 for points out of view or in no mask.

    Raises:
        ValueError: an in-view pixel lies outside the mask image (the projection and the mask
            image disagree on the image size).
    """
    pixels = np.asarray(pixels)
    in_view = np.asarray(in_view, dtype=bool)
    mask_image = np.asarray(mask_image)
    n = in_view.shape[0]
    if pixels.shape != (n, 2):
        raise ValueError(f"pixels must have shape ({n}, 2), got {pixels.shape}")
    if mask_image.ndim != 2:
        raise ValueError(f"mask_image must be (H, W), got {mask_image.shape}")
    out = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(in_view)
    if idx.size == 0:
        return out
    u = pixels[idx, 0].astype(np.int64)
    v = pixels[idx, 1].astype(np.int64)
    h, w = mask_image.shape
    if u.min() < 0 or v.min() < 0 or u.max() >= w or v.max() >= h:
        raise ValueError(
            f"in-view pixels span u [{u.min()}, {u.max()}], v [{v.min()}, {v.max()}], "
            f"outside the {w}x{h} mask image"
        )
    out[idx] = mask_image[v, u]
    return out


@dataclass(frozen=True, eq=False)
class PointMasks:
    """Which mask each point of a frame falls in: mask_id (N,) int64 (-1 none), areas (K,) int64
    pixels per mask, image_area (pixels). Kept with a frame so that its labels can be refined
    again later (a memory frame re-labelled by a newer teacher) without recomputing masks."""

    mask_id: np.ndarray
    areas: np.ndarray
    image_area: int

    @classmethod
    def of(cls, pixels: np.ndarray, in_view: np.ndarray, mask_image: np.ndarray) -> PointMasks:
        """pixels (N, 2) int (u, v) and in_view (N,) of the points in ``mask_image`` (H, W)."""
        mask_image = np.asarray(mask_image)
        return cls(point_mask_ids(pixels, in_view, mask_image), mask_areas(mask_image), int(mask_image.size))


def refine_pseudo_labels(
    points: np.ndarray,
    depth: np.ndarray,
    pixels: np.ndarray,
    in_view: np.ndarray,
    mask_image: np.ndarray,
    labels: np.ndarray,
    sensor: RangeImageConfig,
    cfg: RefineConfig,
    *,
    gapp: bool = True,
) -> RefineResult:
    """Refine one frame's base pseudo-labels with class-agnostic masks (MLA + GAPP).

    Args:
        points: (N, 3) (or (N, 4)) float32 xyz in the LiDAR frame, metres.
        depth: (N,) float32 camera depth (z in the camera optical frame), metres; valid where
            ``in_view``.
        pixels: (N, 2) int pixel (u, v) in ``mask_image``; only meaningful where ``in_view``.
        in_view: (N,) bool points projecting into the image.
        mask_image: (H, W) int32 mask id per pixel, -1 where no mask (a ``MaskProvider``'s output).
        labels: (N,) int64 base pseudo-labels (METHODS.md section 0), -1 unlabeled.
        sensor: LiDAR geometry, for the vertical angular resolution in GAPP's radius.
        cfg: MLA / GAPP thresholds.
        gapp: False is the "without GAPP" ablation: every point of a kept mask gets c_k (naive
            MLA), points with a different confident label excepted when ``protect_confident``.

    Returns:
        A ``RefineResult``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    in_view = np.asarray(in_view, dtype=bool)
    if in_view.shape != (n,):
        raise ValueError(f"in_view must have shape ({n},), got {in_view.shape}")
    return refine_with_masks(points, depth, PointMasks.of(pixels, in_view, mask_image), labels, sensor, cfg,
                             gapp=gapp)


def refine_with_masks(points: np.ndarray, depth: np.ndarray, masks: PointMasks, labels: np.ndarray,
                      sensor: RangeImageConfig, cfg: RefineConfig, *, gapp: bool = True) -> RefineResult:
    """``refine_pseudo_labels`` with the points' masks already known (see PointMasks)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[0] != n or pts.shape[1] not in (3, 4):
        raise ValueError(f"points must have shape ({n}, 3), got {pts.shape}")
    depth = np.asarray(depth)
    if depth.shape != (n,):
        raise ValueError(f"depth must have shape ({n},), got {depth.shape}")
    mask_id = masks.mask_id
    if mask_id.shape != (n,):
        raise ValueError(f"mask ids must have shape ({n},), got {mask_id.shape}")
    mla = assign_mask_labels(mask_id, labels, masks.areas, masks.image_area, cfg)
    if gapp:
        prop = propagate(pts, depth, mask_id, labels, mla.mask_class, sensor, cfg)
    else:
        prop = assign_whole_masks(mask_id, labels, mla.mask_class, cfg)

    labeled_before = int(np.count_nonzero(labels >= 0))
    labeled_after = int(np.count_nonzero(prop.labels >= 0))
    stats: dict[str, Any] = {
        "masks_total": mla.num_masks,
        "masks_kept": mla.num_kept,
        **{f"rejected_{rule}": mla.rejected[rule] for rule in MLA_RULES},
        "points_in_masks": int(np.count_nonzero(mask_id >= 0)),
        "labeled_before": labeled_before,
        "labeled_after": labeled_after,
        "points_added": prop.added,
        "points_relabeled": prop.relabeled,
        "gapp_rounds": prop.rounds,
        "density_before": labeled_before / n if n else 0.0,
        "density_after": labeled_after / n if n else 0.0,
    }
    return RefineResult(labels=prop.labels, component=prop.component, stats=stats)
