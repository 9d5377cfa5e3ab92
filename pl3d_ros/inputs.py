"""Network inputs: a Frame as the two-stream network takes it, and the way back from the
network's dense outputs to per-point values.

Built once per frame by inference (``Segmenter``) and handed on to the adapter, so adaptation
trains on exactly the tensors inference ran on; training builds the same container from its
augmented frames. Everything per point happens here, for every caller:

    image         resized to cover the input size, centre-cropped (camera K adjusted the same way)
    range image   spherical projection, nearest point per cell (geometry.range_projection)
    rows, cols    every point's range-image cell          -> gather_cells on 3D outputs
    uv, in_view   in-view points' pixels in the input image -> bilinear sample of 2D outputs

Two implementations of ``prepare`` with the same results: compiled loops on the CPU
(``geometry``'s projections, through ``cpu_kernels``) and torch on the backend's device (``prepare_on``: one copy
of the points and the image to a GPU, nothing back until the labels). ``point_predictions`` is
the inference postprocess in torch on whatever device the outputs are on.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pl3d_ros.config import RangeImageConfig
from pl3d_ros.cpu_budget import one_torch_thread
from pl3d_ros.frame import CameraModel, Frame
from pl3d_ros import geometry
from pl3d_ros.geometry import project_in_view, range_image_channels, range_projection
from pl3d_ros.models.points import Fusion, fuse, gather_cells, predict_points, sample_pixels


def cover_size(camera: CameraModel, width: int, height: int, zoom: float = 1.0) -> tuple[int, int]:
    """(w, h) of the image scaled, keeping its aspect, to cover width x height, times ``zoom``."""
    scale = max(width / camera.width, height / camera.height) * zoom
    return max(width, round(camera.width * scale)), max(height, round(camera.height * scale))


def fit_camera(camera: CameraModel, width: int, height: int) -> tuple[CameraModel, tuple[int, int], tuple[int, int]]:
    """Scale to cover width x height, then centre-crop: (camera, resized (w, h), crop offset (x0, y0)).

    The same calibration arrives with every frame, and building (and validating) the two
    derived camera models took 0.3 ms of each frame's preprocess: the result is remembered per
    calibration (its values, not the object: every CameraInfo message makes a new one)."""
    key = (camera.K.tobytes(), camera.T_cam_lidar.tobytes(), camera.D.tobytes(), camera.distortion_model,
           camera.width, camera.height, camera.frame_id, int(width), int(height))
    fitted = _FITTED.get(key)
    if fitted is None:
        fitted = _fit_camera(camera, int(width), int(height))
        if len(_FITTED) >= 16:  # a handful of cameras at most; never grows without bound
            _FITTED.clear()
        _FITTED[key] = fitted
    return fitted


#: fit_camera's results by calibration.
_FITTED: dict[tuple, tuple[CameraModel, tuple[int, int], tuple[int, int]]] = {}


def _fit_camera(camera: CameraModel, width: int, height: int) -> tuple[CameraModel, tuple[int, int], tuple[int, int]]:
    rw, rh = cover_size(camera, width, height)
    x0, y0 = (rw - width) // 2, (rh - height) // 2
    return camera.resized(rw, rh).cropped(x0, y0, width, height), (rw, rh), (x0, y0)


def resize_crop(image: np.ndarray | torch.Tensor, size: tuple[int, int], offset: tuple[int, int],
                out_wh: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 in [0, 1] (a view, not contiguous): antialiased
    bilinear resize to ``size`` (w, h), then the out_wh crop at ``offset`` (x0, y0). Shared by
    training and inference, so both see exactly the same pixels.

    ``image`` may be a numpy array or a torch tensor on any device. On the CPU the resize runs on
    the uint8 image (torch's fixed-point antialiased kernel, channels-last) and only the crop is
    converted to float: 4-5x faster than resizing the float image (1.5 vs 6.9 ms for a KITTI
    frame, one thread, loaded machine), at most 1/255 from it (the uint8 rounding of the result;
    measured 0.0038; fused mIoU within 0.2 points of the float resize on the dev frames). Elsewhere (CUDA's antialiased kernel has
    no uint8 path) the float image is resized: the same pixels within that 1/255.
    """
    if isinstance(image, np.ndarray):
        image = _read_only_tensor(np.ascontiguousarray(image))
    t = image.permute(2, 0, 1)[None]  # (1, 3, H, W), channels-last strides: no copy
    if t.device.type == "cpu" and t.dtype == torch.uint8:
        t = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    else:
        t = F.interpolate(t.float().div_(255.0), size=(size[1], size[0]), mode="bilinear",
                          align_corners=False, antialias=True)
    x0, y0 = offset
    t = t[:, :, y0:y0 + out_wh[1], x0:x0 + out_wh[0]]
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.clamp_(0.0, 1.0)


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing a read-only array's memory (decoded images and message buffers are
    read-only views), for reading only: torch.from_numpy warns about such arrays, and the copy
    that avoided the warning took 0.7 ms of a KITTI frame's preprocess."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


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
        """The backend feed: {"image", "range_image"} as float32 numpy arrays (views of CPU
        tensors; device tensors are copied to the host)."""
        return {"image": self.image.detach().cpu().numpy(), "range_image": self.range_image.detach().cpu().numpy()}


