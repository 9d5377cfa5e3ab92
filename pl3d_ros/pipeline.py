"""Segmenter: Frame -> Prediction, over any Backend.

preprocess   image resized + centre-cropped to the network's input size (camera K adjusted the same
             way), points projected into that input image, spherical range image of the cloud
inference    backend.run: both branches in one graph (one engine launch on a GPU)
postprocess  per-point logits (range cell of each point; bilinear image sample at each in-view
             point's pixel), softmax, entropy-weighted fusion, labels and confidence
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pl3d_ros.frame import CameraModel, Frame, Prediction
from pl3d_ros.geometry import RangeProjection, project_points, range_image_channels, range_projection
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.models.points import fuse, gather_cells, sample_pixels
from pl3d_ros.runtime.base import Backend


@dataclass
class Prepared:
    """A frame turned into network inputs, and what maps the outputs back to points.

    inputs: {"image": (1, 3, H, W), "range_image": (1, 5, rows, cols)} float32
    camera: the CameraModel of the network's input image
    in_view: (N,) bool, points inside the input image; uv: (M, 2) their pixels (input image)
    proj: the range projection (every point's cell)
    """

    inputs: dict[str, np.ndarray]
    camera: CameraModel
    in_view: np.ndarray
    uv: np.ndarray
    proj: RangeProjection


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
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 in [0, 1]: antialiased resize to ``size`` (w, h),
    then the out_wh crop at ``offset`` (x0, y0). Shared by training and inference, so both see
    exactly the same pixels."""
    if not image.flags.writeable:  # decoded images and message buffers are read-only views
        image = image.copy()
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255.0)
    t = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    x0, y0 = offset
    return t[:, :, y0:y0 + out_wh[1], x0:x0 + out_wh[0]].clamp_(0.0, 1.0)


def prepare_image(image: np.ndarray, size: tuple[int, int], offset: tuple[int, int],
                  out_wh: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 in [0, 1]: antialiased resize to ``size``, then crop."""
    return np.ascontiguousarray(resize_crop(image, size, offset, out_wh).numpy())


class Segmenter:
    """Runs a two-stream network on Frames. Thread-safe as its backend is (see runtime.base)."""

    def __init__(self, backend: Backend, header: CheckpointHeader) -> None:
        self.backend = backend
        self.header = header
        self.num_classes = header.class_set.num_classes

    def preprocess(self, frame: Frame) -> Prepared:
        m = self.header.model
        camera, size, offset = fit_camera(frame.camera, m.image_width, m.image_height)
        image = prepare_image(frame.image, size, offset, (m.image_width, m.image_height))
        proj = project_points(frame.points, camera)
        proj3d = range_projection(frame.points, self.header.sensor)
        range_image = range_image_channels(frame.points, proj3d)[None]
        return Prepared({"image": image, "range_image": np.ascontiguousarray(range_image, np.float32)},
                        camera, proj.in_view, proj.uv[proj.in_view], proj3d)

    def postprocess(self, prep: Prepared, outputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """-> (fused (N, C), prob_2d (M, C), prob_3d (N, C)) probabilities."""
        logits_3d = gather_cells(torch.from_numpy(outputs["logits_3d"]),
                                 torch.from_numpy(prep.proj.rows.astype(np.int64)),
                                 torch.from_numpy(prep.proj.cols.astype(np.int64)))
        logits_2d = sample_pixels(torch.from_numpy(outputs["logits_2d"]), torch.from_numpy(prep.uv))
        prob_3d = logits_3d.softmax(-1)
        prob_2d = logits_2d.softmax(-1)
        in_view = torch.from_numpy(prep.in_view)
        return fuse(prob_2d, prob_3d, in_view), prob_2d, prob_3d

    def infer(self, frame: Frame) -> Prediction:
        t0 = time.perf_counter()
        prep = self.preprocess(frame)
        t1 = time.perf_counter()
        outputs = self.backend.run(prep.inputs)
        t2 = time.perf_counter()
        fused, prob_2d, prob_3d = self.postprocess(prep, outputs)
        confidence, labels = fused.max(-1)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                   "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return Prediction(labels.numpy().astype(np.uint8), confidence.numpy(), prep.in_view,
                          prob_2d.numpy(), prob_3d.numpy(), timings, frame.stamp_ns)
