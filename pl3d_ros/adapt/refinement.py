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

from pl3d_ros.adapt.state import FrameState
from pl3d_ros.config import Config, RangeImageConfig


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

    def reset(self) -> None:
        """Forget the connectivity filter's loss buffer (after a restore to the source)."""
        if self.component_filter is not None:
            self.component_filter.reset()

    def due(self, index: int) -> bool:
        """Whether frame number ``index`` gets masks."""
        return index % self.every == 0

    def refine(self, state: FrameState, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """base (N,) int64 pseudo-labels (-1 none) -> (labels (N,) int64, component (N,) int64 -1
        none, stats), on the frame's device. The points' masks are kept in ``state.masks``."""
        from pl3d_ros.refine import PointMasks

        cam = state.camera_pixels()
        mask_image = np.asarray(self.provider.masks(state.frame.image), dtype=np.int32)
        state.masks = PointMasks.of(cam.pixels, cam.in_view, mask_image)
        return self.relabel(state, base)

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
