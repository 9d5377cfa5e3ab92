"""The fast pre/post-processing (issue 14) against the implementation it replaced, and the torch
device path against the numpy CPU path (on CPU tensors here; on a GPU where there is one).

The ``_ref_*`` functions are the pre-issue-14 code, kept here verbatim as the reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pl3d_ros.frame import CameraModel, Frame
from pl3d_ros.geometry import (nearest_per_cell, project_in_view, project_points, range_image_channels,
                               range_projection)
from pl3d_ros.inputs import (NetworkInputs, fit_camera, point_outputs, point_predictions, prepare, prepare_on,
                             resize_crop)
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.models.points import IMAGE_ONLY, RANGE_ONLY, Fusion, max_argmax
from pl3d_ros.pipeline import Segmenter
from pl3d_ros.registry import FUSION_RULES
from pl3d_ros.runtime.torch_backend import TorchBackend
from fakes import header, small_model, synthetic_frame

SIZE = (640, 192)


# -- the replaced implementations ------------------------------------------------------------------


def _ref_cell_to_point(proj) -> np.ndarray:
    """The stable argsort of packed (cell, float32 range) keys that range_projection used."""
    n_rows, n_cols = proj.shape
    idx = np.flatnonzero(proj.valid)
    cell = (proj.rows[idx].astype(np.uint64) * np.uint64(n_cols) + proj.cols[idx].astype(np.uint64))
    key = (cell << np.uint64(32)) | proj.range[idx].view(np.uint32).astype(np.uint64)
    order = np.argsort(key, kind="stable")
    cell_sorted = cell[order]
    first = np.ones(cell_sorted.shape[0], dtype=bool)
    first[1:] = cell_sorted[1:] != cell_sorted[:-1]
    out = np.full(n_rows * n_cols, -1, dtype=np.int32)
    out[cell_sorted[first]] = idx[order[first]]
    return out.reshape(n_rows, n_cols)


def _ref_resize_crop(image: np.ndarray, size, offset, out_wh) -> torch.Tensor:
    """The float antialiased resize of the whole image, then the crop."""
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div_(255.0)
    t = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    x0, y0 = offset
    return t[:, :, y0:y0 + out_wh[1], x0:x0 + out_wh[0]].clamp_(0.0, 1.0)


def _ref_prepare(frame: Frame, image_size, sensor) -> NetworkInputs:
    width, height = image_size
    camera, size, offset = fit_camera(frame.camera, width, height)
    image = _ref_resize_crop(frame.image, size, offset, (width, height)).contiguous()
    proj = project_points(frame.points, camera)
    proj3d = range_projection(frame.points, sensor)
    values = np.concatenate([proj3d.range[:, None], frame.points.astype(np.float32)], axis=1)
    return NetworkInputs(image, torch.from_numpy(proj3d.image(values)[None]),
                         torch.from_numpy(proj3d.rows.astype(np.int64)), torch.from_numpy(proj3d.cols.astype(np.int64)),
                         torch.from_numpy(np.ascontiguousarray(proj.uv[proj.in_view])),
                         torch.from_numpy(proj.in_view), camera)


def _ref_postprocess(inputs: NetworkInputs, l2: torch.Tensor, l3: torch.Tensor, bias=None, rule="product"):
    p2, p3, fused = point_outputs(inputs, l2, l3).probs(inputs.in_view, bias, rule=rule)
    conf, labels = fused.max(-1)
    return p2, p3, fused, labels, conf


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kitti_frames(kitti00):
    seq = KittiSequence(kitti00)
    return [seq.frame(0), seq.frame(3)]


def _distorted(frame: Frame) -> Frame:
    cam = frame.camera
    distorted = CameraModel(cam.K, cam.width, cam.height, cam.T_cam_lidar, "plumb_bob",
                            np.array([-0.28, 0.09, 1e-3, -5e-4, -0.01]))
    return dataclasses.replace(frame, camera=distorted)


def _with_bad_points(frame: Frame) -> Frame:
    """NaN, origin and duplicated points (ties of range in one cell)."""
    pts = frame.points.copy()
    pts[5] = np.nan
    pts[6, :3] = 0.0
    pts[100:110] = pts[200]  # ten copies of one point: equal ranges in one cell, lowest index wins
    return dataclasses.replace(frame, points=pts)


# -- CPU path against the reference --------------------------------------------------------------


def test_nearest_per_cell_picks_the_argsort_winners(kitti_frames):
    h = header()
    for frame in [*kitti_frames, _with_bad_points(kitti_frames[0]), synthetic_frame(1)]:
        proj = range_projection(frame.points, h.sensor)
        np.testing.assert_array_equal(proj.cell_to_point, _ref_cell_to_point(proj))
    proj = range_projection(_with_bad_points(kitti_frames[0]).points, h.sensor)
    assert proj.cell_to_point[proj.rows[200], proj.cols[200]] in (100, -1) or proj.range[100] > 0


def _spherical_cells(xyz: np.ndarray, cfg) -> tuple[np.ndarray, ...]:
    """RangeNet++'s arithmetic, verbatim, in xyz's dtype -> (rows, cols, range, valid, in_fov)."""
    one = xyz.dtype.type
    rng = np.sqrt((xyz * xyz).sum(1))
    valid = np.isfinite(rng) & (rng > 0)
    safe = np.where(valid[:, None], xyz, np.array([1.0, 0.0, 0.0], xyz.dtype))
    safe_rng = np.where(valid, rng, one(1.0))
    yaw = np.arctan2(safe[:, 1], safe[:, 0])
    pitch = np.arcsin(np.clip(safe[:, 2] / safe_rng, -1.0, 1.0))
    col = np.floor(0.5 * (1.0 - yaw / np.pi) * cfg.cols)
    row = np.floor((1.0 - (pitch - cfg.fov_down) / (cfg.fov_up - cfg.fov_down)) * cfg.rows)
    in_fov = valid & (pitch >= cfg.fov_down) & (pitch <= cfg.fov_up)
    return (np.clip(row, 0, cfg.rows - 1).astype(np.int32), np.clip(col, 0, cfg.cols - 1).astype(np.int32),
            rng.astype(np.float32), valid, in_fov)


def test_range_cells_as_rangenet_computes_them(kitti_frames):
    """rows / cols / range of range_projection: RangeNet++'s float32 arithmetic (up to the
    order of the squares' sum), and within a handful of points of the same in float64."""
    cfg = header().sensor
    for frame in (kitti_frames[0], _with_bad_points(kitti_frames[1])):
        proj = range_projection(frame.points, cfg)
        rows, cols, rng, valid, in_fov = _spherical_cells(frame.points[:, :3].astype(np.float32), cfg)
        moved = (proj.rows != rows) | (proj.cols != cols)
        assert int(moved.sum()) <= 2
        np.testing.assert_allclose(proj.range, rng, rtol=2e-7, atol=0)
        np.testing.assert_array_equal(proj.valid, valid)
        assert int((proj.in_fov != in_fov).sum()) <= 2
        rows64, cols64, rng64, valid64, _ = _spherical_cells(frame.points[:, :3].astype(np.float64), cfg)
        moved64 = (proj.rows != rows64) | (proj.cols != cols64)
        assert int(moved64.sum()) <= frame.num_points // 5000  # points within ~1e-5 of a cell border
        np.testing.assert_allclose(proj.range, rng64, rtol=3e-7, atol=0)
        np.testing.assert_array_equal(proj.valid, valid64)


