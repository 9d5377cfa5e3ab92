import numpy as np
import pytest

from pl3d_ros.frame import CameraModel, Frame, FrameError, Prediction


def camera(width=64, height=48, **kw):
    K = np.array([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]])
    return CameraModel(K, width, height, **kw)


def frame(points=None, image=None, **kw):
    pts = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32) if points is None else points
    img = np.zeros((48, 64, 3), np.uint8) if image is None else image
    return Frame(1_000, pts, img, camera(), **kw)


def test_nonfinite_points_dropped_and_counted_with_their_labels():
    pts = np.ones((10, 4), np.float32)
    pts[2, 0] = np.nan
    pts[5, 2] = -np.inf
    labels = np.arange(10, dtype=np.uint32)
    f = frame(pts, labels=labels)
    assert f.num_points == 8
    assert f.dropped_points == 2 and f.dropped_far == 0 and f.zeroed_intensity == 0
    np.testing.assert_array_equal(f.labels, [0, 1, 3, 4, 6, 7, 8, 9])
    assert f.points.dtype == np.float32


def test_nonfinite_intensity_keeps_the_point_with_intensity_zero():
    pts = np.ones((6, 4), np.float32)
    pts[1, 3], pts[4, 3] = np.nan, np.inf
    f = frame(pts, labels=np.arange(6, dtype=np.uint32))
    assert f.num_points == 6 and f.dropped_points == 0 and f.zeroed_intensity == 2
    np.testing.assert_array_equal(f.points[:, 3], [1, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(f.points[:, :3], 1.0)
    assert np.isnan(pts[1, 3])  # the caller's array is not written to
    # a cloud whose every intensity is NaN is a cloud, not an empty one
    pts[:, 3] = np.nan
    assert frame(pts).num_points == 6


def test_points_beyond_the_range_bound_are_dropped_and_counted():
    from pl3d_ros.frame import MAX_POINT_RANGE_M

    pts = np.ones((5, 4), np.float32)
    pts[1, 0] = 3e38  # finite float32, absurd range
    pts[2, :3] = MAX_POINT_RANGE_M / np.sqrt(3) * 1.001  # just beyond, by its norm
    pts[3, :3] = MAX_POINT_RANGE_M / np.sqrt(3) * 0.999  # just within
    pts[4, 1] = np.nan
    f = frame(pts, labels=np.arange(5, dtype=np.uint32))
    np.testing.assert_array_equal(f.labels, [0, 3])
    assert (f.dropped_points, f.dropped_far) == (3, 2)
    with pytest.raises(FrameError, match="2 beyond 1000 m"):
        frame(np.full((2, 4), 5e3, np.float32))


def test_float64_points_become_float32():
    f = frame(np.zeros((5, 4), np.float64))
    assert f.points.dtype == np.float32


@pytest.mark.parametrize("pts, msg", [
    (np.zeros((5, 3), np.float32), r"\(N, 4\)"),
    (np.zeros((5, 4), np.int32), "floating"),
    (np.full((5, 4), np.nan, np.float32), "empty cloud"),
    (np.zeros((0, 4), np.float32), "empty cloud"),
])
def test_bad_points_rejected(pts, msg):
    with pytest.raises(FrameError, match=msg):
        frame(pts)


def test_image_size_must_match_camera():
    with pytest.raises(FrameError, match="64x48"):
        frame(image=np.zeros((47, 64, 3), np.uint8))
    with pytest.raises(FrameError, match="uint8"):
        frame(image=np.zeros((48, 64, 3), np.float32))
    with pytest.raises(FrameError, match="RGB"):
        frame(image=np.zeros((48, 64), np.uint8))


def test_label_shape_checked():
    with pytest.raises(FrameError, match="labels"):
        frame(labels=np.zeros(99, np.uint32))


def test_non_rigid_extrinsics_rejected():
    T = np.eye(4)
    T[0, 0] = 1.1  # scaled
    with pytest.raises(FrameError, match="not rigid"):
        camera(T_cam_lidar=T)
    T = np.diag([1.0, 1.0, -1.0, 1.0])  # mirrored
    with pytest.raises(FrameError, match="not rigid"):
        camera(T_cam_lidar=T)
    T = np.eye(4)
    T[3, 0] = 0.5
    with pytest.raises(FrameError, match="last row"):
        camera(T_cam_lidar=T)


def test_camera_validation():
    with pytest.raises(FrameError, match="not calibrated"):
        camera(width=0, height=0)
    with pytest.raises(FrameError, match="focal"):
        CameraModel(np.zeros((3, 3)) + np.diag([0, 0, 1]), 10, 10)
    with pytest.raises(FrameError, match="plumb_bob needs 5"):
        camera(distortion_model="plumb_bob", D=[0.1, 0.2])
    with pytest.raises(FrameError, match="unsupported"):
        camera(distortion_model="fisheye", D=[0.1, 0.2, 0.0, 0.0])
    # all-zero coefficients mean no distortion; zero padding past the model's count is tolerated
    assert camera(distortion_model="plumb_bob", D=np.zeros(5)).distortion_model == "none"
    cam = camera(distortion_model="plumb_bob", D=[0.1, 0.01, 0, 0, 0, 0, 0, 0])
    assert cam.D.shape == (5,)
    # K given as 9 floats, as in CameraInfo
    assert CameraModel(np.eye(3).ravel() * 1, 4, 4).K.shape == (3, 3)


def test_resized_and_cropped_camera():
    cam = camera()
    half = cam.resized(32, 24)
    assert half.K[0, 0] == 25.0 and half.K[1, 1] == 25.0
    # the image centre stays the image centre
    assert half.K[0, 2] == pytest.approx((32 - 1) / 2) and half.K[1, 2] == pytest.approx((24 - 1) / 2)
    crop = cam.cropped(10, 4, 40, 40)
    assert crop.K[0, 2] == pytest.approx(21.5) and crop.size == (40, 40)
    with pytest.raises(FrameError, match="exceeds"):
        cam.cropped(30, 0, 40, 48)


def test_prediction_shapes_validated():
    n = 6
    in_view = np.array([1, 0, 1, 1, 0, 0], bool)
    p = Prediction(np.zeros(n), np.ones(n), in_view, np.zeros(3), np.zeros(n))
    assert p.labels.dtype == p.labels_2d.dtype == p.labels_3d.dtype == np.uint8
    with pytest.raises(FrameError, match="labels_2d"):
        Prediction(np.zeros(n), np.ones(n), in_view, np.zeros(4), np.zeros(n))
    with pytest.raises(FrameError, match="labels_3d"):
        Prediction(np.zeros(n), np.ones(n), in_view, np.zeros(3), np.zeros((n, 3)))
    with pytest.raises(FrameError, match="confidence"):
        Prediction(np.zeros(n), np.ones(n - 1), in_view, np.zeros(3), np.zeros(n))
