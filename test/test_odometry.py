"""Odometry poses: KITTI's poses.txt convention checked on the real scans, /tf in kitti2bag and sim
bags, the bag reader's interpolation, the extrinsics fallback beside an odometry edge, and the
node's tf2 bookkeeping (io/odometry.py)."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
from scipy.spatial import cKDTree

from conftest import kitti_sequence_dir
from pl3d_ros.config import Config
from pl3d_ros.frame import CameraModel, Frame, FrameError
from pl3d_ros.io import point_cloud2, ros_msgs
from pl3d_ros.io.bag import BagReader, BagWriter, typestore
from pl3d_ros.io.kitti import LIDAR_FRAME, KittiError, KittiSequence, read_calib, read_poses
from pl3d_ros.io.odometry import ODOM_FRAME, OdometryPoses, TfHistory, interpolate_transform
from pl3d_ros.transforms import invert, make_transform, matrix_to_quaternion

SEQUENCES = ("00", "01", "02", "03", "04", "05")
#: Static structure (SemanticKITTI raw ids): building, fence, other-structure, trunk, pole,
#: traffic-sign. Ground is left out: a scan slid along a flat road still lies on the road.
STATIC = (50, 51, 52, 71, 80, 81)


def rot_z(yaw: float, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    return make_transform(np.asarray(t, float), [0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)])


def static_points(seq: KittiSequence, i: int, max_range: float = 30.0) -> np.ndarray:
    """(M, 3) float64 LiDAR-frame points of static classes within ``max_range`` metres."""
    pts = seq.read_points(i)[:, :3].astype(np.float64)
    sem = seq.read_labels(i) & 0xFFFF
    keep = np.isin(sem, STATIC) & (np.linalg.norm(pts, axis=1) < max_range)
    return pts[keep]


def median_nn(reference: np.ndarray, query: np.ndarray, T: np.ndarray) -> float:
    """Median distance (m) from each ``query`` point moved by T to its nearest ``reference``."""
    d, _ = cKDTree(reference).query(query @ T[:3, :3].T + T[:3, 3], workers=1)
    return float(np.median(d))


# ------------------------------------------------------------------------------- KITTI poses


@pytest.mark.parametrize("name", SEQUENCES)
def test_kitti_poses_register_static_structure(name):
    """T_odom_lidar = inv(Tr) T_cam0 Tr: static structure of scan j, moved into scan 0's frame by
    T_odom_lidar(0)^-1 T_odom_lidar(j), lands on scan 0's own (median nearest-neighbour distance
    at the LiDAR's sampling, a large factor below leaving it unmoved, and well below the two
    products one gets by mixing up the frames)."""
    seq = KittiSequence(kitti_sequence_dir(name))
    np.testing.assert_allclose(seq.pose(0), np.eye(4), atol=1e-6)  # odom = scan 0's LiDAR frame
    ref = static_points(seq, 0)
    raw = np.loadtxt(seq.root / "poses.txt").reshape(-1, 3, 4)
    Tr = np.vstack([seq.calib["Tr"], [0, 0, 0, 1]])
    cam = [np.vstack([raw[i], [0, 0, 0, 1]]) for i in (0, 5)]
    for j, min_ratio in ((1, 3.0), (5, 5.0)):
        query = static_points(seq, j)
        posed = median_nn(ref, query, invert(seq.pose(0)) @ seq.pose(j))
        unmoved = median_nn(ref, query, np.eye(4))
        assert posed < 0.1, (j, posed)  # metres
        assert unmoved / posed > min_ratio, (j, unmoved, posed)
    # the same scan with the wrong products: camera poses applied to LiDAR points, or Tr
    # conjugated the other way round
    query = static_points(seq, 5)
    wrong_raw = median_nn(ref, query, invert(cam[0]) @ cam[1])
    wrong_conj = median_nn(ref, query, invert(Tr @ cam[0] @ invert(Tr)) @ (Tr @ cam[1] @ invert(Tr)))
    assert min(wrong_raw, wrong_conj) > 10 * posed


def test_kitti_pose_axes_are_the_lidar_s(kitti00):
    """odom has the LiDAR's axes (x forward, z up): sequence 00 drives ~6.7 m forward in 0.9 s
    on flat ground, so the translation is along +x, not along cam0's z."""
    seq = KittiSequence(kitti00)
    t = seq.pose(9)[:3, 3]
    assert t[0] > 6.0 and abs(t[1]) < 0.5 and abs(t[2]) < 0.3, t
    frame = seq.frame(9)
    np.testing.assert_array_equal(frame.pose, seq.pose(9))
    assert frame.pose.dtype == np.float64 and frame.pose.shape == (4, 4)