def test_nearest_per_cell_ties_and_empty():
    rows = np.array([0, 0, 0, 1], np.int32)
    cols = np.array([1, 1, 1, 0], np.int32)
    rng = np.array([2.0, 1.0, 1.0, 3.0], np.float32)
    valid = np.array([True, True, True, False])
    out = nearest_per_cell(rows, cols, rng, valid, (2, 2))
    np.testing.assert_array_equal(out, [[-1, 1], [-1, -1]])  # nearest, lowest index; invalid never wins


def test_range_image_channels_as_the_scatter_of_all_values(kitti_frames):
    frame = _with_bad_points(kitti_frames[1])
    proj = range_projection(frame.points, header().sensor)
    values = np.concatenate([proj.range[:, None], frame.points.astype(np.float32)], axis=1)
    np.testing.assert_array_equal(range_image_channels(frame.points, proj), proj.image(values))


@pytest.mark.parametrize("distort", [False, True])
def test_project_in_view_is_project_points_bit_for_bit(kitti_frames, distort):
    frame = _distorted(kitti_frames[0]) if distort else kitti_frames[0]
    camera = fit_camera(frame.camera, *SIZE)[0]
    full = project_points(frame.points, camera)
    in_view, uv = project_in_view(frame.points[:, :3].astype(np.float64), camera)
    assert full.in_view.sum() > 1000
    np.testing.assert_array_equal(in_view, full.in_view)
    np.testing.assert_array_equal(uv, full.uv[full.in_view])


