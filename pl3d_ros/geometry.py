"""Camera projection and spherical range images: how LiDAR points meet pixels and range cells.

Two maps from the point cloud, both vectorised over points:

* ``project_points``: LiDAR points -> pixel coordinates of a calibrated camera (pinhole + OpenCV
  plumb_bob / rational_polynomial distortion), with a mask of the points the camera really sees.
* ``range_projection``: LiDAR points -> cells of a rows x cols spherical range image (RangeNet++
  conventions), with the per-cell winner (nearest point) and the per-point cell, so per-point
  features can be scattered into the image and per-cell predictions gathered back to every point.

Units: metres for points and depths, pixels for image coordinates, radians for angles. Pixel
coordinates follow the OpenCV / ROS convention: pixel (0, 0)'s centre is at (0, 0), so the image
covers [-0.5, width - 0.5) x [-0.5, height - 0.5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pl3d_ros import cpu_kernels
from pl3d_ros.config import RangeImageConfig
from pl3d_ros.frame import CameraModel

__all__ = [
    "Projection",
    "RangeProjection",
    "distort_normalized",
    "project_points",
    "range_image_channels",
    "nearest_per_cell",
    "project_in_view",
    "range_projection",
    "spherical_cell",
    "undistort_pixels",
    "valid_radius",
]

#: Margin added to the undistorted radius of the image border when deciding which points the
#: lens can see: points just outside the border still project outside the image, and the margin
#: keeps them from being cut by the guard instead of by the (exact) image-bounds test.
RADIUS_MARGIN = 1.10

#: An undistorted pixel whose re-distortion misses the input by more than this (pixels) is
#: reported as NaN rather than as a wrong direction (the solver did not converge there).
UNDISTORT_TOLERANCE_PX = 1e-3


# -- distortion --------------------------------------------------------------------------------


def _coefficients(camera: CameraModel) -> np.ndarray:
    """(8,) float64 k1 k2 p1 p2 k3 k4 k5 k6; the rational terms are zero for plumb_bob."""
    coeffs = np.zeros(8)
    coeffs[: camera.D.size] = camera.D
    return coeffs


def _radial_terms(r2: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numerator, denominator of the radial factor and d(radial)/d(r^2), all shaped like r2."""
    k1, k2, _, _, k3, k4, k5, k6 = c
    num = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    den = 1.0 + r2 * (k4 + r2 * (k5 + r2 * k6))
    dnum = k1 + r2 * (2.0 * k2 + r2 * 3.0 * k3)
    dden = k4 + r2 * (2.0 * k5 + r2 * 3.0 * k6)
    with np.errstate(divide="ignore", invalid="ignore"):
        dradial = (dnum * den - num * dden) / (den * den)
    return num, den, dradial


