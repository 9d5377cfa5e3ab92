"""Geometry-Aware Progressive Propagation (GAPP, METHODS.md section 1.4), and naive MLA.

A kept mask k with class c_k labels its points in rounds, starting from the points of L_k that
already carry c_k. In each round, every remaining point of P_k whose nearest current member (3D
Euclidean, LiDAR frame) lies within

    r = max(gapp_radius_m, gapp_radius_beams * range * vertical_resolution)

(range: the candidate's own LiDAR range |xyz|, so r grows with the beam spacing at that range)
and whose camera depth differs from that nearest member's by at most

    max(gapp_depth_abs_m, gapp_depth_rel * depth)

joins the set (all joins of a round are decided against the set as it was at the round's start).
At most ``gapp_max_rounds`` rounds; propagation stops early when a round adds nothing. Points of
the mask never reached stay unlabeled: they are usually background seen through the mask's edge
(2D-3D misalignment, or a mask bleeding over a depth discontinuity).

All masks propagate together in one KD-tree per round: points are lifted to 4D with
``mask_id * separation`` as the 4th coordinate, ``separation`` larger than any query radius, so
a radius-bounded nearest-neighbour query can never return a member of another mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from pl3d_ros.config import RangeImageConfig, RefineConfig


@dataclass(frozen=True, eq=False)
class PropagationResult:
    """Labels after MLA (+ GAPP).

    Attributes:
        labels: (N,) int64 base labels plus the labels masks gave, -1 unlabeled.
        component: (N,) int64 id of the mask whose label a point carries (the seeds, i.e. base
            labels equal to c_k inside kept mask k, included), -1 otherwise.
        rounds: propagation rounds that added at least one point (0 for naive MLA).
        added: points that were unlabeled and got a mask's label.
        relabeled: points whose base label was overwritten (only with protect_confident off).
    """

    labels: np.ndarray
    component: np.ndarray
    rounds: int
    added: int
    relabeled: int


def _point_class(mask_id: np.ndarray, mask_class: np.ndarray) -> np.ndarray:
    """(N,) int64 class of the kept mask each point falls in, -1 for no / rejected mask."""
    out = np.full(mask_id.shape[0], -1, dtype=np.int64)
    inside = mask_id >= 0
    out[inside] = mask_class[mask_id[inside]]
    return out


def _check(mask_id: np.ndarray, labels: np.ndarray, mask_class: np.ndarray) -> tuple[np.ndarray, ...]:
    mask_id = np.asarray(mask_id, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    mask_class = np.asarray(mask_class, dtype=np.int64)
    if mask_id.ndim != 1 or labels.shape != mask_id.shape:
        raise ValueError(f"mask_id and labels must be (N,) of equal length, got {mask_id.shape}, {labels.shape}")
    if mask_id.size and mask_id.max() >= mask_class.shape[0]:
        raise ValueError(f"mask id {mask_id.max()} has no entry in mask_class ({mask_class.shape[0]} masks)")
    return mask_id, labels, mask_class


def _finish(labels: np.ndarray, out: np.ndarray, component: np.ndarray, rounds: int) -> PropagationResult:
    changed = out != labels
    added = int(np.count_nonzero(changed & (labels < 0)))
    relabeled = int(np.count_nonzero(changed & (labels >= 0)))
    return PropagationResult(labels=out, component=component, rounds=rounds, added=added, relabeled=relabeled)


def assign_whole_masks(
    mask_id: np.ndarray, labels: np.ndarray, mask_class: np.ndarray, cfg: RefineConfig
) -> PropagationResult:
    """Naive MLA (the "without GAPP" ablation): every point of a kept mask gets c_k.

    Points with a base label of another class keep it when ``cfg.protect_confident``.

    Args:
        mask_id: (N,) int64 mask id per point, -1 none.
        labels: (N,) int64 base pseudo-labels, -1 unlabeled.
        mask_class: (K,) int64 c_k per mask, -1 rejected.
        cfg: ``protect_confident``.
    """
    mask_id, labels, mask_class = _check(mask_id, labels, mask_class)
    cls = _point_class(mask_id, mask_class)
    take = cls >= 0
    if cfg.protect_confident:
        take &= (labels < 0) | (labels == cls)
    out = labels.copy()
    out[take] = cls[take]
    component = np.where(take, mask_id, -1).astype(np.int64)
    return _finish(labels, out, component, rounds=0)


def propagation_radius(
    points_xyz: np.ndarray, sensor: RangeImageConfig, cfg: RefineConfig
) -> np.ndarray:
    """(N,) float64 GAPP radius in metres: max(radius_m, radius_beams * range * vres)."""
    xyz = np.asarray(points_xyz, dtype=np.float64)[:, :3]
    rng = np.sqrt(np.einsum("ij,ij->i", xyz, xyz))
    return np.maximum(cfg.gapp_radius_m, cfg.gapp_radius_beams * rng * sensor.vertical_resolution)


def propagate(
    points_xyz: np.ndarray,
    depth: np.ndarray,
    mask_id: np.ndarray,
    labels: np.ndarray,
    mask_class: np.ndarray,
    sensor: RangeImageConfig,
    cfg: RefineConfig,
) -> PropagationResult:
    """Geometry-aware progressive propagation inside every kept mask.

    Args:
        points_xyz: (N, 3) (or (N, 4)) points in the LiDAR frame, metres.
        depth: (N,) camera depth (z in the camera optical frame), metres; only read for points
            with a mask id.
        mask_id: (N,) int64 mask id per point, -1 none (out of view or in no mask).
        labels: (N,) int64 base pseudo-labels, -1 unlabeled.
        mask_class: (K,) int64 c_k per mask from MLA, -1 rejected.
        sensor: for the vertical angular resolution (radians per beam).
        cfg: ``gapp_*`` and ``protect_confident``.

    Returns:
        A ``PropagationResult``.
    """
    mask_id, labels, mask_class = _check(mask_id, labels, mask_class)
    xyz = np.asarray(points_xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] not in (3, 4) or xyz.shape[0] != mask_id.shape[0]:
        raise ValueError(f"points_xyz must be ({mask_id.shape[0]}, 3), got {xyz.shape}")
    xyz = xyz[:, :3]
    depth = np.asarray(depth, dtype=np.float64)
    if depth.shape != mask_id.shape:
        raise ValueError(f"depth must be ({mask_id.shape[0]},), got {depth.shape}")

    cls = _point_class(mask_id, mask_class)
    usable = (cls >= 0) & np.isfinite(xyz).all(axis=1) & np.isfinite(depth)
    seeds = usable & (labels == cls)
    cand = usable & ~seeds
    if cfg.protect_confident:
        cand &= labels < 0

    out = labels.copy()
    component = np.where(seeds, mask_id, -1).astype(np.int64)
    frontier = np.flatnonzero(seeds)
    remaining = np.flatnonzero(cand)
    if frontier.size == 0 or remaining.size == 0:
        return _finish(labels, out, component, rounds=0)

    radius = propagation_radius(xyz[remaining], sensor, cfg)
    gate = np.maximum(cfg.gapp_depth_abs_m, cfg.gapp_depth_rel * depth[remaining])
    r_max = float(radius.max())
    # 4th coordinate keeps masks apart: another mask's member is >= separation > r_max away.
    separation = 2.0 * r_max + 1.0
    coords = np.zeros((xyz.shape[0], 4), dtype=np.float64)
    coords[:, :3] = xyz
    coords[:, 3] = np.maximum(mask_id, 0) * separation
    # Nearest member so far per remaining candidate (distance, that member's depth): the set
    # only grows, so comparing against each round's new members alone keeps this exact.
    best_d = np.full(remaining.shape[0], np.inf)
    best_depth = np.zeros(remaining.shape[0])

    rounds = 0
    for _ in range(int(cfg.gapp_max_rounds)):
        tree = cKDTree(coords[frontier])
        d, j = tree.query(coords[remaining], k=1, distance_upper_bound=r_max)
        closer = np.isfinite(d) & (d < best_d)
        best_d = np.where(closer, d, best_d)
        best_depth = np.where(closer, depth[frontier[np.minimum(j, frontier.size - 1)]], best_depth)
        ok = (best_d <= radius) & (np.abs(depth[remaining] - best_depth) <= gate)
        if not ok.any():
            break
        new = remaining[ok]
        out[new] = cls[new]
        component[new] = mask_id[new]
        rounds += 1
        keep = ~ok
        frontier, remaining = new, remaining[keep]
        best_d, best_depth, radius, gate = best_d[keep], best_depth[keep], radius[keep], gate[keep]
        if remaining.size == 0:
            break
    return _finish(labels, out, component, rounds=rounds)