def prepare(frame: Frame, image_size: tuple[int, int], sensor: RangeImageConfig,
            device: torch.device | str | None = None, executor: Executor | None = None) -> NetworkInputs:
    """Frame -> NetworkInputs for a network with a (width, height) image input and ``sensor``'s
    range image (both from the checkpoint header). ``device``: where the inputs are built and
    live (None or a CPU: the compiled loops of ``cpu_kernels``; else ``prepare_on``).
    ``executor``: the camera projection runs there while the calling thread resizes the image
    and builds the range image; the compiled loops and torch release the GIL, so on two idle
    cores the halves overlap (resizing on the helper instead was 0.3 ms slower per frame,
    measured side by side). Results are the
    same either way."""
    if device is not None and torch.device(device).type != "cpu":
        return prepare_on(frame, image_size, sensor, device)
    camera, size, offset = fit_camera(frame.camera, *image_size)
    if executor is None:
        in_view, uv = _project_camera(frame, camera)
    else:
        projection = executor.submit(_project_camera, frame, camera)
    with one_torch_thread():  # training and the adapter call prepare outside Segmenter's
        image = resize_crop(frame.image, size, offset, image_size).contiguous()
    proj3d = range_projection(frame.points, sensor)
    range_image = torch.from_numpy(range_image_channels(frame.points, proj3d)[None])
    rows, cols = torch.from_numpy(proj3d.rows), torch.from_numpy(proj3d.cols)
    if executor is not None:
        in_view, uv = projection.result()
    return NetworkInputs(image=image, range_image=range_image, rows=rows, cols=cols, uv=torch.from_numpy(uv),
                         in_view=torch.from_numpy(in_view), camera=camera)


def load_cpu_kernels() -> None:
    """Compile the CPU loops of ``prepare`` and ``point_predictions`` (``cpu_kernels``), or load
    them from numba's cache, with the signatures a real frame uses, on a few synthetic points:
    otherwise the first frame pays for it (seconds on a machine's first run, ~0.1 s after)."""
    points = np.array([[5.0, 1.0, -0.5, 0.3], [-4.0, 2.0, 0.2, 0.1], [3.0, -2.0, -1.0, 0.0]], np.float32)
    proj = range_projection(points, RangeImageConfig(rows=2, cols=8))
    range_image_channels(points, proj)
    camera = CameraModel(np.array([[2.0, 0.0, 4.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]), 8, 2,
                         np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
                                   [0.0, 0.0, 0.0, 1.0]]))
    project_in_view(points[:, :3].astype(np.float64), camera)
    predict_points(torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8), torch.zeros(1, 2, dtype=torch.float64),
                   torch.from_numpy(proj.rows * 8 + proj.cols), torch.tensor([True, False, False]), (2, 8),
                   rule="product")


def _project_camera(frame: Frame, camera: CameraModel) -> tuple[np.ndarray, np.ndarray]:
    """The camera half of ``prepare``: (in_view (N,), uv (M, 2)) in the network-input camera,
    in float64 (``geometry.project_in_view``)."""
    return project_in_view(frame.points[:, :3].astype(np.float64), camera)


# -- the device path: the same inputs computed by torch where the network runs -------------------
#
# The arithmetic mirrors geometry.project_points (float64) and range_projection (float32)
# operation for operation, so the results agree with the numpy path up to the last bits of the
# transcendental functions (atan2, asin differ by an ulp between libraries): a point within an
# ulp of a cell or image border may land on the other side. test_fastpath checks both on CPU
# tensors.