def _radial_slope(r2: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d(r * radial(r))/dr and the radial denominator at squared radius r2.

    The distorted radius must grow with the undistorted one; where it does not (or where the
    rational denominator crosses zero), two directions map to the same pixel and the model is
    outside the region it was calibrated on.
    """
    num, den, dradial = _radial_terms(r2, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = num / den + 2.0 * r2 * dradial
    return slope, den


def _distort(x: np.ndarray, y: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV distortion of normalised coordinates (x', y') -> (x'', y''), both unitless."""
    k1, k2, p1, p2, k3, k4, k5, k6 = c
    r2 = x * x + y * y
    num, den, _ = _radial_terms(r2, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        radial = num / den
    xy2 = 2.0 * x * y
    xd = x * radial + p1 * xy2 + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + p2 * xy2
    return xd, yd


def _distort_jacobian(
    x: np.ndarray, y: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Partial derivatives (dxd/dx, dxd/dy, dyd/dx, dyd/dy) of ``_distort``."""
    _, _, p1, p2, _, _, _, _ = c
    r2 = x * x + y * y
    num, den, dradial = _radial_terms(r2, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        radial = num / den
    cross = 2.0 * x * y * dradial + 2.0 * p1 * x + 2.0 * p2 * y
    a = radial + 2.0 * x * x * dradial + 2.0 * p1 * y + 6.0 * p2 * x
    d = radial + 2.0 * y * y * dradial + 6.0 * p1 * y + 2.0 * p2 * x
    return a, cross, cross, d


def _to_pixels(xd: np.ndarray, yd: np.ndarray, K: np.ndarray) -> np.ndarray:
    u = K[0, 0] * xd + K[0, 1] * yd + K[0, 2]
    v = K[1, 1] * yd + K[1, 2]
    return np.stack([u, v], axis=-1)


def _as_xy(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (M, 2), got {arr.shape}")
    return arr


def distort_normalized(xy: np.ndarray, camera: CameraModel) -> np.ndarray:
    """Forward lens model: normalised camera coordinates -> pixel coordinates.

    Args:
        xy: (M, 2) undistorted normalised coordinates x' = X/Z, y' = Y/Z (unitless).
        camera: the camera whose distortion and intrinsics to apply.

    Returns:
        (M, 2) float64 pixel coordinates (u, v), u = fx x'' + skew y'' + cx, v = fy y'' + cy.
        No validity check: far off-axis inputs may fold back into the image (see
        ``valid_radius``; ``project_points`` applies the guard).
    """
    xy = _as_xy(xy, "xy")
    x, y = xy[:, 0], xy[:, 1]
    if camera.distortion_model != "none":
        x, y = _distort(x, y, _coefficients(camera))
    return _to_pixels(x, y, camera.K)


def _radial_map(r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distorted radius f(r) = r * radial(r) and its slope df/dr, ignoring tangential terms."""
    r2 = r * r
    num, den, _ = _radial_terms(r2, c)
    slope, _ = _radial_slope(r2, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        return r * num / den, slope


@functools.lru_cache(maxsize=64)
def _fold_cached(D: tuple[float, ...]) -> tuple[float, float]:
    c = np.zeros(8)
    c[: len(D)] = D
    # Searched uniformly in off-axis angle up to 89.9 degrees: a polynomial fitted to a narrow
    # lens can turn over anywhere beyond its calibrated field.
    r = np.tan(np.linspace(0.0, np.radians(89.9), 20001))
    slope, den = _radial_slope(r * r, c)
    folded = np.flatnonzero(~((slope > 0) & (den > 0)))
    # The sample before the first non-increasing one: conservative by at most one grid step.
    r_end = float(r[folded[0] - 1]) if folded.size else float(r[-1])
    f_end, _ = _radial_map(np.array(r_end), c)
    return (r_end if folded.size else float("inf")), float(f_end)


def _fold(camera: CameraModel) -> tuple[float, float]:
    """(r_fold, f_max) of the camera's radial map f(r) = r * radial(r).

    r_fold is the first undistorted radius where f stops increasing (``inf`` if it never does
    before 89.9 degrees off-axis); f_max is f there (or at 89.9 degrees). The lens model is
    one-to-one only inside r_fold, and no distorted radius above f_max has a valid preimage.
    """
    return _fold_cached(tuple(camera.D.tolist()))


def undistort_pixels(uv: np.ndarray, camera: CameraModel, iterations: int = 20) -> np.ndarray:
    """Inverse lens model: pixel coordinates -> undistorted normalised camera coordinates.

    Not OpenCV's fixed-point iteration x' = (x'' - tangential) / radial: it diverges where the
    distortion is strong (k1 = -0.3, k2 = 0.1 with fx = 400 px on a 1280 x 720 image leaves half
    the pixels unconverged after 20 iterations) and can settle on the folded branch of the
    polynomial. Instead the radial part is inverted first on the one-to-one branch
    [0, r_fold] by bracketed Newton (always converges), then the full model, tangential terms
    included, is refined by 2-D Newton steps.

    Args:
        uv: (M, 2) pixel coordinates (u, v).
        camera: the camera whose intrinsics and distortion to invert.
        iterations: at most this many 2-D Newton steps (the radial stage takes at most
            iterations + 20); both stages converge quadratically and stop once converged.

    Returns:
        (M, 2) float64 normalised coordinates (x', y'), unitless. A pixel that cannot be
        inverted is NaN: beyond the lens's image circle (no direction on the one-to-one branch
        maps to it), or the re-distorted result misses it by more than
        ``UNDISTORT_TOLERANCE_PX``. Non-finite inputs give NaN.
    """
    uv = _as_xy(uv, "uv")
    K = camera.K
    y0 = (uv[:, 1] - K[1, 2]) / K[1, 1]
    x0 = (uv[:, 0] - K[0, 2] - K[0, 1] * y0) / K[0, 0]
    if camera.distortion_model == "none":
        return np.stack([x0, y0], axis=-1)

    c = _coefficients(camera)
    r_fold, f_fold = _fold(camera)
    hi_bound = r_fold if np.isfinite(r_fold) else float(np.tan(np.radians(89.9)))
    rd = np.hypot(x0, y0)
    with np.errstate(all="ignore"):
        reachable = rd <= f_fold
        lo = np.zeros_like(rd)
        hi = np.full_like(rd, hi_bound)
        r = np.where(reachable, np.minimum(rd, hi_bound), 0.0)
        for _ in range(max(iterations, 1) + 20):
            f, df = _radial_map(r, c)
            below = f < rd
            lo = np.where(below, r, lo)
            hi = np.where(below, hi, r)
            step = r - (f - rd) / df
            # Newton while it stays inside the bracket, bisection otherwise: f is monotonic on
            # [0, r_fold], so the bracket always holds the root.
            r = np.where((step >= lo) & (step <= hi), step, 0.5 * (lo + hi))
            if not np.any(reachable & (np.abs(f - rd) > 1e-15 * (1.0 + rd))):
                break
        scale = np.where(rd > 0, r / rd, 1.0)
        x, y = x0 * scale, y0 * scale

        def residual(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            xd, yd = _distort(xs, ys, c)
            ex, ey = xd - x0, yd - y0
            return ex, ey, np.hypot(ex, ey)

        ex, ey, err = residual(x, y)
        for _ in range(max(iterations, 1)):
            a, b, cc, d = _distort_jacobian(x, y, c)
            det = a * d - b * cc
            xn = x - (d * ex - b * ey) / det
            yn = y - (a * ey - cc * ex) / det
            exn, eyn, errn = residual(xn, yn)
            # Keep only improving steps so a point can never be pushed off its solution.
            better = np.isfinite(errn) & (errn < err)
            # Converged once only rounding-level (1e-15, ~1e-12 px) improvements remain.
            if not np.any(better & (err > 1e-15)):
                break
            x = np.where(better, xn, x)
            y = np.where(better, yn, y)
            ex = np.where(better, exn, ex)
            ey = np.where(better, eyn, ey)
            err = np.where(better, errn, err)

        # Residual in pixels: the solver works in normalised units, users think in pixels.
        bad = ~reachable | ~(err * max(K[0, 0], K[1, 1]) <= UNDISTORT_TOLERANCE_PX)
    out = np.stack([x, y], axis=-1)
    out[bad] = np.nan
    return out


# -- fold-back guard ---------------------------------------------------------------------------


def _camera_key(camera: CameraModel) -> tuple:
    # Keyed by content, not identity: a driver republishes CameraInfo every frame, and each
    # message becomes a new CameraModel with the same calibration.
    return (
        camera.distortion_model,
        tuple(camera.D.tolist()),
        tuple(camera.K.ravel().tolist()),
        camera.width,
        camera.height,
    )


@functools.lru_cache(maxsize=64)
def _valid_radius_cached(key: tuple) -> float:
    model, D, K, width, height = key
    if model == "none":
        return float("inf")
    camera = CameraModel(np.reshape(K, (3, 3)), width, height, np.eye(4), model, np.asarray(D))
    r_fold, _ = _fold(camera)

    # The image border, one sample per pixel along each pixel-edge side.
    us = np.arange(-0.5, width, 1.0)
    vs = np.arange(-0.5, height, 1.0)
    border = np.concatenate(
        [
            np.stack([us, np.full_like(us, -0.5)], axis=-1),
            np.stack([us, np.full_like(us, height - 0.5)], axis=-1),
            np.stack([np.full_like(vs, -0.5), vs], axis=-1),
            np.stack([np.full_like(vs, width - 0.5), vs], axis=-1),
        ]
    )
    xy = undistort_pixels(border, camera)
    r_border = np.hypot(xy[:, 0], xy[:, 1])
    # A border pixel that cannot be undistorted lies beyond the lens's image circle: the whole
    # one-to-one region is then inside the image.
    if not np.all(np.isfinite(r_border)):
        return r_fold
    return min(RADIUS_MARGIN * float(r_border.max()), r_fold)


def valid_radius(camera: CameraModel) -> float:
    """Largest undistorted normalised radius sqrt(x'^2 + y'^2) the camera can see (unitless).

    The undistorted radius of the image border plus a 10 % margin, capped at the first radius
    where the radial map r * radial(r) stops increasing (beyond it, polynomial distortion folds
    far off-axis directions back into the image). ``inf`` for an undistorted camera. Computed once
    per calibration and cached.
    """
    return _valid_radius_cached(_camera_key(camera))


# -- camera projection -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Projection:
    """LiDAR points projected into one camera image.

    Attributes:
        uv: (N, 2) float64 pixel coordinates (u right, v down; pixel (0, 0)'s centre at (0, 0)).
            Computed for every point with a non-zero finite depth, including points behind the
            camera (whose uv is the meaningless mirrored projection); NaN otherwise. Only
            ``in_view`` points have a meaningful uv.
        depth: (N,) float64 z in the camera optical frame, metres (negative behind the camera).
        in_view: (N,) bool, points in front of the camera (depth > min_depth), finite, inside the
            lens's valid field (see ``valid_radius``) and inside the image
            [-0.5, width - 0.5) x [-0.5, height - 0.5).
    """

    uv: np.ndarray
    depth: np.ndarray
    in_view: np.ndarray

    def pixels(self, width: int, height: int) -> np.ndarray:
        """(N, 2) int64 (u, v) pixel of every point in a width x height image, an index that is
        always in bounds and meaningful where ``in_view``.

        Rounded half-up (floor(x + 0.5)), which maps the in-view interval [-0.5, size - 0.5)
        exactly onto 0 .. size - 1; out-of-view points are clipped, non-finite uv read as 0.
        """
        pix = np.floor(np.nan_to_num(self.uv, nan=0.0, posinf=0.0, neginf=0.0) + 0.5).astype(np.int64)
        pix[:, 0] = np.clip(pix[:, 0], 0, width - 1)
        pix[:, 1] = np.clip(pix[:, 1], 0, height - 1)
        return pix


def _as_points(points: np.ndarray, name: str = "points", dtype: type = np.float64) -> np.ndarray:
    """(N, 3) xyz of an (N, 3) or (N, 4) array, in ``dtype``.

    float64 for the camera projections, so that those of float32 clouds agree with a float64
    P @ Tr to ~1e-9 px; the range projection takes float32 (see there). An input already in
    ``dtype`` is used as it is (a view, no copy); nothing here writes into it."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] not in (3, 4):
        raise ValueError(f"{name} must have shape (N, 3) or (N, 4), got {pts.shape}")
    return np.asarray(pts[:, :3], dtype=dtype)


def _camera_coordinates(xyz: np.ndarray, camera: CameraModel, axes: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """(N, 3) float64 LiDAR points -> (N, len(axes)) float64 coordinates ``axes`` of them in the
    camera's optical frame (metres).

    Row by row as x R_i0 + y R_i1 + z R_i2 + t_i rather than ``xyz @ R.T``: numpy's matmul with an
    inner size of 3 takes 2 ms for a KITTI scan, this 0.8, and each coordinate comes out bit for
    bit the same whichever others are asked for (``project_in_view`` takes the depth of every
    point first and x, y of the front ones only).
    """
    T = camera.T_cam_lidar
    out = np.empty((xyz.shape[0], len(axes)))
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite points are masked later
        for k, i in enumerate(axes):
            out[:, k] = xyz[:, 0] * T[i, 0] + xyz[:, 1] * T[i, 1] + xyz[:, 2] * T[i, 2] + T[i, 3]
    return out


def _project_camera(p: np.ndarray, camera: CameraModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Camera-frame points (K, 3) -> (uv (K, 2) float64, usable (K,), in_lens (K,)) before the
    depth and image-bounds tests. Elementwise only, so a subset of points gets bit-identical
    results to the whole cloud (``project_in_view`` relies on that)."""
    depth = p[:, 2]
    # Non-finite points and depth 0 are masked by the caller, not warned about per frame.
    with np.errstate(divide="ignore", invalid="ignore"):
        x = p[:, 0] / depth
        y = p[:, 1] / depth
    usable = np.isfinite(x) & np.isfinite(y)
    if not usable.all():
        x = np.where(usable, x, np.nan)
        y = np.where(usable, y, np.nan)
    in_lens = np.ones(p.shape[0], dtype=bool)
    if camera.distortion_model != "none":
        c = _coefficients(camera)
        r2 = x * x + y * y
        with np.errstate(invalid="ignore"):
            # The cached radius bounds the whole monotonic region; the per-point slope check also
            # catches a fold the radius search sampled past.
            slope, den = _radial_slope(r2, c)
            in_lens = (r2 <= valid_radius(camera) ** 2) & (slope > 0) & (den > 0)
        x, y = _distort(x, y, c)
    return _to_pixels(x, y, camera.K), usable, in_lens


def _in_image(uv: np.ndarray, camera: CameraModel) -> np.ndarray:
    """(K,) bool: uv inside [-0.5, width - 0.5) x [-0.5, height - 0.5) (False for NaN)."""
    with np.errstate(invalid="ignore"):
        return ((uv[:, 0] >= -0.5) & (uv[:, 0] < camera.width - 0.5)
                & (uv[:, 1] >= -0.5) & (uv[:, 1] < camera.height - 0.5))


def project_points(
    points_xyz: np.ndarray, camera: CameraModel, min_depth: float = 0.1
) -> Projection:
    """Project LiDAR points into the camera image.

    Args:
        points_xyz: (N, 3) or (N, 4) points in the LiDAR frame, metres (a 4th column, e.g.
            intensity, is ignored).
        camera: intrinsics, distortion, image size and ``T_cam_lidar``.
        min_depth: points closer than this along the optical axis (metres) are not in view.

    Returns:
        A ``Projection`` with uv (N, 2), depth (N,) and in_view (N,).
    """
    p = _camera_coordinates(_as_points(points_xyz, "points_xyz"), camera)
    depth = p[:, 2]
    uv, usable, in_lens = _project_camera(p, camera)
    with np.errstate(invalid="ignore"):
        in_view = usable & in_lens & (depth > min_depth) & _in_image(uv, camera)
    return Projection(uv=uv, depth=depth, in_view=in_view)


def project_in_view(
    points_xyz: np.ndarray, camera: CameraModel, min_depth: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """``project_points``'s in_view (N,) bool and uv[in_view] (M, 2) float64, bit for bit, at a
    fraction of the cost: the lens model runs only on the points in front of the camera (on a
    forward camera and a spinning LiDAR, about half of them). What ``inputs.prepare`` needs."""
    xyz = _as_points(points_xyz, "points_xyz")
    if camera.distortion_model == "none":  # one compiled pass (a rectified camera: KITTI's)
        uv = np.empty((xyz.shape[0], 2))
        in_view, m = cpu_kernels.pinhole_in_view(np.ascontiguousarray(xyz), camera.T_cam_lidar, camera.K,
                                                 camera.width, camera.height, float(min_depth), uv)
        return in_view, uv[:m]
    with np.errstate(invalid="ignore"):
        front = np.flatnonzero(_camera_coordinates(xyz, camera, (2,))[:, 0] > min_depth)
    uv, usable, in_lens = _project_camera(_camera_coordinates(xyz[front], camera), camera)
    keep = usable & in_lens & _in_image(uv, camera)
    in_view = np.zeros(xyz.shape[0], dtype=bool)
    in_view[front[keep]] = True
    return in_view, uv[keep]


# -- spherical range image ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RangeProjection:
    """Points of one LiDAR scan mapped onto a rows x cols spherical range image.

    Attributes:
        rows: (N,) int64 row of every point; points outside the vertical field of view are
            clipped to the first / last row (RangeNet++), invalid points (zero range, NaN) get
            the row of pitch 0 as a placeholder.
        cols: (N,) int64 column of every point (col 0 is directly behind the sensor, col cols/2
            straight ahead on +x, azimuth increases towards lower columns).
        range: (N,) float32 distance from the sensor origin, metres (NaN for non-finite points).
        in_fov: (N,) bool, valid points whose pitch lies in [fov_down, fov_up].
        valid: (N,) bool, finite points with range > 0; only these can win a cell.
        cell_to_point: (rows, cols) int32 index of the nearest valid point that fell in each
            cell, -1 where no point did.
    """

    rows: np.ndarray
    cols: np.ndarray
    range: np.ndarray
    in_fov: np.ndarray
    valid: np.ndarray
    cell_to_point: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the image."""
        return self.cell_to_point.shape

    @property
    def num_points(self) -> int:
        return int(self.rows.shape[0])

    @property
    def occupied(self) -> np.ndarray:
        """(rows, cols) bool, cells that some point won."""
        return self.cell_to_point >= 0

    def image(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Scatter per-point values of the winning points into the grid.

        Args:
            values: (N,) or (N, C) per-point values.
            fill: value of empty cells.

        Returns:
            (rows, cols) float32 for (N,) input, (C, rows, cols) float32 for (N, C) input.
        """
        values = np.asarray(values)
        if values.ndim not in (1, 2) or values.shape[0] != self.num_points:
            raise ValueError(
                f"values must have shape ({self.num_points},) or ({self.num_points}, C), "
                f"got {values.shape}"
            )
        flat = values.reshape(self.num_points, -1)
        out = np.full((flat.shape[1],) + self.shape, fill, dtype=np.float32)
        occ = self.cell_to_point >= 0
        out[:, occ] = flat[self.cell_to_point[occ]].T
        return out[0] if values.ndim == 1 else out

    def gather(self, grid: np.ndarray) -> np.ndarray:
        """Read every point's own cell: the inverse of ``image`` for per-cell predictions.

        Args:
            grid: (rows, cols) or (C, rows, cols) per-cell values.

        Returns:
            (N,) or (N, C), dtype of ``grid``. Every point reads its cell, including points that
            lost the cell to a nearer one and out-of-FOV points (clipped rows); invalid points
            read their placeholder cell, so mask them with ``valid``.
        """
        grid = np.asarray(grid)
        if grid.shape[-2:] != self.shape or grid.ndim not in (2, 3):
            raise ValueError(
                f"grid must have shape {self.shape} or (C, {self.shape[0]}, {self.shape[1]}), "
                f"got {grid.shape}"
            )
        picked = grid[..., self.rows, self.cols]
        return picked if grid.ndim == 2 else picked.T


def spherical_cell(yaw: Any, pitch: Any, cfg: RangeImageConfig, floor: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Unclipped (col, row) of directions yaw, pitch (radians), as float arrays: numpy arrays
    with ``np.floor`` or torch tensors with ``torch.floor`` (the device path). The compiled CPU
    loop (``cpu_kernels.spherical_cells``) spells the same formula out per point."""
    col = floor(0.5 * (1.0 - yaw / np.pi) * int(cfg.cols))
    row = floor((1.0 - (pitch - cfg.fov_down) / (cfg.fov_up - cfg.fov_down)) * int(cfg.rows))
    return col, row


def range_projection(points: np.ndarray, cfg: RangeImageConfig) -> RangeProjection:
    """Spherical projection of a spinning-LiDAR scan (RangeNet++ conventions).

    yaw = atan2(y, x), pitch = asin(z / range);
    col = floor(0.5 (1 - yaw / pi) cols), row = floor((1 - (pitch - fov_down) / fov) rows),
    both clipped into the image. Each cell keeps its nearest valid point, compared on the float32
    ranges returned (ties: lowest index); points outside the vertical FOV compete for the clipped
    first / last row, as in RangeNet++.

    In float32, as the clouds arrive and as RangeNet++'s own projection computes: a cell is
    0.18 degrees wide and float32 places a point to ~1e-5 of a cell, so against float64 a few
    points per 124k-point scan (those within that of a cell border) change cell. One compiled
    pass (``cpu_kernels.spherical_cells``, pitch as atan2(z, hypot(x, y)), the same angle) and
    one for the nearest points: 0.7 ms for a KITTI scan against 2.4 for the numpy passes.

    Args:
        points: (N, 3) or (N, 4) points in the LiDAR frame, metres.
        cfg: image size and vertical field of view.

    Returns:
        A ``RangeProjection``.

    Raises:
        ConfigError: ``cfg`` is invalid (non-positive size, fov_up <= fov_down).
    """
    cfg.validate()  # a zero-size image or an inverted FOV would otherwise fail obscurely below
    xyz = _as_points(points, dtype=np.float32)
    n, n_rows, n_cols = xyz.shape[0], int(cfg.rows), int(cfg.cols)
    rows, cols = np.empty(n, np.int64), np.empty(n, np.int64)  # int64: what every indexer takes
    range32, valid, in_fov = np.empty(n, np.float32), np.empty(n, bool), np.empty(n, bool)
    x, y, z = (np.ascontiguousarray(xyz[:, k]) for k in range(3))
    cpu_kernels.spherical_cells(x, y, z, n_rows, n_cols, cfg.fov_up, cfg.fov_down, rows, cols, range32, valid, in_fov)
    return RangeProjection(
        rows=rows,
        cols=cols,
        range=range32,
        in_fov=in_fov,
        valid=valid,
        cell_to_point=nearest_per_cell(rows, cols, range32, valid, (n_rows, n_cols)),
    )


def nearest_per_cell(rows: np.ndarray, cols: np.ndarray, range32: np.ndarray, valid: np.ndarray,
                     shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) int32 index of the nearest valid point of each cell, -1 where none fell.

    rows, cols: (N,) cell of each point; range32: (N,) float32 range (m); valid: (N,) bool, the
    points that may win. Nearest is judged on the float32 ranges, ties go to the lowest index
    (one compiled pass in point order, a later point must be strictly nearer: 0.2 ms for a
    KITTI scan, against 0.45 for the np.minimum.at of packed (range, index) keys it replaces).
    """
    n_rows, n_cols = shape
    if rows.shape[0] >= 2 ** 31:
        raise ValueError(f"at most 2**31 - 1 points, got {rows.shape[0]}")
    best, winner = np.empty(n_rows * n_cols, np.float32), np.empty(n_rows * n_cols, np.int32)
    cpu_kernels.nearest_per_cell(np.asarray(rows, np.int64), np.asarray(cols, np.int64),
                                 np.asarray(range32, np.float32), np.asarray(valid, bool), n_cols, best, winner)
    return winner.reshape(n_rows, n_cols)


def range_image_channels(
    points: np.ndarray, proj: RangeProjection, fill: float = 0.0
) -> np.ndarray:
    """The network input channels range, x, y, z, intensity of the winning points.

    Args:
        points: (N, 4) x, y, z (metres) and intensity, the cloud ``proj`` was computed from.
        proj: its ``range_projection``.
        fill: value of empty cells in every channel.

    Returns:
        (5, rows, cols) float32.
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 4 or pts.shape[0] != proj.num_points:
        raise ValueError(f"points must have shape ({proj.num_points}, 4), got {pts.shape}")
    out = np.empty((5, proj.cell_to_point.size), dtype=np.float32)
    cpu_kernels.cell_channels(np.ascontiguousarray(pts, dtype=np.float32), proj.range, proj.cell_to_point.ravel(),
                              np.float32(fill), out)
    return out.reshape((5,) + proj.shape)
