"""Network inputs: a Frame as the two-stream network takes it, and the way back from the
network's dense outputs to per-point values.

Built once per frame by inference (``Segmenter``) and handed on to the adapter, so adaptation
trains on exactly the tensors inference ran on; training builds the same container from its
augmented frames. Everything per point happens here, for every caller:

    image         resized to cover the input size, centre-cropped (camera K adjusted the same way)
    range image   spherical projection, nearest point per cell (geometry.range_projection)
    rows, cols    every point's range-image cell          -> gather_cells on 3D outputs
    uv, in_view   in-view points' pixels in the input image -> bilinear sample of 2D outputs
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pl3d_ros.config import RangeImageConfig
from pl3d_ros.frame import CameraModel, Frame
from pl3d_ros.geometry import project_points, range_image_channels, range_projection
from pl3d_ros.models.points import fuse, gather_cells, sample_pixels


def cover_size(camera: CameraModel, width: int, height: int, zoom: float = 1.0) -> tuple[int, int]:
    """(w, h) of the image scaled, keeping its aspect, to cover width x height, times ``zoom``."""
    scale = max(width / camera.width, height / camera.height) * zoom
    return max(width, round(camera.width * scale)), max(height, round(camera.height * scale))


def fit_camera(camera: CameraModel, width: int, height: int) -> tuple[CameraModel, tuple[int, int], tuple[int, int]]:
    """Scale to cover width x height, then centre-crop: (camera, resized (w, h), crop offset (x0, y0))."""
    rw, rh = cover_size(camera, width, height)
    x0, y0 = (rw - width) // 2, (rh - height) // 2
    return camera.resized(rw, rh).cropped(x0, y0, width, height), (rw, rh), (x0, y0)


def resize_crop(image: np.ndarray, size: tuple[int, int], offset: tuple[int, int],
                out_wh: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 in [0, 1] (a view, not contiguous): antialiased
    resize to ``size`` (w, h), then the out_wh crop at ``offset`` (x0, y0). Shared by training and
    inference, so both see exactly the same pixels."""
    if not image.flags.writeable:  # decoded images and message buffers are read-only views
        image = image.copy()
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255.0)
    t = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    x0, y0 = offset
    return t[:, :, y0:y0 + out_wh[1], x0:x0 + out_wh[0]].clamp_(0.0, 1.0)


@dataclass
class NetworkInputs:
    """One frame as the network takes it, and the map from its outputs back to the points.

    image: (1, 3, H, W) float32 RGB in [0, 1]; range_image: (1, 5, rows, cols) float32 range,
    x, y, z (m), intensity, 0 in empty cells. rows, cols: (N,) int64 range-image cell of every
    point. uv: (M, 2) float64 pixel (u, v) of each in-view point in the network-input image
    (pixel centres at integers). in_view: (N,) bool. camera: the network-input camera.
    """

    image: torch.Tensor
    range_image: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    uv: torch.Tensor
    in_view: torch.Tensor
    camera: CameraModel

    @property
    def num_points(self) -> int:
        return int(self.rows.shape[0])

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device: torch.device | str) -> NetworkInputs:
        """The same inputs on ``device`` (no copy when they are there already)."""
        dev = torch.device(device)
        if self.device == dev:
            return self
        return NetworkInputs(self.image.to(dev), self.range_image.to(dev), self.rows.to(dev),
                             self.cols.to(dev), self.uv.to(dev), self.in_view.to(dev), self.camera)

    def arrays(self) -> dict[str, np.ndarray]:
        """The backend feed: {"image", "range_image"} as float32 numpy views (CPU tensors)."""
        return {"image": self.image.numpy(), "range_image": self.range_image.numpy()}


def prepare(frame: Frame, image_size: tuple[int, int], sensor: RangeImageConfig) -> NetworkInputs:
    """Frame -> NetworkInputs for a network with a (width, height) image input and ``sensor``'s
    range image (both from the checkpoint header)."""
    width, height = image_size
    camera, size, offset = fit_camera(frame.camera, width, height)
    image = resize_crop(frame.image, size, offset, (width, height)).contiguous()
    proj = project_points(frame.points, camera)
    proj3d = range_projection(frame.points, sensor)
    range_image = np.ascontiguousarray(range_image_channels(frame.points, proj3d)[None], np.float32)
    return NetworkInputs(
        image=image,
        range_image=torch.from_numpy(range_image),
        rows=torch.from_numpy(proj3d.rows.astype(np.int64)),
        cols=torch.from_numpy(proj3d.cols.astype(np.int64)),
        uv=torch.from_numpy(np.ascontiguousarray(proj.uv[proj.in_view])),
        in_view=torch.from_numpy(proj.in_view),
        camera=camera,
    )


@dataclass
class PointOutputs:
    """A network's outputs at the points of one frame.

    logits_2d (M, C) and feat_2d (M, F2) at the in-view points; logits_3d (N, C) and feat_3d
    (N, F3) at every point (features None when only logits were computed).
    """

    logits_2d: torch.Tensor
    logits_3d: torch.Tensor
    feat_2d: torch.Tensor | None = None
    feat_3d: torch.Tensor | None = None

    def float(self) -> PointOutputs:
        """The same outputs in float32 (after a bf16 autocast forward); no copy when already."""
        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.dtype == torch.float32 else t.float()

        if all(t is None or t.dtype == torch.float32 for t in (self.logits_2d, self.logits_3d, self.feat_2d, self.feat_3d)):
            return self
        return PointOutputs(f(self.logits_2d), f(self.logits_3d), f(self.feat_2d), f(self.feat_3d))

    def probs(self, in_view: torch.Tensor, bias: torch.Tensor | tuple[float, float] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (prob_2d (M, C), prob_3d (N, C), fused (N, C)): softmax per branch, then the
        entropy-weighted fusion that inference deploys (``bias``: its branch log-weights)."""
        p2 = self.logits_2d.softmax(dim=1)
        p3 = self.logits_3d.softmax(dim=1)
        return p2, p3, fuse(p2, p3, in_view, bias)


def point_outputs(inputs: NetworkInputs, logits_2d: torch.Tensor, logits_3d: torch.Tensor,
                  feat_2d: torch.Tensor | None = None, feat_3d: torch.Tensor | None = None) -> PointOutputs:
    """Dense outputs of one frame -> per-point values: logits_2d (1, C, H, W) and feat_2d
    (1, F2, h, w) sampled bilinearly at the in-view pixels (uv are input-image pixels, so a
    coarser feature map is sampled at the same places); logits_3d / feat_3d (1, *, rows, cols)
    read at each point's cell."""
    size = tuple(inputs.image.shape[-2:])
    return PointOutputs(
        logits_2d=sample_pixels(logits_2d, inputs.uv, size),
        logits_3d=gather_cells(logits_3d, inputs.rows, inputs.cols),
        feat_2d=None if feat_2d is None else sample_pixels(feat_2d, inputs.uv, size),
        feat_3d=None if feat_3d is None else gather_cells(feat_3d, inputs.rows, inputs.cols),
    )


def forward_points(model: torch.nn.Module, inputs: NetworkInputs) -> PointOutputs:
    """Run ``model.forward_features`` on one frame and sample per point (gradients follow the
    caller's mode: wrap in torch.no_grad for a teacher)."""
    l2, l3, f2, f3 = model.forward_features(inputs.image, inputs.range_image)
    return point_outputs(inputs, l2, l3, f2, f3)
