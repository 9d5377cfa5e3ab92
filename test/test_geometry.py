"""Tests of pl3d_ros.geometry: camera projection, lens distortion and the spherical range image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pl3d_ros.config import ConfigError, RangeImageConfig
from pl3d_ros.frame import CameraModel
from pl3d_ros.geometry import (
    distort_normalized,
    project_points,
    range_image_channels,
    range_projection,
    undistort_pixels,
    valid_radius,
)

KITTI = Path("/work/shared/data/semantickitti-mini")


def load_kitti(seq: str, frame: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(points (N, 4) float32, P2 (3, 4), Tr (4, 4), width, height) of one SemanticKITTI frame."""
    root = KITTI / "sequences" / seq
    if not root.is_dir():
        pytest.skip(
            f"SemanticKITTI test data not found at {root} (see /work/shared/data/README.md)"
        )
    calib = {}
    for line in (root / "calib.txt").read_text().splitlines():
        if ":" in line:
            key, values = line.split(":", 1)
            calib[key.strip()] = np.array(values.split(), dtype=np.float64).reshape(3, 4)
    Tr = np.vstack([calib["Tr"], [0.0, 0.0, 0.0, 1.0]])
    points = np.fromfile(root / "velodyne" / f"{frame:06d}.bin", dtype=np.float32).reshape(-1, 4)
    with Image.open(root / "image_2" / f"{frame:06d}.png") as img:
        width, height = img.size
    return points, calib["P2"], Tr, width, height


def kitti_camera(P2: np.ndarray, Tr: np.ndarray, width: int, height: int) -> CameraModel:
    """The image_2 camera: P2 = K [I | t], so T_cam_lidar = [I | t] Tr."""
    K = P2[:, :3]
    shift = np.eye(4)
    shift[:3, 3] = np.linalg.solve(K, P2[:, 3])
    return CameraModel(K, width, height, shift @ Tr)


def pinhole(model: str = "none", D=(), width: int = 1280, height: int = 720, f: float = 700.0):
    K = np.array([[f, 0.0, 0.5 * width - 3.2], [0.0, f, 0.5 * height + 4.1], [0.0, 0.0, 1.0]])
    return CameraModel(K, width, height, np.eye(4), model, np.asarray(D, dtype=float))


PLUMB_BOB = ("plumb_bob", (-0.3, 0.1, 1e-3, -5e-4, 0.0), 700.0)
# A ~160-degree diagonal wide-angle lens (fx = 400 px for a 1280-px-wide image).
RATIONAL_WIDE = ("rational_polynomial", (0.6, 0.05, 2e-4, -3e-4, 0.0, 1.0, 0.2, 0.0), 400.0)


# -- camera projection -------------------------------------------------------------------------


@pytest.mark.parametrize("seq", ["00", "04"])
def test_kitti_projection_matches_P2_Tr(seq):
    points, P2, Tr, width, height = load_kitti(seq)
    camera = kitti_camera(P2, Tr, width, height)
    proj = project_points(points, camera)

    hom = np.c_[points[:, :3].astype(np.float64), np.ones(len(points))]
    uvw = hom @ (P2 @ Tr).T
    front = uvw[:, 2] > 0.1
    uv = uvw[front, :2] / uvw[front, 2:]
    assert np.abs(proj.uv[front] - uv).max() < 1e-6
    np.testing.assert_allclose(proj.depth, uvw[:, 2], atol=1e-9)

    hand = np.zeros(len(points), dtype=bool)
    hand[front] = (uv[:, 0] >= -0.5) & (uv[:, 0] < width - 0.5)
    hand[front] &= (uv[:, 1] >= -0.5) & (uv[:, 1] < height - 0.5)
    np.testing.assert_array_equal(proj.in_view, hand)
    assert 0.10 < proj.in_view.sum() / len(points) < 0.25

    cols, rows = proj.pixels(width, height)[proj.in_view].T
    assert rows.shape == cols.shape == (proj.in_view.sum(),)
    assert rows.min() >= 0 and rows.max() < height and cols.min() >= 0 and cols.max() < width
    np.testing.assert_array_equal(cols, np.floor(uv[hand[front], 0] + 0.5))


