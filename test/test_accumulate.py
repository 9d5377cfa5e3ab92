"""ScanHistory (refine/accumulate.py): past scans brought into the current LiDAR frame through
odometry, on synthetic geometry and on real KITTI scans with their poses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.refine.accumulate import ScanHistory, voxel_keys
from pl3d_ros.transforms import invert, make_transform

WALL_X = 20.0  # the wall plane x = 20 m of the odometry frame


def pose(t: float) -> np.ndarray:
    """T_odom_lidar of a sensor driving along x at 8 m/s and turning at 0.2 rad/s, 1.7 m up."""
    yaw = 0.2 * t
    return make_transform([8.0 * t, 0.5 * t, 1.7], [0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)])


def wall_scan(T_odom_lidar: np.ndarray, rng: np.random.Generator, n: int = 400) -> np.ndarray:
    """(n, 4) float32: fresh random samples of the wall, in the LiDAR frame at that pose."""
    odom = np.stack([np.full(n, WALL_X), rng.uniform(-10, 10, n), rng.uniform(0, 4, n)], 1)
    lidar = (odom - T_odom_lidar[:3, 3]) @ T_odom_lidar[:3, :3]  # inv(T) p, row vectors
    return np.c_[lidar, rng.uniform(0, 1, n)].astype(np.float32)


def to_odom(T_odom_lidar: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts.astype(np.float64) @ T_odom_lidar[:3, :3].T + T_odom_lidar[:3, 3]


def test_a_wall_seen_while_moving_lands_on_itself():
    rng = np.random.default_rng(0)
    h = ScanHistory(k=3, voxel_m=0.0)
    scans = []
    for i in range(3):
        T = pose(0.1 * i)
        scans.append(wall_scan(T, rng))
        h.add(scans[-1], T, labels=np.full(400, i), stamp_ns=i * 100_000_000)
    T_now = pose(0.3)
    pts, labels, age = h.recent(T_now)
    assert pts.shape == (1200, 3) and pts.dtype == np.float32
    assert labels.dtype == np.int64 and age.dtype == np.int64
    # every accumulated point, seen from the current pose, lies on the wall
    np.testing.assert_allclose(to_odom(T_now, pts)[:, 0], WALL_X, atol=1e-4)
    # ... and is exactly its original sample, moved: newest scan first, age 0
    np.testing.assert_array_equal(age, np.repeat([0, 1, 2], 400))
    np.testing.assert_array_equal(labels, np.repeat([2, 1, 0], 400))
    for a, i in ((0, 2), (2, 0)):
        expected = invert(T_now) @ pose(0.1 * i)
        moved = scans[i][:, :3].astype(np.float64) @ expected[:3, :3].T + expected[:3, 3]
        np.testing.assert_allclose(pts[age == a], moved, atol=1e-4)
    # without odometry, the same points do not line up: the check above is not vacuous
    raw = np.concatenate([s[:, :3] for s in scans])
    assert np.abs(to_odom(T_now, raw)[:, 0] - WALL_X).max() > 1.0


def test_k_bounds_the_scans_and_the_oldest_goes():
    rng = np.random.default_rng(1)
    h = ScanHistory(k=2, voxel_m=0.0)
    for i in range(5):
        h.add(wall_scan(pose(0.1 * i), rng, 50 + i), pose(0.1 * i), None, stamp_ns=10 + i)
    assert len(h) == 2 and h.stamps_ns == [13, 14] and h.num_points == 53 + 54
    assert h.nbytes == (53 + 54) * (12 + 8)
    _, labels, age = h.recent(pose(0.5))
    assert sorted(set(age.tolist())) == [0, 1] and np.all(labels == -1)
    assert np.count_nonzero(age == 0) == 54


def test_lost_odometry_and_time_going_back_clear_the_history():
    rng = np.random.default_rng(2)
    h = ScanHistory(k=4)
    h.add(wall_scan(pose(0.0), rng), pose(0.0), None, stamp_ns=100)
    h.add(wall_scan(pose(0.1), rng), pose(0.1), None, stamp_ns=200)
    pts, labels, age = h.recent(None)  # no pose now: nothing can be brought into this frame
    assert pts.shape == (0, 3) and labels.shape == age.shape == (0,)
    h.add(wall_scan(pose(0.2), rng), None, None, stamp_ns=300)  # odometry lost: cleared, not kept
    assert len(h) == 0 and h.resets == 1 and h.recent(pose(0.3))[0].shape == (0, 3)
    h.add(wall_scan(pose(0.3), rng), pose(0.3), None, stamp_ns=400)
    h.add(wall_scan(pose(0.4), rng), pose(0.4), None, stamp_ns=500)
    h.add(wall_scan(pose(0.0), rng), pose(0.0), None, stamp_ns=100)  # the bag looped
    assert h.stamps_ns == [100] and h.resets == 2
    h.reset()
    assert len(h) == 0 and h.num_points == 0


def test_voxels_bound_the_points_and_keep_measured_labelled_ones():
    """One point per 0.1 m voxel and scan; over scans one per voxel, labelled first, then newest:
    the same static surface seen twice adds nothing, while new ground does."""
    rng = np.random.default_rng(3)
    T = pose(0.0)
    cube = rng.uniform(0, 1, (20_000, 3))  # 1 m^3: 1000 voxels of 0.1 m, ~20 points each
    labels = np.where(rng.random(20_000) < 0.5, 7, -1)
    h = ScanHistory(k=5, voxel_m=0.1)
    h.add(cube, T, labels, stamp_ns=1)
    n_voxels = np.unique(voxel_keys(to_odom(T, cube), 0.1)).size
    assert h.num_points == n_voxels <= 1000
    pts, lab, age = h.recent(T)
    assert np.all(lab == 7)  # every voxel had a labelled point: it was kept, not an unlabelled one
    # kept points are measured ones (no centroids)
    d, _ = cKDTree(cube).query(pts.astype(np.float64), workers=1)
    assert d.max() < 1e-5
    # the same place seen again (fresh samples, now unlabelled) plus a new cube next to it
    again = np.concatenate([rng.uniform(0, 1, (20_000, 3)), rng.uniform(0, 1, (5_000, 3)) + [2, 0, 0]])
    h.add(again, T, None, stamp_ns=2)
    pts, lab, age = h.recent(T)
    near = pts[:, 0] < 1.5
    assert np.count_nonzero(near) == n_voxels  # no duplicates of the surface already held
    assert np.all(lab[near] == 7) and np.all(age[near] == 1)  # labelled older beats unlabelled newer
    assert np.all(age[~near] == 0) and np.count_nonzero(~near) <= 1000
    # between two labelled (or two unlabelled) candidates the newest scan's wins
    h2 = ScanHistory(k=3, voxel_m=0.1)
    h2.add(cube, T, np.full(20_000, 1), stamp_ns=1)
    h2.add(cube + 1e-3, T, np.full(20_000, 2), stamp_ns=2)
    _, lab2, age2 = h2.recent(T)
    assert np.mean(lab2 == 2) > 0.9 and np.all(age2[lab2 == 2] == 0)


def test_inputs_are_checked():
    h = ScanHistory(2)
    with pytest.raises(ValueError, match="k >= 1"):
        ScanHistory(0)
    with pytest.raises(ValueError, match="voxel_m"):
        ScanHistory(2, voxel_m=-0.1)
    with pytest.raises(ValueError, match="float"):
        h.add(np.zeros((5, 2), np.float32), np.eye(4), None, 1)
    with pytest.raises(ValueError, match="labels must be"):
        h.add(np.zeros((5, 3), np.float32), np.eye(4), np.zeros(4, np.int64), 1)
    with pytest.raises(ValueError, match="not rigid"):
        h.add(np.zeros((5, 3), np.float32), np.diag([2.0, 1, 1, 1]), None, 1)
    # non-finite points are not kept (they would share a garbage voxel)
    pts = np.ones((3, 3), np.float32)
    pts[1, 0] = np.nan
    h.add(pts, np.eye(4), np.arange(3), stamp_ns=1)
    assert h.num_points == 1  # two equal points -> one voxel, the NaN one dropped


def test_accumulating_kitti_scans_densifies_the_current_view(kitti00):
    """Five scans of sequence 00 brought into scan 5's frame: static structure of the history
    lies on scan 5's own (median nearest-neighbour distance of a few cm), and the points inside
    the camera's view grow by a large factor beyond 20 m, where one scan is sparse."""
    seq = KittiSequence(kitti00)
    h = ScanHistory(k=5, voxel_m=0.1)
    for i in range(5):
        sem = seq.read_labels(i) & 0xFFFF
        h.add(seq.read_points(i), seq.pose(i), sem.astype(np.int64), seq.stamp_ns(i))
    now = seq.frame(5)
    pts, labels, age = h.recent(now.pose)
    assert set(np.unique(age).tolist()) == {0, 1, 2, 3, 4}
    building = np.isin(labels, (50,))
    cur_building = now.points[(now.labels & 0xFFFF) == 50, :3].astype(np.float64)
    d, _ = cKDTree(cur_building).query(pts[building].astype(np.float64), workers=1)
    assert np.median(d) < 0.1, np.median(d)  # metres

    def far_in_view(xyz: np.ndarray) -> int:
        cam = xyz.astype(np.float64) @ now.camera.T_cam_lidar[:3, :3].T + now.camera.T_cam_lidar[:3, 3]
        z = cam[:, 2]
        uv = cam[:, :2] @ now.camera.K[:2, :2].T / np.maximum(z, 1e-6)[:, None] + now.camera.K[:2, 2]
        inside = (z > 20.0) & (uv[:, 0] >= 0) & (uv[:, 0] < now.camera.width) \
            & (uv[:, 1] >= 0) & (uv[:, 1] < now.camera.height)
        return int(np.count_nonzero(inside))

    single, accumulated = far_in_view(now.points[:, :3]), far_in_view(pts)
    assert accumulated > 2.5 * single, (single, accumulated)
    assert h.nbytes < 5 * now.num_points * 20  # the voxels keep it below five raw scans
