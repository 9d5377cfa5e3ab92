"""The data contract between every part of pl3d_ros: Frame, CameraModel and Prediction.

Everything that crosses a module boundary is one of these three objects, and each validates itself
on construction, so a malformed message is rejected with a clear error at the edge instead of
surfacing as a shape mismatch deep inside a model.

Units: metres for points and translations, pixels for intrinsics, nanoseconds for stamps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Number of distortion coefficients each supported ROS ``distortion_model`` needs.
DISTORTION_COEFFS = {"none": 0, "plumb_bob": 5, "rational_polynomial": 8}

#: Rotation matrices may deviate from orthonormal by this much (KITTI's Tr deviates by ~1e-7).
RIGID_TOLERANCE = 1e-4

#: Points farther than this from the LiDAR (metres) are dropped (and counted). The longest-range
#: automotive LiDARs are specified to 300-500 m; anything beyond 1 km is a driver sentinel or a
#: corrupt value, not a measurement. Left in, such a point (e.g. a finite float32 3e38 m)
#: overflows range**2 to inf in the range image and makes the model's confidences NaN.
MAX_POINT_RANGE_M = 1000.0


class FrameError(ValueError):
    """A Frame, CameraModel or Prediction was built from inconsistent or malformed data."""


def _as_matrix(value, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == int(np.prod(shape)) and arr.shape != shape:
        arr = arr.reshape(shape)  # ROS messages carry K as 9 floats and P as 12
    if arr.shape != shape:
        raise FrameError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise FrameError(f"{name} contains NaN or inf: {arr.tolist()}")
    return arr


def check_rigid(T: np.ndarray, name: str = "transform") -> np.ndarray:
    """Validate a 4x4 homogeneous rigid transform and return it as float64.

    Raises FrameError if the rotation block is not orthonormal with determinant +1 (scaled,
    sheared or mirrored extrinsics are a calibration bug, not something to project with).
    """
    T = _as_matrix(T, (4, 4), name)
    if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise FrameError(f"{name} last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    R = T[:3, :3]
    err = float(np.abs(R @ R.T - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if err > RIGID_TOLERANCE or abs(det - 1.0) > RIGID_TOLERANCE:
        raise FrameError(
            f"{name} is not rigid: |R R^T - I|max = {err:.2e}, det(R) = {det:.6f} "
            f"(tolerance {RIGID_TOLERANCE:g}); check the extrinsic calibration"
        )
    return T


@dataclass(frozen=True, eq=False)
class CameraModel:
    """A calibrated camera and its pose relative to the LiDAR.

    Attributes:
        K: (3, 3) float64 intrinsics in pixels (fx, fy, cx, cy; skew allowed).
        width, height: image size in pixels that K refers to.
        T_cam_lidar: (4, 4) float64 rigid transform mapping LiDAR coordinates (metres) into the
            camera's optical frame (x right, y down, z forward).
        distortion_model: "none", "plumb_bob" (k1 k2 p1 p2 k3) or "rational_polynomial"
            (k1 k2 p1 p2 k3 k4 k5 k6), as in sensor_msgs/CameraInfo.
        D: distortion coefficients in the CameraInfo order.
        frame_id: the camera's optical frame name, informational.
    """

    K: np.ndarray
    width: int
    height: int
    T_cam_lidar: np.ndarray = field(default_factory=lambda: np.eye(4))
    distortion_model: str = "none"
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frame_id: str = ""

    def __post_init__(self) -> None:
        K = _as_matrix(self.K, (3, 3), "K")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise FrameError(f"K must have positive focal lengths, got fx={K[0, 0]}, fy={K[1, 1]}")
        if not np.allclose(K[2], [0.0, 0.0, 1.0]):
            raise FrameError(f"K last row must be [0, 0, 1], got {K[2].tolist()}")
        if int(self.width) != self.width or int(self.height) != self.height:
            raise FrameError(f"image size must be integer, got {self.width} x {self.height}")
        if self.width <= 0 or self.height <= 0:
            raise FrameError(
                f"image size must be positive, got {self.width} x {self.height} "
                "(an all-zero CameraInfo means the camera is not calibrated)"
            )
        model = self.distortion_model or "none"
        D = np.asarray(self.D, dtype=np.float64).reshape(-1)
        if model in ("plumb_bob", "rational_polynomial") and not np.any(D):
            model, D = "none", np.zeros(0)  # all-zero coefficients: an undistorted camera
        if model not in DISTORTION_COEFFS:
            raise FrameError(
                f"unsupported distortion_model {model!r}; supported: {sorted(DISTORTION_COEFFS)}"
            )
        need = DISTORTION_COEFFS[model]
        if D.size < need or np.any(D[need:]):
            # Trailing zeros are tolerated (some drivers pad plumb_bob to 8 values).
            raise FrameError(f"{model} needs {need} distortion coefficients, got {D.tolist()}")
        D = np.ascontiguousarray(D[:need])
        if not np.all(np.isfinite(D)):
            raise FrameError(f"distortion coefficients contain NaN or inf: {D.tolist()}")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "T_cam_lidar", check_rigid(self.T_cam_lidar, "T_cam_lidar"))
        object.__setattr__(self, "distortion_model", model)
        object.__setattr__(self, "D", D)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width, self.height

    def resized(self, width: int, height: int) -> CameraModel:
        """The same camera for an image resized to ``width`` x ``height`` pixels.

        Pixel convention (OpenCV, ROS): pixel (0, 0)'s centre is at (0, 0) and its outer edge at
        -0.5, so the principal point scales as (c + 0.5) * s - 0.5, keeping image edges aligned.
        """
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0, 0] *= sx
        K[0, 1] *= sx
        K[1, 1] *= sy
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return CameraModel(K, width, height, self.T_cam_lidar, self.distortion_model, self.D,
                           self.frame_id)

    def cropped(self, x0: int, y0: int, width: int, height: int) -> CameraModel:
        """The same camera for the crop [y0:y0+height, x0:x0+width] of its image."""
        if x0 < 0 or y0 < 0 or x0 + width > self.width or y0 + height > self.height:
            raise FrameError(
                f"crop ({x0}, {y0}, {width}x{height}) exceeds the image {self.width}x{self.height}"
            )
        K = self.K.copy()
        K[0, 2] -= x0
        K[1, 2] -= y0
        return CameraModel(K, width, height, self.T_cam_lidar, self.distortion_model, self.D,
                           self.frame_id)


@dataclass(eq=False)
class Frame:
    """One synchronized camera + LiDAR sample.

    Attributes:
        stamp_ns: the LiDAR cloud's header stamp in nanoseconds.
        points: (N, 4) float32 x, y, z (metres, LiDAR frame) and intensity. On construction,
            points with a NaN or inf coordinate, and points farther than
            :data:`MAX_POINT_RANGE_M` from the sensor, are dropped (with their labels); a NaN or
            inf intensity of a point whose x, y, z are fine is set to 0 and the point kept.
        image: (H, W, 3) uint8 RGB; H, W must equal the camera model's height, width.
        camera: the CameraModel of ``image``.
        labels: optional (N,) uint32 ground truth in the dataset's raw ids (for SemanticKITTI
            the lower 16 bits are the semantic id); map with ``labels.ClassSet.to_train_ids``.
        seq: running index of the frame in its stream.
        lidar_frame_id: the cloud's frame name, informational.
        dropped_points: points dropped on construction, all reasons (plus any the caller
            counted before); ``dropped_far`` of them for their range.
        dropped_far: points dropped for lying beyond :data:`MAX_POINT_RANGE_M`.
        zeroed_intensity: kept points whose non-finite intensity was set to 0.
        pose: optional (4, 4) float64 T_odom_lidar, the LiDAR's pose in an odometry frame
            (maps LiDAR coordinates into odometry coordinates, metres), checked rigid like the
            extrinsics; None when no odometry is known for this frame.
    """

    stamp_ns: int
    points: np.ndarray
    image: np.ndarray
    camera: CameraModel
    labels: np.ndarray | None = None
    seq: int = 0
    lidar_frame_id: str = ""
    dropped_points: int = 0
    dropped_far: int = 0
    zeroed_intensity: int = 0
    pose: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.camera, CameraModel):
            raise FrameError(f"camera must be a CameraModel, got {type(self.camera).__name__}")
        if int(self.stamp_ns) != self.stamp_ns or self.stamp_ns < 0:
            raise FrameError(f"stamp_ns must be a non-negative integer, got {self.stamp_ns!r}")
        self.stamp_ns = int(self.stamp_ns)

        pts = np.asarray(self.points)
        if pts.ndim != 2 or pts.shape[1] != 4:
            raise FrameError(f"points must have shape (N, 4) [x, y, z, intensity], got {pts.shape}")
        if not np.issubdtype(pts.dtype, np.floating):
            raise FrameError(f"points must be floating point, got dtype {pts.dtype}")
        pts = np.ascontiguousarray(pts, dtype=np.float32)
        xyz_ok = np.isfinite(pts[:, :3]).all(axis=1)
        # float64: squares of float32 coordinates near 3e38 would overflow to inf (still > the
        # bound, but say what is meant). NaN rows compare False and are not counted as far.
        r2 = np.einsum("ij,ij->i", pts[:, :3].astype(np.float64), pts[:, :3].astype(np.float64))
        far = xyz_ok & ~(r2 <= MAX_POINT_RANGE_M ** 2)
        keep = xyz_ok & ~far
        n_far = int(np.count_nonzero(far))
        n_bad = int(pts.shape[0] - np.count_nonzero(keep))
        bad_intensity = keep & ~np.isfinite(pts[:, 3])
        n_zeroed = int(np.count_nonzero(bad_intensity))
        if n_zeroed:
            pts = pts.copy()  # never write into the caller's array (rare path: copy always)
            pts[bad_intensity, 3] = 0.0
        labels = self.labels
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (pts.shape[0],):
                raise FrameError(
                    f"labels must have shape ({pts.shape[0]},) to match points, got {labels.shape}"
                )
            if not np.issubdtype(labels.dtype, np.integer):
                raise FrameError(f"labels must be integer ids, got dtype {labels.dtype}")
            labels = labels.astype(np.uint32, copy=False)
        if n_bad:
            pts = pts[keep]
            labels = labels[keep] if labels is not None else None
            log.debug("frame %d: dropped %d points (%d non-finite, %d beyond %g m)", self.seq,
                      n_bad, n_bad - n_far, n_far, MAX_POINT_RANGE_M)
        if n_zeroed:
            log.debug("frame %d: %d non-finite intensities set to 0", self.seq, n_zeroed)
        if pts.shape[0] == 0:
            raise FrameError(
                f"frame {self.seq} has no usable points ({n_bad - n_far} with a non-finite "
                f"coordinate and {n_far} beyond {MAX_POINT_RANGE_M:g} m dropped): empty cloud"
            )
        self.points = pts
        self.labels = labels
        self.dropped_points = int(self.dropped_points) + n_bad
        self.dropped_far = int(self.dropped_far) + n_far
        self.zeroed_intensity = int(self.zeroed_intensity) + n_zeroed

        img = np.asarray(self.image)
        if img.ndim != 3 or img.shape[2] != 3:
            raise FrameError(f"image must have shape (H, W, 3) RGB, got {img.shape}")
        if img.dtype != np.uint8:
            raise FrameError(f"image must be uint8, got dtype {img.dtype}")
        if (img.shape[1], img.shape[0]) != self.camera.size:
            raise FrameError(
                f"image is {img.shape[1]}x{img.shape[0]} but the camera model is "
                f"{self.camera.width}x{self.camera.height}; the CameraInfo does not belong to "
                "this image stream (or the image was resized without adjusting K)"
            )
        self.image = img
        if self.pose is not None:
            self.pose = check_rigid(self.pose, "pose (T_odom_lidar)")

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])


@dataclass(eq=False)
class Prediction:
    """The segmenter's output for one Frame.

    Attributes:
        labels: (N,) uint8 train ids of the active class set.
        confidence: (N,) float32 in [0, 1], the fused probability of ``labels``.
        in_view: (N,) bool, points that project into the camera image.
        labels_2d: (M,) uint8 the image branch's own labels of the M = in_view.sum() points.
        labels_3d: (N,) uint8 the range branch's own labels of all points. (Each branch's labels
            rather than its (N, C) probabilities: nothing downstream reads more, and forming the
            range branch's softmax at every point was 40 % of the postprocess.)
        timings_ms: per-stage wall time in milliseconds (preprocess, 2d, 3d, fusion, ...).
        stamp_ns: the frame's stamp.
        inputs: the ``inputs.NetworkInputs`` the prediction was computed from (the adapter trains
            on them instead of preparing the frame again); None where the producer kept none.
    """

    labels: np.ndarray
    confidence: np.ndarray
    in_view: np.ndarray
    labels_2d: np.ndarray
    labels_3d: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    stamp_ns: int = 0
    inputs: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = np.asarray(self.labels).shape[0] if np.ndim(self.labels) == 1 else -1
        if n < 0:
            raise FrameError(f"labels must be 1-D, got shape {np.shape(self.labels)}")
        self.labels = np.asarray(self.labels, dtype=np.uint8)
        self.confidence = np.asarray(self.confidence, dtype=np.float32)
        self.in_view = np.asarray(self.in_view, dtype=bool)
        self.labels_2d = np.asarray(self.labels_2d, dtype=np.uint8)
        self.labels_3d = np.asarray(self.labels_3d, dtype=np.uint8)
        for name in ("confidence", "in_view", "labels_3d"):
            if getattr(self, name).shape != (n,):
                raise FrameError(f"{name} must have shape ({n},), got {getattr(self, name).shape}")
        m = int(np.count_nonzero(self.in_view))
        if self.labels_2d.shape != (m,):
            raise FrameError(f"labels_2d must have shape ({m},) for the in-view points, got {self.labels_2d.shape}")