def test_points_behind_camera_are_excluded():
    camera = pinhole()
    K = camera.K
    # Behind the camera: x/z = -0.1, y/z = 0.04 would land well inside the image.
    pts = np.array([[0.5, -0.2, -5.0], [-0.5, 0.2, 5.0], [0.001, 0.0, 0.05], [1.0, 1.0, 0.0]])
    proj = project_points(pts, camera)
    u_behind = K[0, 0] * (0.5 / -5.0) + K[0, 2]
    assert 0 <= u_behind < camera.width
    np.testing.assert_allclose(proj.uv[0], proj.uv[1])  # same ray, mirrored
    np.testing.assert_array_equal(proj.in_view, [False, True, False, False])
    assert np.all(np.isnan(proj.uv[3]))  # depth 0: no projection, no crash
    assert proj.depth[0] == -5.0


def test_projection_respects_T_cam_lidar_and_pixel_bounds():
    # LiDAR x forward, y left, z up -> optical z forward, x right, y down, plus an offset.
    T = np.array([[0, -1, 0, 0.1], [0, 0, -1, -0.2], [1, 0, 0, 0.3], [0, 0, 0, 1.0]])
    K = np.array([[100.0, 0.0, 49.5], [0.0, 100.0, 29.5], [0.0, 0.0, 1.0]])
    camera = CameraModel(K, 100, 60, T)
    assert project_points(np.array([[9.7, 0.0, 0.0]]), camera).uv[0] == pytest.approx([50.5, 27.5])

    def lidar_point(u: float, v: float, depth: float = 10.0) -> list[float]:
        xc, yc = (u - 49.5) / 100 * depth, (v - 29.5) / 100 * depth
        return [depth - 0.3, 0.1 - xc, -0.2 - yc]

    eps = 1e-6
    targets = [(-0.5 + eps, 3.0), (-0.5 - eps, 3.0), (99.5 - eps, 59.5 - eps), (99.5 + eps, 3.0),
               (7.0, -0.5 + eps), (7.0, -0.5 - eps), (7.0, 59.5 + eps), (50.49, 28.51)]
    proj = project_points(np.array([lidar_point(u, v) for u, v in targets]), camera)
    np.testing.assert_allclose(proj.uv, targets, atol=1e-9)
    np.testing.assert_allclose(proj.depth, 10.0)
    np.testing.assert_array_equal(
        proj.in_view, [True, False, True, False, True, False, False, True]
    )
    cols, rows = proj.pixels(100, 60)[proj.in_view].T
    np.testing.assert_array_equal(cols, [0, 99, 7, 50])
    np.testing.assert_array_equal(rows, [3, 59, 0, 29])
    np.testing.assert_array_equal(np.flatnonzero(proj.in_view), [0, 2, 4, 7])

    # Exactly on the edges (binary-exact numbers): -0.5 is inside, size - 0.5 is outside.
    camera = CameraModel(np.array([[128.0, 0, 63.5], [0, 128.0, 31.5], [0, 0, 1]]), 128, 64)
    edges = np.array([[-4.0, 0, 8], [4.0, 0, 8], [0, -2.0, 8], [0, 2.0, 8]])
    proj = project_points(edges, camera)
    np.testing.assert_array_equal(
        proj.uv, [[-0.5, 31.5], [127.5, 31.5], [63.5, -0.5], [63.5, 63.5]]
    )
    np.testing.assert_array_equal(proj.in_view, [True, False, True, False])


# -- lens distortion ---------------------------------------------------------------------------


