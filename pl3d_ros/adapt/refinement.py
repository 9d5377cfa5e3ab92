"""Glue between the adaptation step and ``pl3d_ros.refine`` (METHODS.md sections 1-2).

Masks are computed on the ORIGINAL frame image (full resolution, the camera the frame came with),
so the points are projected with ``frame.camera``, not with the network-input camera. SAM and
MobileSAM run on every ``refine.sam_every_k_frames``-th frame (they are slow; a frame without
masks trains on its base pseudo-labels), superpixels on every frame. Masks of an older frame are
never reused: the scene has moved.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pl3d_ros.adapt.state import CameraPixels, FrameState
from pl3d_ros.config import Config, RangeImageConfig
from pl3d_ros.refine.accumulate import ScanHistory

#: Occlusion test of accumulated points: cells of this many pixels, and how far behind the
#: nearest current point of a cell a point may lie and still be seen (max(abs, rel * depth)).
OCCLUSION_CELL_PX = 4
OCCLUSION_ABS_M, OCCLUSION_REL = 0.5, 0.05


def _not_occluded(proj: Any, current: CameraPixels, width: int, height: int) -> np.ndarray:
    """(K,) bool: projected points not behind this scan's nearest point in their pixel cell (a
    wall seen now hides what an earlier scan saw behind it). Cells this scan left empty pass."""
    cw, ch = -(-width // OCCLUSION_CELL_PX), -(-height // OCCLUSION_CELL_PX)
    nearest = np.full(cw * ch, np.inf)
    cur = current.pixels[current.in_view] // OCCLUSION_CELL_PX
    np.minimum.at(nearest, cur[:, 1] * cw + cur[:, 0], current.depth[current.in_view].astype(np.float64))
    pix = proj.pixels(width, height) // OCCLUSION_CELL_PX
    limit = nearest[pix[:, 1] * cw + pix[:, 0]]
    depth = np.nan_to_num(proj.depth, nan=np.inf)
    return depth <= limit + np.maximum(OCCLUSION_ABS_M, OCCLUSION_REL * limit)


def is_sam_provider(provider: Any) -> bool:
    """Whether a mask provider is SAM / MobileSAM (slow: every k-th frame) rather than superpixels."""
    kind = getattr(provider, "kind", None) or getattr(provider, "name", None) or type(provider).__name__
    return "sam" in str(kind).lower()


class RefinementStage:
    """Masks -> MLA (+ GAPP) -> components; and the connectivity filter over components.

    sensor: the range-image geometry of the model (GAPP's vertical resolution).
    gapp: False runs naive MLA (every point of a kept mask takes its class).
    connectivity: whether ``filter`` runs the SeCo component filter (else keeps everything).
    mask_provider: any object with ``masks(image (H, W, 3) uint8) -> (H, W) int32``; None builds
    one from ``cfg.refine``.
    """

    def __init__(self, cfg: Config, sensor: RangeImageConfig, *, gapp: bool = True, connectivity: bool = True,
                 mask_provider: Any = None, device: str = "cpu") -> None:
        from pl3d_ros import refine  # imported here: methods without refinement never need it
        from pl3d_ros.refine import connectivity as refine_connectivity
        from pl3d_ros.refine import masks as refine_masks

        self.cfg = cfg
        self.sensor = sensor
        self.gapp = bool(gapp)
        self._refine = refine.refine_with_masks
        self.provider = (mask_provider if mask_provider is not None
                         else refine_masks.build_mask_provider(cfg.refine, device=device))
        self.every = int(cfg.refine.sam_every_k_frames) if is_sam_provider(self.provider) else 1
        self.component_filter = refine_connectivity.ComponentFilter(cfg.connectivity) if connectivity else None
        r = cfg.refine
        self.history = ScanHistory(r.accumulate_scans, r.accumulate_voxel_m) if r.accumulate_scans > 0 else None

    def reset(self) -> None:
        """Forget the connectivity filter's loss buffer and the scan history (after a restore to
        the source: the history's labels came from the old teacher)."""
        if self.component_filter is not None:
            self.component_filter.reset()
        if self.history is not None:
            self.history.reset()

    def due(self, index: int) -> bool:
        """Whether frame number ``index`` gets masks."""
        return index % self.every == 0

    def refine(self, state: FrameState, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """base (N,) int64 pseudo-labels (-1 none) -> (labels (N,) int64, component (N,) int64 -1
        none, stats), on the frame's device. The points' masks are kept in ``state.masks``.

        With ``refine.accumulate_scans`` k > 0 and a pose on the frame, the last k scans (with
        their own base labels) are brought into this frame and refined together with it: more
        points per mask, so more masks pass MLA's rules and GAPP has a denser cloud to grow
        through; only this frame's points keep their labels."""
        from pl3d_ros.refine import PointMasks

        frame = state.frame
        cam = state.camera_pixels()
        mask_image = np.asarray(self.provider.masks(frame.image), dtype=np.int32)
        state.masks = PointMasks.of(cam.pixels, cam.in_view, mask_image)
        base_np = base.cpu().numpy().astype(np.int64)
        extra = self._history_points(state, mask_image) if self.history is not None else None
        if self.history is not None:
            self.history.add(frame.points[:, :3], frame.pose, base_np, frame.stamp_ns)
        if extra is None:
            return self.relabel(state, base)
        pts, depth, mask_id, labels = extra
        n = frame.num_points
        masks = PointMasks(np.concatenate([state.masks.mask_id, mask_id]), state.masks.areas, state.masks.image_area)
        result = self._refine(np.concatenate([np.asarray(frame.points[:, :3], np.float32), pts]),
                              np.concatenate([cam.depth, depth]), masks, np.concatenate([base_np, labels]),
                              self.sensor, self.cfg.refine, gapp=self.gapp)
        stats = dict(result.stats)
        stats["accumulated_points"] = int(pts.shape[0])
        dev = base.device
        return (torch.from_numpy(np.asarray(result.labels[:n], np.int64)).to(dev),
                torch.from_numpy(np.asarray(result.component[:n], np.int64)).to(dev), stats)

    def _history_points(self, state: FrameState, mask_image: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The held scans' points that this frame's camera sees and that are not hidden behind
        this scan's surfaces: (points (K, 3) float32, depth (K,), mask id (K,), labels (K,)), or
        None (no history, no pose)."""
        from pl3d_ros.geometry import project_points

        frame = state.frame
        pts, labels, _ = self.history.recent(frame.pose)
        if pts.shape[0] == 0:
            return None
        cam = frame.camera
        proj = project_points(pts, cam)
        visible = proj.in_view & _not_occluded(proj, state.camera_pixels(), cam.width, cam.height)
        if not visible.any():
            return None
        pix = proj.pixels(cam.width, cam.height)[visible]
        return (pts[visible], proj.depth[visible].astype(np.float32), mask_image[pix[:, 1], pix[:, 0]].astype(np.int64),
                labels[visible])


    def relabel(self, state: FrameState, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """``refine`` with the frame's masks already known (state.masks): MLA + GAPP only, e.g.
        a memory frame's labels after the teacher changed."""
        frame = state.frame
        result = self._refine(
            np.ascontiguousarray(frame.points[:, :3], dtype=np.float32), state.camera_pixels().depth, state.masks,
            base.cpu().numpy().astype(np.int64), self.sensor, self.cfg.refine, gapp=self.gapp)
        dev = base.device
        labels = torch.from_numpy(np.asarray(result.labels, np.int64)).to(dev)
        component = torch.from_numpy(np.asarray(result.component, np.int64)).to(dev)
        return labels, component, dict(result.stats)

    def filter(self, component: torch.Tensor, labels: torch.Tensor,
               point_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """(N,) component, (N,) labels, (N,) per-point student loss -> (keep (N,) bool, stats).
        A frame without components (no masks this frame) is not buffered."""
        keep = torch.ones_like(labels, dtype=torch.bool)
        if self.component_filter is None or not bool((component >= 0).any()):
            return keep, {}
        k = self.component_filter.filter(component.cpu().numpy(), labels.cpu().numpy(),
                                         point_loss.detach().float().cpu().numpy())
        stats = {k_: v for k_, v in self.component_filter.last_stats.items() if isinstance(v, (int, float))}
        return torch.from_numpy(np.asarray(k, dtype=bool)).to(labels.device), stats