def test_kitti_without_or_with_bad_poses(kitti00, tmp_path):
    seq_dir = tmp_path / "seq"
    seq_dir.mkdir()
    for name in ("velodyne", "image_2", "labels", "calib.txt", "times.txt"):
        (seq_dir / name).symlink_to((kitti00 / name).resolve())
    seq = KittiSequence(seq_dir)
    assert not seq.has_poses and seq.pose(3) is None and seq.frame(0).pose is None
    calib = read_calib(kitti00 / "calib.txt")
    (seq_dir / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1\n")
    with pytest.raises(KittiError, match="11 values per line"):
        KittiSequence(seq_dir).pose(0)
    (seq_dir / "poses.txt").write_text("2 0 0 0 0 1 0 0 0 0 1 0\n")
    with pytest.raises(KittiError, match="poses.txt:1: pose is not a rigid"):
        read_poses(seq_dir / "poses.txt", calib)
    (seq_dir / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1 0\n" * 3)
    with pytest.raises(KittiError, match="has 3 poses"):
        KittiSequence(seq_dir).pose(0)


def test_frame_pose_is_validated():
    cam = CameraModel(np.array([[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]]), 8, 6)
    pts = np.ones((3, 4), np.float32)
    img = np.zeros((6, 8, 3), np.uint8)
    assert Frame(0, pts, img, cam).pose is None
    T = rot_z(0.3, (1.0, 2.0, 0.5))
    np.testing.assert_array_equal(Frame(0, pts, img, cam, pose=T.ravel().tolist()).pose, T)
    with pytest.raises(FrameError, match="pose.*not rigid"):
        Frame(0, pts, img, cam, pose=np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(FrameError, match="pose.*shape"):
        Frame(0, pts, img, cam, pose=np.eye(3))


# ------------------------------------------------------------------------------- bags


def test_kitti2bag_writes_the_poses_as_tf(kitti00, kitti_bag00):
    seq = KittiSequence(kitti00)
    info = BagReader(kitti_bag00).info()
    assert info["topics"]["/tf"]["count"] == 10 and info["topics"]["/tf_static"]["count"] == 1
    assert set(info["tf_frames"]) == {LIDAR_FRAME, "camera_color_left_optical"}  # no odom in there
    reader = BagReader(kitti_bag00)
    frames = list(reader.frames())
    assert len(frames) == 10 and reader.stats.frames_without_pose == 0
    for i, f in enumerate(frames):
        np.testing.assert_allclose(f.pose, seq.pose(i), atol=1e-5)  # quaternion round trip
    # extrinsics still from /tf_static, untouched by the odometry edge
    np.testing.assert_allclose(frames[3].camera.T_cam_lidar, seq.frame(3).camera.T_cam_lidar, atol=1e-6)
    off = BagReader(kitti_bag00, odom_frame="")
    assert all(f.pose is None for f in off.frames()) and off.stats.frames_without_pose == 10
    other = BagReader(kitti_bag00, odom_frame="map")
    assert all(f.pose is None for f in other.frames()) and other.stats.frames_without_pose == 10


def _tf_only_bag(path, cloud_times_s, tf_times_s, *, extrinsics_on_tf=True):
    """Clouds + images at ``cloud_times_s``; /tf odom -> base_link moving along x at 2 m/s with
    yaw 0.1 rad/s, sampled at ``tf_times_s``; base_link -> lidar fixed (/tf_static or, with no
    /tf_static, the first of repeated /tf samples), lidar -> cam on /tf."""
    sec = 1_000_000_000
    cam = CameraModel(np.array([[5.0, 0, 3.5], [0, 5.0, 2.5], [0, 0, 1]]), 8, 6)
    T_base_lidar = make_transform([0.5, 0.0, 1.7], [0, 0, 0, 1])
    T_lidar_cam = rot_z(-0.2, (0.1, 0.0, -0.1))
    rng = np.random.default_rng(0)
    with BagWriter(path) as w:
        f = w.factory
        if not extrinsics_on_tf:
            w.write_static_transform(sec, "base_link", "lidar", T_base_lidar)
            w.write_static_transform(sec, "lidar", "cam", T_lidar_cam)
        events = [(t, "tf") for t in tf_times_s] + [(t, "frame") for t in cloud_times_s]
        for t, kind in sorted(events):
            ns = int(round((100 + t) * sec))
            if kind == "tf":
                moving = [(ns, ODOM_FRAME, "base_link", rot_z(0.1 * t, (2.0 * t, 0.0, 0.0)))]
                fixed = ([(ns, "base_link", "lidar", T_base_lidar), (ns, "lidar", "cam", T_lidar_cam)]
                         if extrinsics_on_tf else [])
                w.write("/tf", ros_msgs.make_tf_message(f, moving + fixed), ns)
                continue
            h = ros_msgs.make_header(f, ns, "cam")
            w.write("/camera/image_raw", ros_msgs.make_image(f, h, np.zeros((6, 8, 3), np.uint8)), ns)
            w.write("/camera/camera_info", ros_msgs.make_camera_info(f, h, cam), ns)
            arr = point_cloud2.points_cloud_array(rng.normal(size=(20, 4)).astype(np.float32), {})
            w.write("/lidar/points", ros_msgs.make_cloud(f, ros_msgs.make_header(f, ns, "lidar"), arr), ns)
    return path, T_base_lidar, T_lidar_cam


@pytest.mark.parametrize("extrinsics_on_tf", [True, False], ids=["tf-only", "tf-static"])
def test_bag_poses_interpolate_between_tf_samples(tmp_path, extrinsics_on_tf):
    """Clouds between /tf samples get the tf2-style interpolation of the chain odom -> base_link
    (moving) -> lidar (fixed); clouds outside the samples get no pose (counted). With no
    /tf_static the extrinsics come from /tf's first values, and the odometry edge is not one."""
    bag, T_base_lidar, T_lidar_cam = _tf_only_bag(
        tmp_path / "b", cloud_times_s=[0.05, 0.1, 0.35, 0.5, 0.95],
        tf_times_s=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], extrinsics_on_tf=extrinsics_on_tf)
    reader = BagReader(bag)
    frames = list(reader.frames())
    assert len(frames) == 5
    np.testing.assert_allclose(frames[0].camera.T_cam_lidar, invert(T_lidar_cam), atol=1e-9)
    assert frames[0].pose is None and frames[-1].pose is None  # before the first / after the last
    assert reader.stats.frames_without_pose == 2
    for f, t in zip(frames[1:4], (0.1, 0.35, 0.5)):
        # odom -> base_link's yaw and translation are linear in time, so tf2's lerp + slerp of
        # the neighbouring samples reproduces the motion exactly
        expected = rot_z(0.1 * t, (2.0 * t, 0.0, 0.0)) @ T_base_lidar
        np.testing.assert_allclose(f.pose, expected, atol=1e-9)


def test_sim_bag_and_frames_carry_the_world_pose(tmp_path):
    from pl3d_ros.sim.sequence import Simulator, write_bag

    sim = Simulator("source", 3, seed=1)
    assert write_bag("source", 3, tmp_path / "sim", seed=1) == 3
    frames = list(BagReader(tmp_path / "sim").frames())
    for i, f in enumerate(frames):
        T = sim.T_world_lidar(i)
        np.testing.assert_allclose(f.pose, T, atol=1e-6)
        np.testing.assert_array_equal(sim.frame(i).to_frame().pose, T)
    assert not np.allclose(frames[0].pose, frames[2].pose)  # it drives


# ------------------------------------------------------------------------------- TfHistory


def test_tf_history_interpolation_and_coverage():
    h = TfHistory()
    A, B = rot_z(0.0, (0, 0, 0)), rot_z(np.pi / 2, (2.0, 4.0, 0.0))
    h.add(100, "odom", "base", A)
    h.add(200, "odom", "base", B)
    h.add(200, "odom", "base", rot_z(1.0))  # a repeated stamp: the first sample stays
    h.add_static("base", "lidar", rot_z(0.0, (1.0, 0.0, 0.0)))
    mid = h.lookup("odom", "base", 150)
    np.testing.assert_allclose(mid, rot_z(np.pi / 4, (1.0, 2.0, 0.0)), atol=1e-12)
    np.testing.assert_allclose(h.lookup("odom", "base", 200), B, atol=1e-12)  # exact end sample
    np.testing.assert_allclose(h.lookup("odom", "lidar", 100), rot_z(0.0, (1.0, 0.0, 0.0)), atol=1e-12)
    np.testing.assert_allclose(h.lookup("base", "odom", 150), invert(mid), atol=1e-12)
    assert h.lookup("odom", "base", 99) is None and h.lookup("odom", "base", 201) is None
    assert h.lookup("odom", "camera", 150) is None  # no such edge
    assert h.moving_edges == {("odom", "base"): 3}
    # a single sample covers its own stamp only (tf2 likewise)
    one = TfHistory()
    one.add(5, "odom", "base", B)
    np.testing.assert_allclose(one.lookup("odom", "base", 5), B)
    assert one.lookup("odom", "base", 6) is None


def test_interpolate_takes_the_short_way_round():
    a, b = rot_z(np.radians(170.0)), rot_z(np.radians(-170.0))
    mid = interpolate_transform(0, a, 10, b, 5)
    np.testing.assert_allclose(mid, rot_z(np.pi), atol=1e-9)  # through 180, not through 0
    q = matrix_to_quaternion(interpolate_transform(0, a, 10, a, 3)[:3, :3])
    np.testing.assert_allclose(q, matrix_to_quaternion(a[:3, :3]), atol=1e-12)


# ------------------------------------------------------------------------------- node bookkeeping


def test_odometry_poses_counts_found_missed_and_unusable():
    fac = ros_msgs.rosbags_factory(typestore())
    odo = OdometryPoses.from_config(Config())
    assert odo.enabled and odo.odom_frame == ODOM_FRAME == Config().frames.odom_frame
    T = rot_z(0.5, (3.0, -1.0, 0.2))
    ts = ros_msgs.make_tf_message(fac, [(7, ODOM_FRAME, "velodyne", T)]).transforms[0]
    np.testing.assert_allclose(odo.found(ts), T, atol=1e-12)
    odo.missed("Lookup would require extrapolation into the future")
    zero = types.SimpleNamespace(header=ts.header, child_frame_id="velodyne", transform=types.SimpleNamespace(
        translation=ts.transform.translation, rotation=types.SimpleNamespace(x=0.0, y=0.0, z=0.0, w=0.0)))
    assert odo.found(zero) is None
    v = odo.values()
    assert (v["frames_with_odometry"], v["frames_without_odometry"]) == ("1", "2")
    assert "is invalid" in v["last_odometry_error"]
    assert not OdometryPoses("").enabled and OdometryPoses("").values()["odometry_frame"] == "(off)"


def test_no_tf_topic_means_no_pose_pass(tmp_path, kitti00):
    """A bag recorded before this change (no /tf): frames as before, pose None."""
    from pl3d_ros.io.kitti import sequence_to_bag

    src = tmp_path / "seq"
    shutil.copytree(kitti00, src, ignore=shutil.ignore_patterns("00000[2-9]*", "poses.txt"))
    sequence_to_bag(src, tmp_path / "b")
    reader = BagReader(tmp_path / "b")
    frames = list(reader.frames())
    assert "/tf" not in reader.info()["topics"]
    assert len(frames) == 2 and all(f.pose is None for f in frames)


# ------------------------------------------------------------------------------- node.py on stubs


@pytest.mark.parametrize("odom_frame", [ODOM_FRAME, ""], ids=["odom", "off"])
def test_node_looks_up_the_pose_at_the_cloud_stamp(monkeypatch, request, synthetic_bag, tmp_path,
                                                   odom_frame):
    """node.py on stand-in ROS modules, with static extrinsics (so tf2 is there for odometry
    only): each synced set looks up odom <- cloud frame at the cloud's header stamp (tf2's
    default zero timeout: no waiting), a missing transform gives a frame without a pose and a
    count in the diagnostics, never an exception; odom_frame "" makes no lookups at all."""
    import sys

    from fakes import header, small_model
    from test_node_files import _raw_messages, _stub_ros

    from pl3d_ros.models.checkpoint import save_checkpoint

    msgs = _raw_messages(synthetic_bag)
    (_, _, _, T_lidar_cam), = ros_msgs.tf_message_transforms(msgs["/tf_static"][0])
    model = save_checkpoint(tmp_path / "small.safetensors", small_model(), header())
    registry: dict = {}
    _stub_ros(monkeypatch, {"runtime.model": str(model), "runtime.backend": "torch",
                            "runtime.device": "cpu", "adapt.method": "source",
                            "frames.static_extrinsics": invert(T_lidar_cam).ravel().tolist(),
                            "frames.odom_frame": odom_frame}, {}, registry)
    request.addfinalizer(lambda: sys.modules.pop("pl3d_ros.node", None))
    import pl3d_ros.node as node_mod

    node = node_mod.Pl3dNode()
    submitted: list = []
    node.runner.submit = submitted.append  # the frames as they leave the callback
    fac = ros_msgs.rosbags_factory(typestore())
    T = rot_z(0.4, (5.0, 1.0, 0.0))

    def lookup(target, source):
        if len(registry["tf_when"]) > 2:
            raise sys.modules["tf2_ros"].TransformException("Lookup would require extrapolation "
                                                            "into the future")
        return ros_msgs.make_tf_message(fac, [(0, target, source, T)]).transforms[0]

    registry["tf"] = lookup
    clouds = msgs["/lidar/points"]
    for cloud in clouds:
        registry["on_synced"](msgs["/camera/image_raw"][0], msgs["/camera/camera_info"][0], cloud)
    assert len(submitted) == 3 and node.guard.total == 0

    class Stat:
        def summary(self, level, message):
            pass

        def add(self, key, value):
            setattr(self, key, value)

    stat = registry["diag"]["processing_time"](Stat())
    if not odom_frame:
        assert "tf_when" not in registry and not hasattr(node, "tf_buffer")
        assert all(f.pose is None for f in submitted) and stat.odometry_frame == "(off)"
        return
    assert [(t, s, ros_msgs.stamp_to_ns(w)) for t, s, w in registry["tf_when"]] == [
        (ODOM_FRAME, "velodyne", ros_msgs.stamp_to_ns(c.header)) for c in clouds]
    np.testing.assert_allclose(submitted[0].pose, T, atol=1e-12)
    np.testing.assert_allclose(submitted[1].pose, T, atol=1e-12)
    assert submitted[2].pose is None
    assert (stat.frames_with_odometry, stat.frames_without_odometry) == ("2", "1")
    assert "extrapolation" in stat.last_odometry_error
