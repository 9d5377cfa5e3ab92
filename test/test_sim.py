"""The simulator: ray casting against known scenes, determinism, presets, and the bag round trip."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from pl3d_ros.frame import Frame
from pl3d_ros.io.bag import BagReader
from pl3d_ros.io.kitti import CAMERA_FRAME, LIDAR_FRAME
from pl3d_ros.labels import load_class_set
from pl3d_ros.sim import PRESETS, Simulator, simulate, simulate_frames, write_bag
from pl3d_ros.sim import raycast as rc
from pl3d_ros.sim.camera import CameraConfig, Lighting, render
from pl3d_ros.sim.lidar import LidarConfig, scan
from pl3d_ros.sim.raycast import Boxes, Cylinders, Ellipsoids, FlatGround, Material, PrimSet, Scene
from pl3d_ros.sim.world import BUILDING, ROAD

H = 1.73  # LiDAR mounting height, metres


def small(name: str):
    """A preset at reduced resolution (fast tests): 512 columns, quarter-size KITTI image."""
    p = PRESETS[name]
    return replace(p, lidar=replace(p.lidar, columns=512), camera=replace(p.camera, scale=0.25))


def wall_scene(height: float = 10.0) -> Scene:
    """A 40 m wide wall whose front face is at x = 10 m, on a road-class ground plane at z = 0."""
    wall = Boxes.make([[10.5, 0.0, height / 2]], [1.0, 40.0, height], 0.0,
                      Material.make(1, BUILDING, (0.7, 0.6, 0.5), 0.5, rc.TEX_PLAIN))
    return Scene(PrimSet(boxes=wall), FlatGround(raw=ROAD))


def lidar_pose() -> np.ndarray:
    T = np.eye(4)
    T[2, 3] = H
    return T


@pytest.fixture(scope="module")
def frames() -> dict[str, object]:
    """One reduced-resolution frame of every preset, same seed and frame index."""
    return {name: Simulator(small(name), 3, seed=7).frame(2) for name in PRESETS}


# ------------------------------------------------------------------------------- known scenes


def test_lidar_ranges_and_classes_in_a_known_scene():
    cfg = LidarConfig(elevations_deg=(5.0, 0.0, -10.0, -20.0), columns=360, range_noise_m=0.0,
                      dropout=0.0, min_range=0.5)
    s = scan(wall_scene(), lidar_pose(), cfg, np.random.default_rng(0))
    xyz = s.points[:, :3].astype(np.float64)
    r = np.linalg.norm(xyz, axis=1)
    az = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))
    ahead, behind = np.abs(az) < 0.6, np.abs(np.abs(az) - 180) < 0.6
    # The horizontal beam: the wall at 10 m straight ahead, 10 / cos(az) to the sides.
    level = s.ring == 1  # ring 0 is the +5 deg beam
    hit = level & ahead
    assert hit.sum() == 2  # the two columns either side of 0 deg
    np.testing.assert_allclose(r[hit], 10.0 / np.cos(np.radians(az[hit])), atol=1e-3)
    assert np.all(s.labels[hit] == BUILDING)
    side = level & (np.abs(az) < 60)
    np.testing.assert_allclose(r[side], 10.0 / np.cos(np.radians(az[side])), atol=1e-3)
    assert not np.any(level & behind)  # nothing behind for a level beam: no return
    # Upward beam: hits the wall ahead (label wall), nothing behind.
    up = s.ring == 0
    slant = 10.0 / math.cos(math.radians(5.0))
    np.testing.assert_allclose(r[up & ahead], slant / np.cos(np.radians(az[up & ahead])), atol=1e-3)
    assert not np.any(up & behind)
    # Downward beams: the ground (road) at h / sin(angle), i.e. h / tan(angle) horizontally.
    for ring, angle in ((2, 10.0), (3, 20.0)):
        sel = (s.ring == ring) & behind
        assert sel.sum() == 2
        np.testing.assert_allclose(r[sel], H / math.sin(math.radians(angle)), atol=1e-3)
        np.testing.assert_allclose(np.hypot(xyz[sel, 0], xyz[sel, 1]), H / math.tan(math.radians(angle)),
                                   atol=1e-3)
        np.testing.assert_allclose(xyz[sel, 2], -H, atol=1e-4)
        assert np.all(s.labels[sel] == ROAD)
    # -10 deg ahead reaches the ground at 9.81 m, before the wall's foot at 10 m.
    sel = (s.ring == 2) & ahead
    assert np.all(s.labels[sel] == ROAD) and np.all(r[sel] < 10.0)
    # Intensity falls with the angle of incidence on the wall.
    wall_pts = level & (s.labels == BUILDING)
    inc = np.abs(az[wall_pts])
    assert np.corrcoef(inc, s.points[wall_pts, 3])[0, 1] < -0.9


def test_camera_sees_the_wall_at_the_principal_point_and_ground_below():
    cam = CameraConfig().camera_model()
    out = render(wall_scene(height=3.0), lidar_pose(), cam, Lighting(noise=0.0), np.random.default_rng(0))
    assert out.image.shape == (cam.height, cam.width, 3) and out.image.dtype == np.uint8
    assert out.labels.shape == (cam.height, cam.width)
    cx, cy = int(round(cam.K[0, 2])), int(round(cam.K[1, 2]))
    # The camera is 0.27 m ahead of the LiDAR: the wall is 9.73 m along the optical axis.
    assert out.labels[cy, cx] == BUILDING
    along_axis = 9.73 * np.linalg.norm(np.linalg.inv(cam.K) @ [cx, cy, 1.0])  # depth along the ray
    assert out.depth[cy, cx] == pytest.approx(along_axis, abs=1e-3)
    # 80 px below the principal point the ray descends 12.5 deg: road at 1.65 / sin(angle).
    v = cy + 80
    ray = np.linalg.inv(cam.K) @ [cx, v, 1.0]
    angle = math.atan2(ray[1], math.hypot(ray[0], ray[2]))
    assert out.labels[v, cx] == ROAD
    assert out.depth[v, cx] == pytest.approx(1.65 / math.sin(angle), abs=1e-3)
    # The 3 m wall ends 7.9 deg above the horizon: the top row is sky, unlabeled, at infinity.
    assert out.labels[0, cx] == 0 and np.isinf(out.depth[0, cx])
    sky, wall = out.image[0, cx].astype(int), out.image[cy, cx].astype(int)
    assert sky[2] > sky[0]  # blue sky, warm wall
    assert wall[0] > wall[2]


def test_cylinders_and_ellipsoids_in_a_known_scene():
    pole = Cylinders.make([[5.0, 0.0]], 0.0, 8.0, 0.5, Material.make(1, 80, (0.5, 0.5, 0.5), 0.4))
    crown = Ellipsoids.make([[0.0, 5.0, H]], [1.0, 2.0, 1.0], Material.make(1, 70, (0.2, 0.4, 0.1), 0.4))
    scene = Scene(PrimSet(cylinders=pole, ellipsoids=crown), FlatGround())
    o = np.array([0.0, 0.0, H])
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    hits = scene.cast(o, dirs, 100.0)
    np.testing.assert_allclose(hits.t[:2], [4.5, 3.0], atol=1e-4)
    assert list(hits.kind) == [rc.KIND_CYLINDER, rc.KIND_ELLIPSOID, rc.KIND_NONE]
    surf = scene.surface(o, dirs, hits)
    np.testing.assert_allclose(surf.normal, [[-1, 0, 0], [0, -1, 0]], atol=1e-5)
    assert list(surf.raw) == [80, 70]


def test_culling_tiles_change_nothing(monkeypatch):
    """Tiled casting equals testing every ray against every primitive (one tile)."""
    sim = Simulator(small("source"), 2, seed=3)
    scene, pose = sim.world.scene_at(0.1), sim.T_world_lidar(1)
    dirs = sim.preset.lidar.directions() @ pose[:3, :3].T
    tiled = scene.cast(pose[:3, 3], dirs, 120.0)
    monkeypatch.setattr(rc, "RAYS_PER_TILE", 10 ** 9)
    sub = slice(None, None, 3)  # a third of the rays keeps the untiled products small
    brute = scene.cast(pose[:3, 3], dirs[sub], 120.0)
    np.testing.assert_array_equal(tiled.kind[sub], brute.kind)
    np.testing.assert_array_equal(tiled.index[sub], brute.index)
    # Matrix products of other shapes round float32 differently: equal to a millimetre.
    np.testing.assert_allclose(tiled.t[sub], brute.t, atol=1e-3, rtol=0)
    monkeypatch.undo()
    # Shadow rays: the tiled shared-direction test agrees with casting each ray on its own.
    surf = scene.surface(pose[:3, 3], dirs, tiled)
    pts = (surf.point + 0.05 * surf.normal)[::400]  # off the surface, as the renderer starts them
    sun = Lighting().sun_direction()
    occ = scene.occluded(pts, sun, max_dist=80.0)
    ref = [scene.cast(p, sun[None], 80.0).kind[0] not in (rc.KIND_NONE, rc.KIND_GROUND) for p in pts]
    np.testing.assert_array_equal(occ, ref)
    assert 0 < occ.sum() < occ.size


# ------------------------------------------------------------------------------- sequences


def test_determinism_with_a_seed():
    a = list(simulate(small("source"), 2, seed=5))
    b = list(simulate(small("source"), 2, seed=5))
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.points, fb.points)
        np.testing.assert_array_equal(fa.labels, fb.labels)
        np.testing.assert_array_equal(fa.image, fb.image)
    # Random access: frame 1 alone equals frame 1 of the sequence.
    np.testing.assert_array_equal(Simulator(small("source"), 2, seed=5).frame(1).points, a[1].points)
    c = Simulator(small("source"), 2, seed=6).frame(1)
    assert c.points.shape != a[1].points.shape or not np.array_equal(c.points, a[1].points)
    assert a[1].stamp_ns - a[0].stamp_ns == 100_000_000  # 10 Hz
    # The ego drives forward: the world moves backwards relative to the LiDAR.
    assert a[1].T_world_lidar[0, 3] > a[0].T_world_lidar[0, 3]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_makes_valid_frames(frames, name):
    f = frames[name]
    frame = f.to_frame()
    assert isinstance(frame, Frame) and frame.dropped_points == 0
    assert frame.labels.dtype == np.uint32 and frame.labels.shape == (frame.num_points,)
    assert frame.image.shape == (frame.camera.height, frame.camera.width, 3)
    assert frame.lidar_frame_id == LIDAR_FRAME and frame.camera.frame_id == CAMERA_FRAME
    cs = load_class_set("xmuda10")
    train = cs.to_train_ids(frame.labels)
    assert np.mean(train == cs.ignore_index) < 0.05  # only fog's backscatter is unlabeled
    assert len(np.unique(train[train != cs.ignore_index])) >= 7
    # Image labels agree with the LiDAR's: the same raw ids, sky unlabeled.
    img_raw = np.unique(f.image_labels & 0xFFFF)
    assert 0 in img_raw and ROAD in img_raw
    # Points project into the image where the camera sees the same class (sanity of T_cam_lidar).
    cam = frame.camera
    p = cam.T_cam_lidar[:3, :3] @ frame.points[:, :3].T.astype(np.float64) + cam.T_cam_lidar[:3, 3:]
    front = p[2] > 1.0
    uv = (cam.K @ p[:, front])[:2] / p[2, front]
    ui, vi = np.rint(uv).astype(int)
    inside = (ui >= 0) & (ui < cam.width) & (vi >= 0) & (vi < cam.height)
    same = (f.image_labels[vi[inside], ui[inside]] & 0xFFFF) == (frame.labels[front][inside] & 0xFFFF)
    assert same.mean() > 0.8


def test_simulate_frames_yields_frames():
    out = list(simulate_frames(small("source"), 1, seed=1))
    assert len(out) == 1 and isinstance(out[0], Frame) and out[0].labels is not None


def test_presets_differ_as_intended(frames):
    def rings(points):
        el = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
        return int(np.sum(np.diff(np.sort(el)) > 0.3)) + 1

    assert rings(frames["source"].points) == 64 and len(np.unique(frames["source"].ring)) == 64
    assert rings(frames["sensor"].points) == 32 and rings(frames["mixed"].points) == 32
    # Mounting height: the road lies 1.73 m below the source LiDAR, 1.95 m below the sensor preset's.
    for name, h in (("source", 1.73), ("sensor", 1.95)):
        road = (frames[name].labels & 0xFFFF) == ROAD
        assert np.median(frames[name].points[road, 2]) == pytest.approx(-h, abs=0.05)
    # Night: same scene, far darker image; the LiDAR is an active sensor and does not care.
    assert frames["night"].image.mean() < 0.6 * frames["source"].image.mean()
    np.testing.assert_array_equal(frames["night"].points, frames["source"].points)
    # Fog: shorter reach, backscatter near the sensor (raw outlier = 1), a washed-out image.
    r_src = np.linalg.norm(frames["source"].points[:, :3], axis=1)
    r_fog = np.linalg.norm(frames["fog"].points[:, :3], axis=1)
    assert np.percentile(r_fog, 99) < 0.8 * np.percentile(r_src, 99)
    assert np.any(frames["fog"].labels == 1)
    assert frames["fog"].image.std() < 0.7 * frames["source"].image.std()
    # Layout: wider road (4 lanes) and more vegetation in view than the source street.
    assert PRESETS["layout"].world.lanes == 4
    cs = load_class_set("xmuda10")
    nature = cs.names.index("nature")

    def share(f, cls):
        return np.mean(cs.to_train_ids(f.image_labels.ravel()) == cls)

    assert share(frames["layout"], nature) > share(frames["source"], nature)
    # The sensor preset's camera is wider (shorter focal length) and pitched down.
    assert frames["sensor"].camera.K[0, 0] < frames["source"].camera.K[0, 0]


def test_bag_round_trip(tmp_path):
    preset = small("night")
    out = tmp_path / "sim"
    seen = []
    assert write_bag(preset, 2, out, seed=2, progress=lambda i, n: seen.append((i, n))) == 2
    assert seen == [(1, 2), (2, 2)] and list(out.glob("*.mcap"))
    assert not list(tmp_path.glob(".*partial"))  # written aside, renamed into place
    expected = list(simulate(preset, 2, seed=2))
    got = list(BagReader(out).frames())
    assert len(got) == 2
    for f, e in zip(got, expected):
        np.testing.assert_array_equal(f.points, e.points)
        np.testing.assert_array_equal(f.labels, e.labels)
        np.testing.assert_array_equal(f.image, e.image)
        assert f.stamp_ns == e.stamp_ns
        np.testing.assert_array_equal(f.camera.K, e.camera.K)
        np.testing.assert_allclose(f.camera.T_cam_lidar, e.camera.T_cam_lidar, atol=1e-9)
        assert f.lidar_frame_id == LIDAR_FRAME and f.camera.frame_id == CAMERA_FRAME
