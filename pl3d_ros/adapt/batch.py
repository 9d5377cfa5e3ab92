"""One frame as the adaptation step sees it, and per-point network outputs.

``make_batch`` runs the segmenter's own preprocessing (so adaptation trains on exactly the inputs
inference sees) and moves the tensors to the adaptation device. ``forward_points`` runs a
network on a batch and samples its dense outputs at the points the same way inference does
(range cell of each point; bilinear image sample at each in-view pixel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pl3d_ros.frame import Frame
from pl3d_ros.geometry import project_points
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.models.points import fuse, gather_cells, sample_pixels

if TYPE_CHECKING:  # pipeline may wire the adapter in: import it lazily to avoid a cycle
    from pl3d_ros.pipeline import Prepared


@dataclass
class Batch:
    """Tensors of one frame on the adaptation device.

    image (1, 3, H, W), range_image (1, 5, rows, cols): network inputs.
    rows, cols: (N,) int64 range cell of every point. uv: (M, 2) float32 pixel of each in-view
    point in the network-input image. in_view: (N,) bool.
    gt: (N,) int64 ground-truth train ids, -1 where unknown or ignored; None without labels.
        Only ever used for reporting pseudo-label quality, never for training.
    index: running frame number in the adapter; round: inner step on this frame (0-based).
    cache: per-frame results a method computes in round 0 and reuses in later rounds.
    """

    frame: Frame
    prepared: "Prepared"
    image: torch.Tensor
    range_image: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    uv: torch.Tensor
    in_view: torch.Tensor
    gt: torch.Tensor | None = None
    index: int = 0
    round: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.rows.shape[0])

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def camera_projection(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projection into the ORIGINAL image (the one masks are computed on), cached:
        (pixels (N, 2) int64 (u, v) clipped into the image, depth (N,) float32 metres,
        in_view (N,) bool)."""
        if "camera_projection" not in self.cache:
            cam = self.frame.camera
            proj = project_points(self.frame.points[:, :3], cam)
            uv = np.nan_to_num(proj.uv, nan=0.0, posinf=0.0, neginf=0.0)
            pix = np.floor(uv + 0.5).astype(np.int64)  # nearest pixel (pixel centres at integers)
            pix[:, 0] = np.clip(pix[:, 0], 0, cam.width - 1)
            pix[:, 1] = np.clip(pix[:, 1], 0, cam.height - 1)
            self.cache["camera_projection"] = (pix, proj.depth.astype(np.float32), proj.in_view)
        return self.cache["camera_projection"]


def make_batch(frame: Frame, header: CheckpointHeader, device: torch.device | str, index: int = 0) -> Batch:
    """Frame -> Batch, with the segmenter's preprocessing (the backend is not needed for it)."""
    from pl3d_ros.pipeline import Segmenter

    prep = Segmenter(None, header).preprocess(frame)  # type: ignore[arg-type]
    dev = torch.device(device)
    gt = None
    if frame.labels is not None:
        cs = header.class_set
        ids = cs.to_train_ids(frame.labels).astype(np.int64)
        ids[ids == cs.ignore_index] = -1
        gt = torch.from_numpy(ids).to(dev)
    return Batch(
        frame=frame,
        prepared=prep,
        image=torch.from_numpy(prep.inputs["image"]).to(dev),
        range_image=torch.from_numpy(prep.inputs["range_image"]).to(dev),
        rows=torch.from_numpy(prep.proj.rows.astype(np.int64)).to(dev),
        cols=torch.from_numpy(prep.proj.cols.astype(np.int64)).to(dev),
        uv=torch.from_numpy(np.asarray(prep.uv, dtype=np.float32)).to(dev),
        in_view=torch.from_numpy(prep.in_view).to(dev),
        gt=gt,
        index=index,
    )


@dataclass
class PointOutputs:
    """A network's outputs at the points of a batch.

    logits_2d (M, C) and feat_2d (M, F2) at the in-view points; logits_3d (N, C) and feat_3d
    (N, F3) at every point.
    """

    logits_2d: torch.Tensor
    logits_3d: torch.Tensor
    feat_2d: torch.Tensor
    feat_3d: torch.Tensor

    def probs(self, in_view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (prob_2d (M, C), prob_3d (N, C), fused (N, C)) with the inference fusion."""
        p2 = self.logits_2d.softmax(dim=1)
        p3 = self.logits_3d.softmax(dim=1)
        return p2, p3, fuse(p2, p3, in_view)


def forward_points(model: nn.Module, batch: Batch) -> PointOutputs:
    """Run ``model.forward_features`` on the batch and sample per point (grad follows the caller's
    mode: wrap in torch.no_grad for the teacher and the source)."""
    l2, l3, f2, f3 = model.forward_features(batch.image, batch.range_image)
    return PointOutputs(
        logits_2d=sample_pixels(l2, batch.uv),
        logits_3d=gather_cells(l3, batch.rows, batch.cols),
        feat_2d=sample_pixels(f2, batch.uv),
        feat_3d=gather_cells(f3, batch.rows, batch.cols),
    )
