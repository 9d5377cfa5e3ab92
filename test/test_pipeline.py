"""Segmenter on a real KITTI frame with a small random network (shapes, geometry, timings)."""

import numpy as np
import pytest

from pl3d_ros.frame import CameraModel
from pl3d_ros.geometry import project_points
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.inputs import fit_camera
from pl3d_ros.pipeline import Segmenter
from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend
from pl3d_ros.runtime.torch_backend import TorchBackend
from fakes import header, small_model


def test_fit_camera_scales_then_crops_like_the_image():
    cam = CameraModel(np.array([[700.0, 0, 620.0], [0, 700.0, 187.0], [0, 0, 1]]), 1241, 376)
    fitted, size, offset = fit_camera(cam, 640, 192)
    assert size == (640, 194) and offset == (0, 1)
    pts = np.array([[1.0, 0.5, 10.0], [-3.0, -0.8, 20.0]])
    uv_full = project_points(pts, cam).uv
    uv_fit = project_points(pts, fitted).uv
    s = 640 / 1241  # rounding of the resized height changes the vertical scale slightly
    sy = 194 / 376
    np.testing.assert_allclose(uv_fit[:, 0], (uv_full[:, 0] + 0.5) * s - 0.5, atol=1e-9)
    np.testing.assert_allclose(uv_fit[:, 1], (uv_full[:, 1] + 0.5) * sy - 0.5 - 1, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_segmenter_on_a_kitti_frame(kitti00, backend):
    frame = KittiSequence(kitti00).frame(0)
    model, h = small_model(), header()
    be = (TorchBackend(model, h.input_shapes, device="cpu") if backend == "torch"
          else OnnxRuntimeBackend(model, h, providers=["CPUExecutionProvider"]))
    pred = Segmenter(be, h, "product").infer(frame)
    n = frame.num_points
    assert pred.labels.shape == (n,) and pred.labels.max() < 10
    assert 0.10 < pred.in_view.mean() < 0.25  # ~15% of a KITTI scan is in image_2's view
    assert pred.labels_2d.shape == (pred.in_view.sum(),) and pred.labels_3d.shape == (n,)
    assert pred.labels_2d.max() < 10 and pred.labels_3d.max() < 10
    out = ~pred.in_view
    np.testing.assert_array_equal(pred.labels[out], pred.labels_3d[out])  # out of view: the 3D branch alone
    assert np.all((pred.confidence > 0) & (pred.confidence <= 1.0 + 1e-6))
    assert set(pred.timings_ms) == {"preprocess", "inference", "postprocess", "total"}
    assert pred.stamp_ns == frame.stamp_ns