def _project_in_view_t(xyz: torch.Tensor, camera: CameraModel, min_depth: float = 0.1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``geometry.project_in_view``: (N, 3) float64 -> in_view (N,), uv (M, 2)."""
    T = torch.as_tensor(camera.T_cam_lidar, dtype=torch.float64, device=xyz.device)
    p = xyz @ T[:3, :3].T + T[:3, 3]
    front = torch.nonzero(p[:, 2] > min_depth).squeeze(1)
    p = p[front]
    x, y = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
    keep = torch.isfinite(x) & torch.isfinite(y)
    if camera.distortion_model != "none":
        c = geometry._coefficients(camera)
        r2 = x * x + y * y
        slope, den = geometry._radial_slope(r2, c)
        keep &= (r2 <= geometry.valid_radius(camera) ** 2) & (slope > 0) & (den > 0)
        x, y = geometry._distort(x, y, c)
    K = camera.K
    u = K[0, 0] * x + K[0, 1] * y + K[0, 2]
    v = K[1, 1] * y + K[1, 2]
    keep &= (u >= -0.5) & (u < camera.width - 0.5) & (v >= -0.5) & (v < camera.height - 0.5)
    in_view = torch.zeros(xyz.shape[0], dtype=torch.bool, device=xyz.device)
    in_view[front[keep]] = True
    return in_view, torch.stack([u[keep], v[keep]], dim=1)


#: Key of an empty cell in ``_range_image_t`` (above every real key).
_EMPTY_KEY_T = torch.iinfo(torch.int64).max


def _range_image_t(points: torch.Tensor, sensor: RangeImageConfig
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin of ``geometry.range_projection`` + ``range_image_channels``: (N, 4) float32
    points -> (range_image (5, rows, cols) float32, rows (N,) int64, cols (N,) int64), in float32
    as the numpy path. Nearest point per cell as ``geometry.nearest_per_cell`` (one scatter of
    packed (range bits, index) keys with an amin: deterministic on a GPU too)."""
    n_rows, n_cols = int(sensor.rows), int(sensor.cols)
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    range32 = torch.sqrt(x * x + y * y + z * z)
    valid = torch.isfinite(range32) & (range32 > 0)
    x, y, z = torch.where(valid, x, 1.0), torch.where(valid, y, 0.0), torch.where(valid, z, 0.0)
    yaw = torch.atan2(y, x)
    pitch = torch.atan2(z, torch.sqrt(x * x + y * y))  # = asin(z / range), as cpu_kernels computes it
    col, row = geometry.spherical_cell(yaw, pitch, sensor, torch.floor)
    cols = torch.clamp(col, 0, n_cols - 1).long()
    rows = torch.clamp(row, 0, n_rows - 1).long()
    index = torch.arange(points.shape[0], device=points.device)
    key = (range32.view(torch.int32).long() << 32) | index
    key = torch.where(valid, key, _EMPTY_KEY_T)
    best = torch.full((n_rows * n_cols,), _EMPTY_KEY_T, dtype=torch.int64, device=points.device)
    best.scatter_reduce_(0, rows * n_cols + cols, key, reduce="amin")
    occupied = torch.nonzero(best != _EMPTY_KEY_T).squeeze(1)
    won = best[occupied] & 0xFFFFFFFF
    out = torch.zeros((5, n_rows * n_cols), dtype=torch.float32, device=points.device)
    out[0, occupied] = range32[won]
    out[1:, occupied] = points[won].T
    return out.view(5, n_rows, n_cols), rows, cols


def prepare_on(frame: Frame, image_size: tuple[int, int], sensor: RangeImageConfig,
               device: torch.device | str) -> NetworkInputs:
    """``prepare`` computed by torch on ``device``: the frame's points and uint8 image are
    copied there once and everything else happens there (the results agree with the numpy path
    as the note above says; on a CUDA device the resize is the float one, see resize_crop)."""
    dev = torch.device(device)
    width, height = image_size
    camera, size, offset = fit_camera(frame.camera, width, height)
    points = np.ascontiguousarray(frame.points, dtype=np.float32)
    image = frame.image if frame.image.flags.writeable else frame.image.copy()
    pts = torch.from_numpy(points if points.flags.writeable else points.copy()).to(dev)
    img = torch.from_numpy(np.ascontiguousarray(image)).to(dev)
    in_view, uv = _project_in_view_t(pts[:, :3].double(), camera)
    range_image, rows, cols = _range_image_t(pts, sensor)
    return NetworkInputs(
        image=resize_crop(img, size, offset, (width, height)).contiguous(),
        range_image=range_image[None],
        rows=rows,
        cols=cols,
        uv=uv,
        in_view=in_view,
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

    def probs(self, in_view: torch.Tensor, bias: torch.Tensor | tuple[float, float] | None = None, *,
              rule: str | Fusion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (prob_2d (M, C), prob_3d (N, C), fused (N, C)): softmax per branch, then the
        fusion that inference deploys (``models.points.fuse``: ``rule``, ``bias`` its branch
        log-weights)."""
        p2 = self.logits_2d.softmax(dim=1)
        p3 = self.logits_3d.softmax(dim=1)
        return p2, p3, fuse(p2, p3, in_view, bias, rule=rule)


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


@dataclass
class PointPredictions:
    """The inference postprocess of one frame, torch tensors on the outputs' device.

    labels_2d (M,) and labels_3d (N,) int64: each branch's own top class (in view / everywhere);
    labels (N,) int64 and confidence (N,) float32: the argmax and maximum of the fused
    probabilities (``PointOutputs.probs``'s fusion; out of view the 3D branch).
    """

    labels_2d: torch.Tensor
    labels_3d: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor


def point_predictions(inputs: NetworkInputs, logits_2d: torch.Tensor, logits_3d: torch.Tensor,
                      bias: torch.Tensor | tuple[float, float] | None = None,
                      executor: Executor | None = None, *, rule: str | Fusion) -> PointPredictions:
    """Dense logits (1, C, H, W) and (1, C, rows, cols) of one frame -> PointPredictions: the
    argmaxes of ``point_outputs(...).probs(in_view, bias, rule=rule)`` and the fused max (within
    float rounding: the class sums run in another order), without any (N, C) tensor.
    ``executor``: where the range cells' top classes are found (``models.points.predict_points``)."""
    cells = inputs.rows * logits_3d.shape[-1] + inputs.cols
    return PointPredictions(*predict_points(logits_2d, logits_3d, inputs.uv, cells, inputs.in_view,
                                            tuple(inputs.image.shape[-2:]), bias, executor, rule=rule))
