"""kitti2bag -> bag -> Frames round trips on real data, and bag robustness on constructed bags."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pl3d_ros.cli import main
from pl3d_ros.frame import CameraModel
from pl3d_ros.io.bag import BagError, BagReader, BagWriter
from pl3d_ros.io.kitti import (CAMERA_FRAME, DEFAULT_START_NS, LIDAR_FRAME, KittiError, KittiSequence,
                               read_calib, sequence_to_bag)


def project_p2_tr(calib, xyz):
    """uv = P2 * Tr * [x y z 1], the dataset's own definition."""
    h = np.c_[xyz, np.ones(len(xyz))]
    cam = calib["P2"] @ np.vstack([calib["Tr"], [0, 0, 0, 1]]) @ h.T
    return (cam[:2] / cam[2]).T, cam[2]


def test_cli_kitti2bag_then_bag_info_json(kitti00, tmp_path, capsys):
    out = tmp_path / "s00"
    assert main(["kitti2bag", str(kitti00), "-o", str(out)]) == 0
    assert list(out.glob("*.mcap")), "MCAP by default"
    capsys.readouterr()
    assert main(["bag-info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["synced_frames"] == 10
    assert info["topics"]["/camera/image_raw"] == {"type": "sensor_msgs/msg/Image", "count": 10,
                                                   "rate_hz": pytest.approx(9.6, abs=0.5)}
    assert info["topics"]["/lidar/points"]["count"] == 10
    assert info["topics"]["/camera/camera_info"]["count"] == 10
    assert info["topics"]["/tf_static"]["count"] == 1
    assert info["stats"]["skipped"] == 0 and not info["stats"]["truncated"]
    assert main(["bag-info", str(out)]) == 0
    assert "synced frames: 10, skipped 0" in capsys.readouterr().out
    # an existing output is refused rather than overwritten
    assert main(["kitti2bag", str(kitti00), "-o", str(out)]) == 1


def test_bag_reproduces_the_source_files(kitti00, kitti_bag00):
    seq = KittiSequence(kitti00)
    calib = read_calib(kitti00 / "calib.txt")
    frames = list(BagReader(kitti_bag00).frames())
    assert len(frames) == 10
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.points, np.fromfile(kitti00 / "velodyne" / f"{i:06d}.bin",
                                                            np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(f.labels, np.fromfile(kitti00 / "labels" / f"{i:06d}.label",
                                                            np.uint32))
        np.testing.assert_array_equal(f.image, np.asarray(Image.open(kitti00 / "image_2" / f"{i:06d}.png")))
        assert f.stamp_ns == seq.stamp_ns(i)
        assert f.lidar_frame_id == LIDAR_FRAME and f.camera.frame_id == CAMERA_FRAME
    assert frames[1].stamp_ns - DEFAULT_START_NS == round(1.037359e-01 * 1e9)
    # camera info + TF reproduce P2 * Tr: K exactly, the transform to quaternion precision
    cam = frames[0].camera
    np.testing.assert_array_equal(cam.K, calib["P2"][:, :3])
    assert cam.distortion_model == "none" and cam.size == (1241, 376)
    xyz = frames[0].points[:, :3].astype(np.float64)
    uv_ref, z_ref = project_p2_tr(calib, xyz)
    cam_pts = (cam.T_cam_lidar @ np.c_[xyz, np.ones(len(xyz))].T)[:3]
    uv = (cam.K @ cam_pts)[:2] / cam_pts[2]
    front = z_ref > 1.0
    assert np.abs(uv.T[front] - uv_ref[front]).max() < 1e-3  # pixels
    np.testing.assert_allclose(cam_pts[2], z_ref, atol=1e-5)  # metres


@pytest.mark.parametrize("storage, distro", [("sqlite3", "jazzy"), ("mcap", "jazzy"), ("sqlite3", "humble")])
def test_other_storages_and_distros(kitti00, tmp_path, storage, distro):
    out = tmp_path / "b"
    assert sequence_to_bag(kitti00, out, storage=storage, distro=distro, max_frames=2) == 2
    frames = list(BagReader(out, distro=distro).frames())
    assert len(frames) == 2
    np.testing.assert_array_equal(frames[1].points, KittiSequence(kitti00).read_points(1))


def test_single_mcap_file_opens(kitti_bag00):
    (mcap,) = kitti_bag00.glob("*.mcap")
    assert BagReader(mcap).info()["synced_frames"] == 10


# --- constructed bags ------------------------------------------------------------------------------

W, H = 8, 6
CAM = CameraModel(np.array([[5.0, 0, 3.5], [0, 5.0, 2.5], [0, 0, 1]]), W, H)
SEC = 1_000_000_000


def write_bag(path, events, tf=True, image_size=(W, H)):
    """events: (stamp_s, kind) in log order; kind is cloud, image, info or frame (all three)."""
    from pl3d_ros.io import point_cloud2, ros_msgs

    rng = np.random.default_rng(0)
    with BagWriter(path) as w:
        if tf:
            w.write_static_transform(SEC, "lidar", "cam", np.eye(4))
        f = w.factory
        log_ns = 0
        for t, kind in events:
            ns = int(round((100 + t) * SEC))
            for k in ("image", "info", "cloud") if kind == "frame" else (kind,):
                log_ns += 1000
                if k == "cloud":
                    pts = rng.normal(size=(50, 4)).astype(np.float32)
                    arr = point_cloud2.points_cloud_array(pts, {"label": np.full(50, round(t * 10), np.uint32)})
                    w.write("/lidar/points", ros_msgs.make_cloud(f, ros_msgs.make_header(f, ns, "lidar"), arr), log_ns)
                elif k == "image":
                    img = np.full((image_size[1], image_size[0], 3), 7, np.uint8)
                    w.write("/camera/image_raw", ros_msgs.make_image(f, ros_msgs.make_header(f, ns, "cam"), img), log_ns)
                else:
                    w.write("/camera/camera_info",
                            ros_msgs.make_camera_info(f, ros_msgs.make_header(f, ns, "cam"), CAM), log_ns)
    return path


def test_sync_counts_out_of_order_duplicates_and_missing_images(tmp_path):
    events = [(0.0, "frame"), (0.1, "cloud"), (0.11, "image"), (0.11, "info"), (0.1, "cloud"),
              (0.05, "cloud"), (0.2, "frame"), (0.3, "cloud"), (0.2, "image")]
    reader = BagReader(write_bag(tmp_path / "b", events))
    frames = list(reader.frames())
    # 0.0, 0.1 (image 0.11 within 50 ms) and 0.2 pair; 0.3 has no image; the second 0.1 cloud and
    # image 0.2 are duplicates; 0.05 arrives after 0.1: out of order.
    assert [round(f.stamp_ns / SEC - 100, 3) for f in frames] == [0.0, 0.1, 0.2]
    s = reader.stats
    assert (s.synced, s.no_image, s.duplicate, s.out_of_order) == (3, 1, 2, 1)
    assert [int(f.labels[0]) for f in frames] == [0, 1, 2]  # the label field becomes ground truth
    assert [f.seq for f in frames] == [0, 1, 2]


def test_clouds_logged_before_their_images_still_pair(tmp_path):
    events = [(t / 10, "cloud") for t in range(5)] + [(t / 10, "image") for t in range(5)]
    events += [(0.0, "info")]
    reader = BagReader(write_bag(tmp_path / "b", events))
    assert len(list(reader.frames())) == 5 and reader.stats.skipped == 0


def test_missing_topics_and_transforms_are_clear_errors(tmp_path):
    bag = write_bag(tmp_path / "noinfo", [(0.0, "image"), (0.0, "cloud")])
    with pytest.raises(BagError, match="no sensor_msgs/msg/CameraInfo topic.*topics: /camera/image_raw"):
        list(BagReader(bag).frames())
    bag = write_bag(tmp_path / "notf", [(0.0, "frame"), (0.1, "frame")], tf=False)
    with pytest.raises(BagError, match="--extrinsics"):
        list(BagReader(bag).frames())
    assert len(list(BagReader(bag, T_cam_lidar=np.eye(4)).frames())) == 2
    with pytest.raises(BagError, match="does not exist"):
        BagReader(tmp_path / "nothing")


def test_image_size_mismatch_is_a_counted_skip(tmp_path):
    bag = write_bag(tmp_path / "b", [(0.0, "frame")], image_size=(W + 2, H))
    reader = BagReader(bag)
    assert list(reader.frames()) == []
    assert reader.stats.bad_frame == 1


def test_truncated_mcap_is_a_clear_error(kitti_bag00, tmp_path):
    bag = tmp_path / "trunc"
    shutil.copytree(kitti_bag00, bag)
    (mcap,) = bag.glob("*.mcap")
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagError, match="cannot open.*recording was interrupted"):
        list(BagReader(bag).frames())
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"\x89MCAP0\r\n" + bytes(range(256)) * 10)
    with pytest.raises(BagError, match="cannot open"):
        BagReader(junk).info()


def test_corruption_mid_bag_keeps_the_frames_before_it(kitti00, tmp_path):
    bag = tmp_path / "db"
    sequence_to_bag(kitti00, bag, storage="sqlite3")
    (db,) = bag.glob("*.db3")
    data = bytearray(db.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)  # a zeroed page mid-file
    db.write_bytes(data)
    reader = BagReader(bag)
    frames = list(reader.frames())
    assert 0 < len(frames) < 10
    assert reader.stats.truncated and "malformed" in reader.stats.error
    with pytest.raises(BagError, match="corrupt or truncated"):
        list(BagReader(bag, strict=True).frames())


def test_kitti_folder_errors(tmp_path, kitti00):
    with pytest.raises(KittiError, match="no velodyne"):
        KittiSequence(tmp_path)
    bad = tmp_path / "seq"
    shutil.copytree(kitti00, bad, ignore=shutil.ignore_patterns("00000[1-9]*"))
    (bad / "calib.txt").write_text("P2: 1 2 3\n")
    with pytest.raises(KittiError, match="P2 has 3 values"):
        KittiSequence(bad)