def test_resize_crop_within_one_grey_level_of_the_float_resize(kitti_frames):
    img = kitti_frames[0].image
    g = np.random.default_rng(0)
    noise = g.integers(0, 256, img.shape, dtype=np.uint8)  # the worst case for the rounding
    for image in (img, noise):
        for size, offset, out in (((640, 194), (0, 1), SIZE), ((1600, 485), (300, 50), SIZE),
                                  ((1241, 376), (0, 0), (1241, 376))):
            new, ref = resize_crop(image, size, offset, out), _ref_resize_crop(image, size, offset, out)
            assert new.shape == ref.shape == (1, 3, out[1], out[0]) and new.dtype == torch.float32
            assert float((new - ref).abs().max()) <= 1.0 / 255 + 1e-6
            assert float((new - ref).abs().mean()) < 0.5 / 255  # rounding to grey levels ...
            assert abs(float((new - ref).mean())) < 0.05 / 255  # ... not a shift
    same = resize_crop(img, (1241, 376), (0, 0), (1241, 376))  # no resize: the exact pixels
    np.testing.assert_array_equal(same[0].permute(1, 2, 0).numpy(), img.astype(np.float32) / 255)


def test_prepare_matches_the_reference(kitti_frames):
    h = header()
    for frame in (kitti_frames[0], _with_bad_points(_distorted(kitti_frames[1]))):
        new, ref = prepare(frame, SIZE, h.sensor), _ref_prepare(frame, SIZE, h.sensor)
        for name in ("range_image", "rows", "cols", "uv", "in_view"):
            a, b = getattr(new, name), getattr(ref, name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if name == "uv":  # the camera transform is summed row by row, not by matmul
                torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
            else:
                assert torch.equal(a, b), name
        assert new.image.is_contiguous() and float((new.image - ref.image).abs().max()) <= 1.0 / 255 + 1e-6


def _random_logits(inputs: NetworkInputs, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = inputs.image.shape[-2:]
    rows, cols = inputs.range_image.shape[-2:]
    return torch.randn(1, c, h, w, generator=g) * 3, torch.randn(1, c, rows, cols, generator=g) * 3


def _clear(p: torch.Tensor, margin: float = 1e-5) -> torch.Tensor:
    """(K, C) probabilities -> (K,) bool, rows whose top class leads the next by more than
    ``margin`` (a near-tie may go either way within rounding)."""
    top2 = p.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) > margin


def _assert_same_predictions(new, ref, in_view: torch.Tensor) -> None:
    p2, p3, fused, labels, conf = ref
    torch.testing.assert_close(new.confidence, conf, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new.confidence[~in_view], p3[~in_view].amax(1), atol=1e-6, rtol=1e-5)  # 3D alone
    for mine, probs, want in ((new.labels, fused, labels), (new.labels_2d, p2, p2.argmax(1)),
                              (new.labels_3d, p3, p3.argmax(1))):
        clear = _clear(probs)
        assert mine.shape == want.shape and clear.float().mean() > 0.99
        assert torch.equal(mine[clear], want[clear])
    assert torch.equal(new.labels[~in_view], new.labels_3d[~in_view])


@pytest.mark.parametrize("grad", [False, True])  # numpy kernels / torch's (the device path's)
def test_max_argmax_is_torch_max_with_first_class_on_ties(grad):
    x = torch.tensor([[0.1, 0.5, 0.3], [0.7, 0.5, 0.3], [0.2, 0.0, 0.3]], requires_grad=grad)
    top, arg = max_argmax(x)
    torch.testing.assert_close(top.detach(), torch.tensor([0.7, 0.5, 0.3]))
    assert arg.tolist() == [1, 0, 0] and arg.dtype == torch.int64
    y = torch.randn(10, 5000, generator=torch.Generator().manual_seed(1)).requires_grad_(grad)
    ref = y.max(0)
    assert torch.equal(max_argmax(y)[0], ref.values) and torch.equal(max_argmax(y)[1], ref.indices)
    y = y.detach().clone()
    y[3, 7] = float("nan")
    assert max_argmax(y)[1][7] == 9  # a NaN column: the last class, never out of range


@pytest.mark.parametrize("grad", [False, True])
def test_top_class_is_the_argmax_and_maximum_of_the_softmax(grad):
    from pl3d_ros.models.points import top_class

    x = (torch.randn(10, 4000, generator=torch.Generator().manual_seed(2)) * 4).requires_grad_(grad)
    label, conf = top_class(x)
    ref = x.detach().softmax(0).max(0)
    assert torch.equal(label, ref.indices)
    torch.testing.assert_close(conf.detach(), ref.values, atol=1e-6, rtol=1e-5)


# a class only the range branch outputs (parking under a Cityscapes image branch), one only the image branch
_OWNED = Fusion("product", (0,) * 5 + (RANGE_ONLY,) + (0,) * 3 + (IMAGE_ONLY,))


@pytest.mark.parametrize("rule", [*FUSION_RULES, _OWNED])
@pytest.mark.parametrize("bias", [None, (-0.7, 0.3)])
def test_point_predictions_match_probs_and_fusion(kitti_frames, bias, rule):
    inputs = prepare(kitti_frames[0], SIZE, header().sensor)
    l2, l3 = _random_logits(inputs)
    new = point_predictions(inputs, l2, l3, bias, rule=rule)
    assert new.labels_2d.shape == (int(inputs.in_view.sum()),) and new.labels_3d.shape == (inputs.num_points,)
    _assert_same_predictions(new, _ref_postprocess(inputs, l2, l3, bias, rule), inputs.in_view)
    # the torch twin of the compiled loops (device tensors take it) agrees too
    twin = point_predictions(inputs, l2.requires_grad_(), l3, bias, rule=rule)
    _assert_same_predictions(twin, _ref_postprocess(inputs, l2.detach(), l3, bias, rule), inputs.in_view)


def test_segmenter_prediction_matches_the_reference_pipeline(kitti_frames, one_torch_thread):
    model, h = small_model(), header()
    seg = Segmenter(TorchBackend(model, h.input_shapes, device="cpu"), h, "product")
    seg.fusion_bias = (0.2, -0.1)
    for frame in kitti_frames:
        pred = seg.infer(frame)
        ref_inputs = _ref_prepare(frame, (h.model.image_width, h.model.image_height), h.sensor)
        outs = seg.backend.run(ref_inputs.arrays())
        ref = _ref_postprocess(ref_inputs, torch.from_numpy(outs["logits_2d"]), torch.from_numpy(outs["logits_3d"]),
                               seg.fusion_bias)
        np.testing.assert_array_equal(pred.in_view, ref_inputs.in_view.numpy())
        # The image differs by the uint8 rounding of the resize (<= 1/255): logits move a little.
        clear_3d = _clear(ref[1]).numpy()  # range branch: same input
        np.testing.assert_array_equal(pred.labels_3d[clear_3d], ref[1].argmax(1).numpy()[clear_3d])
        assert (pred.labels_2d == ref[0].argmax(1).numpy()).mean() > 0.99
        assert (pred.labels == ref[3].numpy()).mean() > 0.995
        assert pred.labels.dtype == np.uint8 and pred.confidence.dtype == np.float32


# -- the device path (torch), on CPU tensors ------------------------------------------------------------


def _assert_device_inputs_match(dev: NetworkInputs, cpu: NetworkInputs) -> None:
    n = cpu.num_points
    # atan2 / asin differ between numpy and torch in the last bit: a point within ~1e-13 of a cell
    # border may change cell. None do on these frames; allow a handful.
    moved = (dev.rows.cpu() != cpu.rows) | (dev.cols.cpu() != cpu.cols)
    assert int(moved.sum()) <= max(2, n // 20000)
    same_view = dev.in_view.cpu() == cpu.in_view
    assert int((~same_view).sum()) <= 2
    if bool(same_view.all()):
        torch.testing.assert_close(dev.uv.cpu(), cpu.uv, atol=1e-9, rtol=0)
    # the same winner in every cell (x, y, z, intensity), ranges within an ulp (torch's vectorised
    # sum of squares rounds differently from numpy's)
    cells_differ = (dev.range_image.cpu()[:, 1:] != cpu.range_image[:, 1:]).any(1).sum()
    assert int(cells_differ) <= 2 * int(moved.sum())
    torch.testing.assert_close(dev.range_image.cpu()[:, 0], cpu.range_image[:, 0], rtol=3e-7, atol=0)
    assert float((dev.image.cpu() - cpu.image).abs().max()) <= 1.0 / 255 + 1e-6
    assert dev.range_image.dtype == torch.float32 and dev.rows.dtype == torch.int64


def test_device_prepare_on_cpu_tensors_matches_numpy(kitti_frames):
    h = header()
    for frame in (kitti_frames[0], _with_bad_points(_distorted(kitti_frames[1])), synthetic_frame(2)):
        cpu = prepare(frame, SIZE, h.sensor)
        dev = prepare_on(frame, SIZE, h.sensor, "cpu")
        _assert_device_inputs_match(dev, cpu)


class _DeviceSegmenter(Segmenter):
    """A Segmenter that takes the device path (prepare_on, run_device) on CPU tensors."""

    def preprocess(self, frame):
        m = self.header.model
        return prepare_on(frame, (m.image_width, m.image_height), self.header.sensor, self.device)

    def run(self, inputs):
        return self.backend.run_device({"image": inputs.image, "range_image": inputs.range_image})


def test_device_segmenter_on_cpu_tensors_matches_the_cpu_path(kitti_frames, one_torch_thread):
    model, h = small_model(), header()
    backend = TorchBackend(model, h.input_shapes, device="cpu")
    cpu, dev = Segmenter(backend, h, "product"), _DeviceSegmenter(backend, h, "product")
    for frame in kitti_frames:
        a, b = cpu.infer(frame), dev.infer(frame)
        np.testing.assert_array_equal(a.in_view, b.in_view)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)
        for name in ("labels_3d", "labels_2d", "labels"):
            assert (getattr(a, name) == getattr(b, name)).mean() > 0.9999, name


def test_backend_run_device_default_goes_through_run(kitti_frames, one_torch_thread):
    from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend

    model, h = small_model(), header()
    be = OnnxRuntimeBackend(model, h, providers=["CPUExecutionProvider"])
    inputs = prepare(kitti_frames[0], (h.model.image_width, h.model.image_height), h.sensor)
    a = be.run(inputs.arrays())
    b = be.run_device({"image": inputs.image, "range_image": inputs.range_image})
    assert be.device.type == "cpu"
    for k in a:
        np.testing.assert_array_equal(a[k], b[k].numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU device path runs only on a GPU")
def test_device_path_on_the_gpu_matches_the_cpu_path(kitti_frames):
    model, h = small_model(), header()
    for frame in kitti_frames:
        _assert_device_inputs_match(prepare(frame, SIZE, h.sensor, "cuda"), prepare(frame, SIZE, h.sensor))
    cpu = Segmenter(TorchBackend(model, h.input_shapes, device="cpu"), h, "product")
    gpu = Segmenter(TorchBackend(model, h.input_shapes, device="cuda"), h, "product")
    assert gpu.device.type == "cuda"
    for frame in kitti_frames:
        a, b = cpu.infer(frame), gpu.infer(frame)
        assert b.inputs.range_image.is_cuda  # prepared on the GPU, not copied there
        np.testing.assert_array_equal(a.in_view, b.in_view)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-3)
        assert (a.labels_3d == b.labels_3d).mean() > 0.999 and (a.labels == b.labels).mean() > 0.999


def test_helper_thread_gives_the_same_inputs_and_predictions(kitti_frames, one_torch_thread):
    from concurrent.futures import ThreadPoolExecutor

    h = header()
    with ThreadPoolExecutor(1) as pool:
        for frame in kitti_frames:
            a, b = prepare(frame, SIZE, h.sensor), prepare(frame, SIZE, h.sensor, executor=pool)
            for name in ("image", "range_image", "rows", "cols", "uv", "in_view"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            l2, l3 = _random_logits(a)
            p = point_predictions(a, l2, l3, (0.1, 0.2), rule="product")
            q = point_predictions(a, l2, l3, (0.1, 0.2), pool, rule="product")
            for name in ("labels_2d", "labels_3d", "labels", "confidence"):
                assert torch.equal(getattr(p, name), getattr(q, name)), name


def test_fit_camera_is_remembered_per_calibration_not_per_object(kitti_frames):
    cam = kitti_frames[0].camera
    same = CameraModel(cam.K.copy(), cam.width, cam.height, cam.T_cam_lidar.copy(), cam.distortion_model,
                       cam.D.copy(), cam.frame_id)
    a, b = fit_camera(cam, 320, 96), fit_camera(same, 320, 96)
    assert a[0] is b[0] and a[1:] == b[1:]
    K = cam.K.copy()
    K[0, 2] += 3.0
    other = fit_camera(CameraModel(K, cam.width, cam.height, cam.T_cam_lidar), 320, 96)[0]
    assert other is not a[0] and other.K[0, 2] != a[0].K[0, 2]
    assert fit_camera(cam, 640, 192)[0].width == 640  # the output size is part of the key


def test_postprocess_takes_half_precision_logits(kitti_frames):
    """bf16 logits (a torch backend under autocast) are post-processed in float32."""
    inputs = prepare(kitti_frames[0], SIZE, header().sensor)
    l2, l3 = (t.bfloat16() for t in _random_logits(inputs))
    ref = point_predictions(inputs, l2.float(), l3.float(), rule="product")  # the same logits, float32 arithmetic
    half = point_predictions(inputs, l2, l3, rule="product")
    for name in ("labels_2d", "labels_3d", "labels", "confidence"):
        assert torch.equal(getattr(half, name), getattr(ref, name)), name


def test_half_precision_grids_are_sampled_at_float32_positions():
    """bf16 coordinates would put u = 601 up to ~1 px off: a pixel-wide stripe pattern shows it."""
    from pl3d_ros.models.points import sample_pixels

    stripes = (torch.arange(640) % 2).float().view(1, 1, 1, 640).expand(1, 1, 4, 640)
    uv = torch.tensor([[601.0, 1.0], [598.0, 2.0], [333.0, 0.0]], dtype=torch.float64)
    for grid in (stripes, stripes.bfloat16()):
        got = sample_pixels(grid, uv, (4, 640))[:, 0].float()
        assert got.tolist() == [1.0, 0.0, 1.0], grid.dtype