def test_distort_normalized_matches_opencv_formula():
    D = np.array([0.4, -0.1, 2e-3, -1e-3, 0.02, 0.5, 0.05, 0.01])
    camera = pinhole("rational_polynomial", D)
    k1, k2, p1, p2, k3, k4, k5, k6 = D
    xy = np.array([[0.3, -0.2], [-0.7, 0.5], [0.0, 0.0], [1.2, 0.9]])
    got = distort_normalized(xy, camera)
    for (x, y), (u, v) in zip(xy, got):
        r2 = x * x + y * y
        radial = (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        K = camera.K
        assert u == pytest.approx(K[0, 0] * xd + K[0, 1] * yd + K[0, 2], abs=1e-9)
        assert v == pytest.approx(K[1, 1] * yd + K[1, 2], abs=1e-9)


@pytest.mark.parametrize("model,D,f", [PLUMB_BOB, RATIONAL_WIDE], ids=["plumb_bob", "rational"])
def test_distortion_round_trip(model, D, f):
    camera = pinhole(model, D, f=f)
    # The image [-0.5, size - 0.5) up to 1e-3 px from its (half-open) edges, corners included.
    u, v = np.meshgrid(np.linspace(-0.499, camera.width - 0.501, 97),
                       np.linspace(-0.499, camera.height - 0.501, 61))
    uv = np.stack([u.ravel(), v.ravel()], axis=-1)
    xy = undistort_pixels(uv, camera)
    assert np.all(np.isfinite(xy))
    assert np.abs(distort_normalized(xy, camera) - uv).max() < 1e-6
    # The whole image lies inside the lens's valid region, the corners close to its 10 % margin.
    r = np.hypot(xy[:, 0], xy[:, 1])
    assert r.max() < valid_radius(camera) <= 1.1 * r.max() * (1 + 1e-4)

    # 3-D rays through those pixels project back onto them, all in view.
    rays = np.c_[xy, np.ones(len(xy))] * 7.5
    proj = project_points(rays, camera)
    assert proj.in_view.all()
    assert np.abs(proj.uv - uv).max() < 1e-6


def test_undistort_without_distortion_is_inverse_intrinsics():
    camera = pinhole()
    xy = np.array([[0.1, -0.2], [-0.5, 0.3]])
    back = undistort_pixels(distort_normalized(xy, camera), camera)
    np.testing.assert_allclose(back, xy, atol=1e-12)
    assert valid_radius(camera) == math.inf


def test_fold_back_guard_excludes_far_off_axis_points():
    # Strong barrel distortion whose polynomial folds a direction 80 degrees off-axis back to the
    # middle of the image: r * radial(r) = 0 there.
    r80 = math.tan(math.radians(80.0))
    k1 = -0.5
    k2 = -(1 + k1 * r80**2) / r80**4
    camera = pinhole("plumb_bob", (k1, k2, 0.0, 0.0, 0.0), f=500.0)
    direction = np.array([math.cos(0.3), math.sin(0.3)]) * r80 * 0.999
    pts = np.array([[*direction, 1.0], [0.2, -0.1, 1.0]]) * 10.0

    raw = distort_normalized(pts[:, :2] / pts[:, 2:], camera)
    assert (0 <= raw[0, 0] < camera.width) and (0 <= raw[0, 1] < camera.height)  # folded inside
    proj = project_points(pts, camera)
    np.testing.assert_array_equal(proj.in_view, [False, True])

    # The guard radius stops at the fold: the distorted radius rises up to it.
    r_limit = valid_radius(camera)
    r = np.linspace(0.0, r_limit, 1000)
    f = r * (1 + k1 * r**2 + k2 * r**4)
    assert np.all(np.diff(f) > 0)
    assert r_limit < 1.0 < r80

    # Pixels outside the lens's image circle cannot be undistorted: NaN, not a folded answer.
    corner = undistort_pixels(np.array([[0.0, 0.0], [camera.K[0, 2], camera.K[1, 2]]]), camera)
    assert np.all(np.isnan(corner[0])) and np.allclose(corner[1], 0.0)


def test_valid_radius_is_cached_by_calibration():
    a = pinhole(*PLUMB_BOB[:2], f=PLUMB_BOB[2])
    b = pinhole(*PLUMB_BOB[:2], f=PLUMB_BOB[2])
    c = pinhole(*PLUMB_BOB[:2], f=350.0)
    assert valid_radius(a) == valid_radius(b)
    assert valid_radius(c) > valid_radius(a)  # a wider field of view reaches further off-axis


# -- range image -------------------------------------------------------------------------------


def test_known_points_land_in_known_cells():
    cfg = RangeImageConfig(cols=2048)  # 64 x 2048, +3 / -25 degrees
    pts = np.array(
        [
            [10.0, 0.0, 0.0],  # straight ahead, pitch 0
            [-10.0, 0.0, 0.0],  # straight behind: yaw = pi
            [0.0, 5.0, 0.0],  # left: yaw = pi / 2
            [5.0, 0.0, 5.0 * math.tan(math.radians(10.0))],  # above the FOV
            [5.0, 0.0, -5.0 * math.tan(math.radians(40.0))],  # below the FOV
            [5.0, 0.0, -5.0 * math.tan(math.radians(24.9))],  # just inside the bottom
        ],
        dtype=np.float32,
    )
    proj = range_projection(pts, cfg)
    row0 = math.floor((1 - 25.0 / 28.0) * 64)  # = 6
    assert row0 == 6
    np.testing.assert_array_equal(proj.cols[:3], [1024, 0, 512])
    np.testing.assert_array_equal(proj.rows, [row0, row0, row0, 0, 63, 63])
    np.testing.assert_array_equal(proj.in_fov, [True, True, True, False, False, True])
    np.testing.assert_allclose(proj.range[:3], [10.0, 10.0, 5.0])
    assert proj.rows.dtype == proj.cols.dtype == np.int64 and proj.cell_to_point.dtype == np.int32
    assert proj.range.dtype == np.float32
    assert proj.cell_to_point[row0, 1024] == 0 and proj.cell_to_point[0, 1024] == 3
    with pytest.raises(ConfigError):
        range_projection(pts, RangeImageConfig(fov_up_deg=-30.0))


def _brute_force_cells(pts: np.ndarray, cfg: RangeImageConfig) -> tuple[list[int], list[int], dict]:
    rows, cols, best = [], [], {}
    fov = cfg.fov_up - cfg.fov_down
    for i, (x, y, z) in enumerate(pts[:, :3].astype(float)):
        rng = math.sqrt(x * x + y * y + z * z)
        col = math.floor(0.5 * (1 - math.atan2(y, x) / math.pi) * cfg.cols)
        col = min(max(col, 0), cfg.cols - 1)
        row = math.floor((1 - (math.asin(z / rng) - cfg.fov_down) / fov) * cfg.rows)
        row = min(max(row, 0), cfg.rows - 1)
        rows.append(row)
        cols.append(col)
        if (row, col) not in best or rng < best[(row, col)][0]:
            best[(row, col)] = (rng, i)
    return rows, cols, best


def test_nearest_point_wins_each_cell_and_round_trips():
    rng = np.random.default_rng(0)
    cfg = RangeImageConfig(rows=6, cols=12, fov_up_deg=10.0, fov_down_deg=-20.0)
    n = 400  # ~5.5 points per cell: many collisions
    direction = rng.normal(size=(n, 3))
    direction[:, 2] *= 0.3
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    pts = np.c_[direction * rng.uniform(1, 50, (n, 1)), rng.uniform(0, 1, n)].astype(np.float32)
    proj = range_projection(pts, cfg)

    rows, cols, best = _brute_force_cells(pts, cfg)
    np.testing.assert_array_equal(proj.rows, rows)
    np.testing.assert_array_equal(proj.cols, cols)
    expected = np.full((cfg.rows, cfg.cols), -1)
    for (r, c), (_, i) in best.items():
        expected[r, c] = i
    np.testing.assert_array_equal(proj.cell_to_point, expected)

    # Channels at winning cells are the winners' own values, bit for bit.
    channels = range_image_channels(pts, proj)
    assert channels.shape == (5, cfg.rows, cfg.cols) and channels.dtype == np.float32
    occ = proj.cell_to_point >= 0
    winners = proj.cell_to_point[occ]
    np.testing.assert_array_equal(channels[1:, occ], pts[winners].T)
    np.testing.assert_array_equal(channels[0, occ], proj.range[winners])
    np.testing.assert_array_equal(channels[:, ~occ], 0.0)

    # gather(image(v)): winners read back their own value, losers read their cell's winner's.
    values = rng.normal(size=(n, 3)).astype(np.float32)
    back = proj.gather(proj.image(values))
    assert back.shape == (n, 3)
    np.testing.assert_array_equal(back[winners], values[winners])
    np.testing.assert_array_equal(back, values[proj.cell_to_point[proj.rows, proj.cols]])
    scalar = proj.gather(proj.image(values[:, 0], fill=-1.0))
    assert scalar.shape == (n,)
    np.testing.assert_array_equal(scalar, back[:, 0])


def test_kitti_range_image():
    points, *_ = load_kitti("00")
    cfg = RangeImageConfig()
    proj = range_projection(points, cfg)
    assert proj.in_fov.mean() >= 0.85
    occupied = proj.cell_to_point >= 0
    assert occupied.mean() > 0.5
    channels = range_image_channels(points, proj, fill=-1.0)
    winners = proj.cell_to_point[occupied]
    np.testing.assert_array_equal(channels[1:4, occupied], points[winners, :3].T)
    np.testing.assert_array_equal(channels[4, occupied], points[winners, 3])
    np.testing.assert_array_equal(channels[:, ~occupied], -1.0)
    # No cell holds a point farther than another point of the same cell.
    assert proj.valid.all()
    cell = proj.rows.astype(np.int64) * cfg.cols + proj.cols
    nearest = np.full(cfg.rows * cfg.cols, np.inf, dtype=np.float32)
    np.minimum.at(nearest, cell, proj.range)
    nearest = nearest.reshape(cfg.rows, cfg.cols)
    np.testing.assert_array_equal(proj.range[winners], nearest[occupied])


def test_zero_range_and_nan_points_do_not_crash():
    cfg = RangeImageConfig(rows=4, cols=8)
    pts = np.array(
        [[0, 0, 0, 1.0], [np.nan, 1.0, 0, 1.0], [np.inf, 0, 0, 1.0], [5.0, 0, 0, 0.5]],
        dtype=np.float32,
    )
    with np.errstate(all="raise"):
        proj = range_projection(pts, cfg)
    np.testing.assert_array_equal(proj.in_fov, [False, False, False, True])
    np.testing.assert_array_equal(proj.valid, [False, False, False, True])
    assert np.all((proj.rows >= 0) & (proj.rows < cfg.rows))
    assert np.all((proj.cols >= 0) & (proj.cols < cfg.cols))
    # The only valid point shares its cell with the placeholders but is the only one to win.
    np.testing.assert_array_equal(proj.cell_to_point[proj.cell_to_point >= 0], [3])
    channels = range_image_channels(pts, proj)
    assert np.all(np.isfinite(channels))
    assert proj.gather(channels).shape == (4, 5)

    camera = pinhole("plumb_bob", PLUMB_BOB[1])
    cam_proj = project_points(pts, camera)
    np.testing.assert_array_equal(cam_proj.in_view, [False, False, False, False])
    assert np.all(np.isnan(undistort_pixels(np.array([[np.nan, 1.0]]), camera)))
