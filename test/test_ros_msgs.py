"""Tests of pl3d_ros.io.point_cloud2 and pl3d_ros.io.ros_msgs: message <-> numpy conversion.

Messages are built with the module's builders (or by hand for layouts it never writes), serialised
to CDR and deserialised with rosbags, under both the Humble and the Jazzy typestore, and converted
back; results must match exactly. Plain SimpleNamespace objects with ``bytes`` / ``array.array``
payloads stand in for rclpy messages.
"""

from __future__ import annotations

import array
import logging
import types

import numpy as np
import pytest

from pl3d_ros.frame import CameraModel, FrameError
from pl3d_ros.io import msg_common
from pl3d_ros.io import point_cloud2 as pc2
from fakes import cdr
from pl3d_ros.io import ros_msgs as rm


def assert_struct_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype.names == b.dtype.names
    assert a.shape == b.shape
    for name in a.dtype.names:
        x, y = a[name], b[name]
        assert x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def wire(layout: list[tuple[str, int, str, int]], point_step: int, order: str = "<") -> np.dtype:
    """Structured dtype of a hand-made layout: (name, offset, numpy code, count)."""
    return np.dtype({
        "names": [n for n, *_ in layout],
        "formats": [order + c if k == 1 else (order + c, (k,)) for _, _, c, k in layout],
        "offsets": [o for _, o, _, _ in layout],
        "itemsize": point_step,
    })


CODE_TO_DATATYPE = {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 8}


def fill(dtype: np.dtype, n: int, seed: int = 0) -> np.ndarray:
    """Random values for every field of ``dtype``; padding bytes are 0xEE (must never be read)."""
    rng = np.random.default_rng(seed)
    raw = np.full(n * dtype.itemsize, 0xEE, dtype=np.uint8)
    arr = raw.view(dtype)
    for name in dtype.names:
        base = dtype.fields[name][0].base
        shape = (n,) + dtype.fields[name][0].shape
        if base.kind == "f":
            arr[name] = rng.normal(0, 50, shape)
        else:
            info = np.iinfo(base)
            arr[name] = rng.integers(info.min, info.max, shape, endpoint=True)
    return arr


def hand_cloud(ts, layout, point_step, n_h, n_w, *, row_pad=0, big=False, seed=0):
    """A PointCloud2 built byte by byte (not via make_cloud), through CDR.

    Returns (message, expected values as a native structured array (N,)).
    """
    fac = rm.rosbags_factory(ts)
    dt = wire(layout, point_step, ">" if big else "<")
    arr = fill(dt, n_h * n_w, seed)
    row_step = n_w * point_step + row_pad
    buf = np.full((n_h, row_step), 0xAB, dtype=np.uint8)
    buf[:, : n_w * point_step] = arr.view(np.uint8).reshape(n_h, n_w * point_step)
    fields = [fac.PointField(name=n, offset=o, datatype=CODE_TO_DATATYPE[c], count=k)
              for n, o, c, k in layout]
    msg = fac.PointCloud2(
        header=rm.make_header(fac, 123, "lidar"), height=n_h, width=n_w, fields=fields,
        is_bigendian=big, point_step=point_step, row_step=row_step, data=buf.reshape(-1),
        is_dense=False,
    )
    native = np.dtype([(n, np.dtype(c), (k,) if k > 1 else ()) for n, _, c, k in layout])
    expected = np.empty(n_h * n_w, native)
    for n, *_ in layout:
        expected[n] = arr[n]
    return cdr(ts, msg), expected


XYZI = [("x", 0, "f4", 1), ("y", 4, "f4", 1), ("z", 8, "f4", 1), ("intensity", 12, "f4", 1)]


def check_points(msg, expected, intensity="intensity"):
    pts, extra = pc2.cloud_to_points(msg)
    assert pts.dtype == np.float32 and pts.shape == (expected.shape[0], 4)
    for j, c in enumerate(("x", "y", "z")):
        assert np.array_equal(pts[:, j], expected[c].astype(np.float32), equal_nan=True)
    if intensity is None:
        assert not pts[:, 3].any()
    else:
        assert np.array_equal(pts[:, 3], expected[intensity].astype(np.float32), equal_nan=True)
    rest = [n for n in expected.dtype.names if n not in ("x", "y", "z", intensity)]
    assert sorted(extra) == sorted(rest)
    for n in rest:
        assert extra[n].dtype == expected[n].dtype
        assert np.array_equal(extra[n], expected[n])
    return pts, extra


# ------------------------------------------------------------------------------------------------
# PointCloud2 in
# ------------------------------------------------------------------------------------------------

def test_custom_offsets_with_padding(ts):
    layout = [("x", 0, "f4", 1), ("y", 4, "f4", 1), ("z", 8, "f4", 1),
              ("intensity", 16, "f4", 1), ("ring", 20, "u2", 1), ("label", 24, "u4", 1)]
    msg, expected = hand_cloud(ts, layout, 28, 1, 50)
    assert_struct_equal(pc2.cloud_to_array(msg), expected)
    check_points(msg, expected)


def test_point_step_larger_than_fields(ts):
    msg, expected = hand_cloud(ts, XYZI, 40, 1, 33)
    arr = pc2.cloud_to_array(msg)
    assert arr.dtype.itemsize == 16  # packed: the 24 trailing bytes are dropped
    assert_struct_equal(arr, expected)
    check_points(msg, expected)


def test_big_endian(ts):
    layout = [("x", 0, "f4", 1), ("y", 4, "f4", 1), ("z", 8, "f4", 1), ("t", 16, "f8", 1),
              ("intensity", 24, "u2", 1), ("ring", 26, "i2", 1), ("label", 28, "u4", 1),
              ("tag", 32, "i1", 1)]
    msg, expected = hand_cloud(ts, layout, 36, 1, 64, big=True)
    assert msg.is_bigendian
    arr = pc2.cloud_to_array(msg)
    assert all(arr.dtype.fields[n][0].isnative for n in arr.dtype.names)
    assert_struct_equal(arr, expected)
    check_points(msg, expected)


def test_organized_with_row_padding(ts):
    msg, expected = hand_cloud(ts, XYZI + [("ring", 16, "u2", 1)], 20, 16, 100, row_pad=12)
    assert msg.row_step == 100 * 20 + 12
    arr = pc2.cloud_to_array(msg)
    assert arr.shape == (1600,)
    assert_struct_equal(arr, expected)  # row-major flattening
    pts, extra = check_points(msg, expected)
    assert np.array_equal(pts[100:200, 0], expected["x"][100:200])


def test_float64_xyz(ts):
    layout = [("x", 0, "f8", 1), ("y", 8, "f8", 1), ("z", 16, "f8", 1), ("intensity", 24, "f8", 1)]
    msg, expected = hand_cloud(ts, layout, 32, 1, 40)
    assert_struct_equal(pc2.cloud_to_array(msg), expected)
    pts, _ = check_points(msg, expected)
    assert pts.dtype == np.float32


def test_missing_intensity_gives_zeros_and_logs(ts, caplog):
    msg, expected = hand_cloud(ts, XYZI[:3] + [("ring", 12, "u2", 1)], 16, 1, 10)
    with caplog.at_level(logging.DEBUG, logger="pl3d_ros.io.point_cloud2"):
        check_points(msg, expected, intensity=None)
    assert "no intensity field" in caplog.text


def test_reflectivity_and_i_named_intensity(ts):
    msg, expected = hand_cloud(ts, XYZI[:3] + [("reflectivity", 12, "u2", 1)], 16, 1, 10)
    check_points(msg, expected, intensity="reflectivity")
    msg, expected = hand_cloud(ts, XYZI[:3] + [("i", 12, "f4", 1)], 16, 1, 10)
    check_points(msg, expected, intensity="i")
    # An explicit name wins over the default search; a missing explicit name is an error.
    pts, extra = pc2.cloud_to_points(msg, intensity_field="i")
    assert np.array_equal(pts[:, 3], expected["i"])
    with pytest.raises(pc2.CloudError, match="'signal' not in the cloud"):
        pc2.cloud_to_points(msg, intensity_field="signal")


def test_ouster_layout(ts):
    layout = [("x", 0, "f4", 1), ("y", 4, "f4", 1), ("z", 8, "f4", 1),
              ("intensity", 16, "f4", 1), ("t", 20, "u4", 1), ("reflectivity", 24, "u2", 1),
              ("ring", 26, "u2", 1), ("ambient", 28, "u2", 1), ("range", 32, "u4", 1)]
    msg, expected = hand_cloud(ts, layout, 48, 64, 32, row_pad=0)
    assert_struct_equal(pc2.cloud_to_array(msg), expected)
    _, extra = check_points(msg, expected)  # intensity beats reflectivity
    assert set(extra) == {"t", "reflectivity", "ring", "ambient", "range"}
    assert extra["t"].dtype == np.uint32 and extra["ring"].dtype == np.uint16


def test_count_greater_than_one_is_a_subarray(ts):
    msg, expected = hand_cloud(ts, XYZI + [("normal", 16, "f4", 3)], 28, 1, 12)
    arr = pc2.cloud_to_array(msg)
    assert arr["normal"].shape == (12, 3)
    assert_struct_equal(arr, expected)
    _, extra = check_points(msg, expected)
    assert extra["normal"].shape == (12, 3)
    msg, _ = hand_cloud(ts, [("x", 0, "f4", 2), ("y", 8, "f4", 1), ("z", 12, "f4", 1)], 16, 1, 3)
    with pytest.raises(pc2.CloudError, match="'x' has count 2"):
        pc2.cloud_to_points(msg)


def test_nan_points_are_kept(ts, fac):
    a = np.zeros(4, pc2.SEGMENTATION_DTYPE)
    a["x"] = [1.0, np.nan, 3.0, np.inf]
    msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 0, "l"), a))
    assert not msg.is_dense
    pts, _ = pc2.cloud_to_points(msg)
    assert pts.shape == (4, 4)
    assert np.isnan(pts[1, 0]) and np.isinf(pts[3, 0])


def test_zero_point_cloud(ts, fac):
    msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 0, "l"),
                                np.zeros(0, pc2.SEGMENTATION_DTYPE)))
    arr = pc2.cloud_to_array(msg)
    assert arr.shape == (0,) and "label" in arr.dtype.names
    pts, extra = pc2.cloud_to_points(msg)
    assert pts.shape == (0, 4) and extra["label"].shape == (0,)
    empty = types.SimpleNamespace(height=0, width=0, fields=[], is_bigendian=False,
                                  point_step=0, row_step=0, data=b"")
    assert pc2.cloud_to_array(empty).shape == (0,)


def ns_cloud(**kw):
    base = dict(height=1, width=2, is_bigendian=False, point_step=12, row_step=24,
                data=bytes(24),
                fields=[types.SimpleNamespace(name=c, offset=4 * j, datatype=7, count=1)
                        for j, c in enumerate("xyz")])
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_cloud_errors(ts):
    msg, _ = hand_cloud(ts, XYZI, 16, 4, 10, row_pad=4)
    truncated = types.SimpleNamespace(**{k: getattr(msg, k) for k in (
        "height", "width", "fields", "is_bigendian", "point_step", "row_step")},
        data=msg.data[:-1])
    with pytest.raises(pc2.CloudError, match="truncated"):
        pc2.cloud_to_array(truncated)
    with pytest.raises(pc2.CloudError, match="truncated"):
        pc2.cloud_to_points(truncated)
    f = types.SimpleNamespace
    with pytest.raises(pc2.CloudError, match="'z'.*beyond point_step 12"):
        pc2.cloud_to_array(ns_cloud(fields=[f(name="x", offset=0, datatype=7, count=1),
                                           f(name="z", offset=10, datatype=7, count=1)]))
    with pytest.raises(pc2.CloudError, match="unknown PointField datatype 9"):
        pc2.cloud_to_array(ns_cloud(fields=[f(name="x", offset=0, datatype=9, count=1)]))
    with pytest.raises(pc2.CloudError, match="point_step is 0"):
        pc2.cloud_to_array(ns_cloud(point_step=0))
    with pytest.raises(pc2.CloudError, match="row_step 20 is smaller"):
        pc2.cloud_to_array(ns_cloud(row_step=20))
    with pytest.raises(pc2.CloudError, match="appears twice"):
        pc2.cloud_to_array(ns_cloud(fields=[f(name="x", offset=0, datatype=7, count=1),
                                           f(name="x", offset=4, datatype=7, count=1)]))
    no_z = ns_cloud(fields=[f(name="x", offset=0, datatype=7, count=1),
                            f(name="y", offset=4, datatype=7, count=1),
                            f(name="rgb", offset=8, datatype=7, count=1)])
    with pytest.raises(pc2.CloudError, match=r"no z field.*\['x', 'y', 'rgb'\]"):
        pc2.cloud_to_points(no_z)


def test_duck_typed_plain_objects():
    """SimpleNamespace stand-ins for rclpy messages: bytes, array.array('B'), tuples as fields."""
    dt = wire(XYZI + [("ring", 16, "u2", 1)], 20)
    arr = fill(dt, 25, seed=3)
    expected = np.empty(25, [("x", "f4"), ("y", "f4"), ("z", "f4"), ("intensity", "f4"),
                             ("ring", "u2")])
    for n in expected.dtype.names:
        expected[n] = arr[n]
    fields = [types.SimpleNamespace(name=n, offset=o, datatype=CODE_TO_DATATYPE[c], count=k)
              for n, o, c, k in XYZI + [("ring", 16, "u2", 1)]]
    payloads = [arr.tobytes(), array.array("B", arr.tobytes()), bytearray(arr.tobytes()),
                memoryview(arr.tobytes()), list(arr.tobytes())]
    for data in payloads:
        msg = types.SimpleNamespace(height=1, width=25, fields=fields, is_bigendian=False,
                                    point_step=20, row_step=500, data=data)
        assert_struct_equal(pc2.cloud_to_array(msg), expected)
        check_points(msg, expected)
    # pointfields_of tuples work as fields too.
    msg = types.SimpleNamespace(height=1, width=25, fields=pc2.pointfields_of(dt),
                                is_bigendian=False, point_step=20, row_step=500,
                                data=array.array("B", arr.tobytes()))
    assert_struct_equal(pc2.cloud_to_array(msg), expected)


def test_large_cloud_120k(ts, fac):
    """Correctness at a real sensor's size (speed is measured by a benchmark, not here)."""
    n = 120_000
    rng = np.random.default_rng(7)
    pts = rng.normal(0, 20, (n, 4)).astype(np.float32)
    labels = rng.integers(0, 20, n).astype(np.uint8)
    conf = rng.random(n).astype(np.float32)
    arr = pc2.segmentation_cloud_array(pts, labels, conf)
    msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 1, "lidar"), arr))
    got, extra = pc2.cloud_to_points(msg)
    assert np.array_equal(got, pts)
    assert np.array_equal(extra["label"], labels)
    assert np.array_equal(extra["confidence"], conf)


# ------------------------------------------------------------------------------------------------
# PointCloud2 out
# ------------------------------------------------------------------------------------------------

def test_label_uint32_round_trip(ts, fac):
    dt = np.dtype([("x", "f4"), ("y", "f4"), ("z", "f4"), ("intensity", "f4"), ("label", "u4")])
    arr = fill(dt, 300, seed=1)
    arr["label"][:3] = [0, 2**32 - 1, (7 << 16) | 10]
    msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 10, "lidar"), arr))
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == \
        pc2.pointfields_of(dt)
    back = pc2.cloud_to_array(msg)
    assert_struct_equal(back, arr)
    assert back["label"].dtype == np.uint32


def test_big_endian_output_round_trip(ts, fac):
    arr = fill(np.dtype([("x", "f4"), ("y", "f4"), ("z", "f4"), ("t", "f8"), ("ring", "u2")]), 50)
    f = pc2.cloud_fields(arr, is_bigendian=True)
    assert f["is_bigendian"]
    # The data really is big-endian.
    assert np.array_equal(f["data"][:4].tobytes(), arr["x"][:1].astype(">f4").tobytes())
    msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 0, "l"), arr, is_bigendian=True))
    assert_struct_equal(pc2.cloud_to_array(msg), arr)


def test_segmentation_cloud_round_trip(ts, fac):
    n = 500
    rng = np.random.default_rng(2)
    pts = rng.normal(0, 10, (n, 4)).astype(np.float32)
    labels = rng.integers(0, 256, n).astype(np.uint8)
    conf = rng.random(n).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    rgb[:4] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 1]]

    seg = pc2.segmentation_cloud_array(pts, labels, conf)
    assert seg.dtype.itemsize == 24
    assert pc2.pointfields_of(seg.dtype) == [
        ("x", 0, pc2.FLOAT32, 1), ("y", 4, pc2.FLOAT32, 1), ("z", 8, pc2.FLOAT32, 1),
        ("intensity", 12, pc2.FLOAT32, 1), ("label", 16, pc2.UINT8, 1),
        ("confidence", 20, pc2.FLOAT32, 1)]
    assert not seg.view(np.uint8).reshape(n, 24)[:, 17:20].any()  # zero padding
    vis = pc2.segmentation_cloud_array(pts, labels, conf, rgb)
    assert vis.dtype.itemsize == 28
    assert pc2.pointfields_of(vis.dtype)[-1] == ("rgb", 24, pc2.FLOAT32, 1)

    f = pc2.cloud_fields(vis)
    assert f["height"] == 1 and f["width"] == n and f["point_step"] == 28
    assert f["row_step"] == 28 * n and f["is_dense"] and f["data"].dtype == np.uint8
    assert np.shares_memory(f["data"], vis)  # no copy for a contiguous little-endian array

    for arr in (seg, vis):
        msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 77, "lidar"), arr))
        assert msg.header.frame_id == "lidar" and rm.stamp_to_ns(msg.header) == 77
        got, extra = pc2.cloud_to_points(msg)
        assert np.array_equal(got, pts)
        assert np.array_equal(extra["label"], labels) and extra["label"].dtype == np.uint8
        assert np.array_equal(extra["confidence"], conf)
    assert np.array_equal(pc2.unpack_rgb(extra["rgb"]), rgb)


def test_pack_unpack_rgb():
    rgb = np.array([[0, 0, 0], [255, 255, 255], [1, 2, 3], [255, 0, 128]], np.uint8)
    packed = pc2.pack_rgb(rgb)
    assert packed.dtype == np.float32 and packed.shape == (4,)
    assert packed.view(np.uint32).tolist() == [0, 0xFFFFFF, 0x010203, 0xFF0080]
    assert not np.isnan(packed).any()
    assert np.array_equal(pc2.unpack_rgb(packed), rgb)
    assert np.array_equal(pc2.unpack_rgb(packed.view(np.uint32)), rgb)
    with pytest.raises(ValueError):
        pc2.pack_rgb(rgb.astype(np.int32))


def test_pointfields_of_rejects_unexpressible_types():
    with pytest.raises(pc2.CloudError, match="cannot express"):
        pc2.pointfields_of(np.dtype([("x", "f4"), ("id", "i8")]))
    with pytest.raises(pc2.CloudError, match="structured"):
        pc2.pointfields_of(np.dtype("f4"))


def test_organized_output_cloud(ts, fac):
    arr = fill(np.dtype([("x", "f4"), ("y", "f4"), ("z", "f4")]), 64).reshape(4, 16)
    msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 0, "l"), arr))
    assert (msg.height, msg.width) == (4, 16)
    assert_struct_equal(pc2.cloud_to_array(msg), arr.reshape(-1))


# ------------------------------------------------------------------------------------------------
# Image
# ------------------------------------------------------------------------------------------------

def _rgb(h=6, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_image_round_trip(ts, fac, encoding):
    img = _rgb()
    if encoding.startswith("mono"):
        img = np.repeat(img[:, :, :1], 3, axis=2)  # grey images survive mono exactly
    msg = cdr(ts, rm.make_image(fac, rm.make_header(fac, 5, "cam"), img, encoding))
    assert msg.encoding == encoding and msg.step == 7 * rm.IMAGE_ENCODINGS[encoding]
    out = rm.image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == img.shape and out.flags.writeable
    assert np.array_equal(out, img)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_image_row_padding(ts, fac, encoding):
    img = _rgb(5, 9, seed=1)
    if encoding.startswith("mono"):
        img = np.repeat(img[:, :, :1], 3, axis=2)
    f = rm.rgb_to_image_fields(img, encoding)
    row = f["step"]
    step = row + 6
    buf = np.full((5, step), 0x5A, np.uint8)
    buf[:, :row] = f["data"].reshape(5, row)
    msg = fac.Image(header=rm.make_header(fac, 0, "cam"), height=5, width=9, encoding=encoding,
                    is_bigendian=0, step=step, data=buf.reshape(-1))
    assert np.array_equal(rm.image_to_rgb(cdr(ts, msg)), img)


def test_mono16_big_endian(ts, fac):
    rng = np.random.default_rng(4)
    grey16 = rng.integers(0, 65536, (4, 6)).astype(np.uint16)
    for big in (True, False):
        step = 6 * 2 + 4
        buf = np.zeros((4, step), np.uint8)
        buf[:, :12] = grey16.astype(">u2" if big else "<u2").view(np.uint8).reshape(4, 12)
        msg = fac.Image(header=rm.make_header(fac, 0, "cam"), height=4, width=6,
                        encoding="mono16", is_bigendian=int(big), step=step,
                        data=buf.reshape(-1))
        out = rm.image_to_rgb(cdr(ts, msg))
        expected = (grey16 >> 8).astype(np.uint8)
        for c in range(3):
            assert np.array_equal(out[:, :, c], expected)
    img = np.repeat(_rgb(3, 4)[:, :, :1], 3, axis=2)
    f = rm.rgb_to_image_fields(img, "mono16", is_bigendian=True)
    assert f["is_bigendian"] == 1
    assert np.array_equal(rm.image_to_rgb(types.SimpleNamespace(**f)), img)


def test_image_errors(ts, fac):
    msg = rm.make_image(fac, rm.make_header(fac, 0, "cam"), _rgb(), "rgb8")
    bad = types.SimpleNamespace(height=6, width=7, encoding="yuv422", is_bigendian=0, step=14,
                                data=bytes(84))
    with pytest.raises(rm.ImageError, match="unsupported image encoding 'yuv422'.*rgb8.*mono16"):
        rm.image_to_rgb(bad)
    with pytest.raises(rm.ImageError, match="unsupported"):
        rm.rgb_to_image_fields(_rgb(), "32FC1")
    short = types.SimpleNamespace(height=6, width=7, encoding="rgb8", is_bigendian=0, step=21,
                                  data=bytes(msg.data[:-1]))
    with pytest.raises(rm.ImageError, match="truncated"):
        rm.image_to_rgb(short)
    zero = types.SimpleNamespace(height=0, width=7, encoding="rgb8", is_bigendian=0, step=21,
                                 data=b"")
    with pytest.raises(rm.ImageError, match="zero size"):
        rm.image_to_rgb(zero)
    narrow = types.SimpleNamespace(height=6, width=7, encoding="rgb8", is_bigendian=0, step=20,
                                   data=bytes(200))
    with pytest.raises(rm.ImageError, match="step 20"):
        rm.image_to_rgb(narrow)


def test_image_duck_typed_array_payload():
    img = _rgb(3, 5)
    f = rm.rgb_to_image_fields(img, "bgr8")
    msg = types.SimpleNamespace(**{**f, "data": array.array("B", f["data"].tobytes())})
    assert np.array_equal(rm.image_to_rgb(msg), img)


# ------------------------------------------------------------------------------------------------
# CameraInfo
# ------------------------------------------------------------------------------------------------

def _T(yaw=0.3, t=(0.1, -0.2, 0.5)):
    c, s = np.cos(yaw), np.sin(yaw)
    # LiDAR (x fwd, y left, z up) -> optical (x right, y down, z fwd), then a yaw.
    base = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float)
    R = base @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


K = np.array([[720.5, 0.2, 640.25], [0.0, 721.0, 360.75], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("model,D", [
    ("plumb_bob", [-0.3, 0.1, 0.001, -0.002, 0.01]),
    ("rational_polynomial", [0.5, -0.1, 0.001, 0.002, 0.01, 0.8, -0.05, 0.02]),
    ("none", []),
])
def test_camera_info_round_trip(ts, fac, model, D):
    cam = CameraModel(K, 1280, 720, _T(), model, np.array(D), "cam_optical")
    msg = cdr(ts, rm.make_camera_info(fac, rm.make_header(fac, 9, "cam_optical"), cam))
    assert msg.distortion_model == ("plumb_bob" if model == "none" else model)
    assert np.array_equal(np.asarray(msg.p).reshape(3, 4)[:, :3], K)
    back = rm.camera_model_from_info(msg, cam.T_cam_lidar)
    assert back.frame_id == "cam_optical"
    assert (back.width, back.height, back.distortion_model) == (1280, 720, model)
    assert np.array_equal(back.K, cam.K) and np.array_equal(back.D, cam.D)
    assert np.array_equal(back.T_cam_lidar, cam.T_cam_lidar)
    assert rm.camera_model_from_info(msg, np.eye(4), frame_id="x").frame_id == "x"


def test_camera_info_fields_contents():
    cam = CameraModel(K, 1280, 720, np.eye(4), "plumb_bob", np.arange(1, 6) / 10)
    f = rm.camera_info_fields(cam)
    assert f["binning_x"] == 0 and f["binning_y"] == 0
    assert np.array_equal(f["r"], np.eye(3).reshape(-1))
    assert np.array_equal(f["p"].reshape(3, 4), np.hstack([K, np.zeros((3, 1))]))
    for k in ("d", "k", "r", "p"):
        assert f[k].dtype == np.float64 and f[k].ndim == 1


def _info(fac, p, r=np.eye(3), d=(0.1, 0, 0, 0, 0), binning=(0, 0), roi=(0, 0, 0, 0)):
    return fac.CameraInfo(
        header=rm.make_header(fac, 0, "cam"), height=375, width=1242,
        distortion_model="plumb_bob", d=np.array(d, float), k=K.reshape(-1).copy(),
        r=np.asarray(r, float).reshape(-1), p=np.asarray(p, float).reshape(-1),
        binning_x=binning[0], binning_y=binning[1],
        roi=fac.RegionOfInterest(x_offset=roi[0], y_offset=roi[1], width=roi[2], height=roi[3],
                                 do_rectify=False))


def _project(Kc, T, X):
    cam = (T @ np.c_[X, np.ones(len(X))].T)[:3]
    return (Kc @ cam).T


def test_p_offset_is_folded_into_extrinsics(ts, fac):
    # KITTI-like P2: a different K' and a 4th column fx*tx + cx*tz, fy*ty + cy*tz, tz.
    Kp = np.array([[721.5377, 0.0, 609.5593], [0.0, 721.5377, 172.854], [0.0, 0.0, 1.0]])
    P = np.hstack([Kp, np.array([[44.85728], [0.2163791], [0.002745884]])])
    T = _T()
    X = np.random.default_rng(5).normal(0, 10, (20, 3))
    X[:, 0] = np.abs(X[:, 0]) + 5  # in front of the camera
    yaw = 0.01
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    for rect in (np.eye(3), R):
        msg = cdr(ts, _info(fac, P, r=rect))
        cam = rm.camera_model_from_info(msg, T)
        assert cam.distortion_model == "none"
        assert np.array_equal(cam.K, Kp)
        Rh = np.eye(4)
        Rh[:3, :3] = rect
        expected = (P @ Rh @ T @ np.c_[X, np.ones(20)].T).T  # ROS: P @ [R X; 1]
        np.testing.assert_allclose(_project(cam.K, cam.T_cam_lidar, X), expected,
                                   rtol=1e-12, atol=1e-9)
    # Stereo right camera: P = [K' | -fx * baseline], R = I.
    Pr = np.hstack([Kp, np.array([[-721.5377 * 0.54], [0.0], [0.0]])])
    cam = rm.camera_model_from_info(cdr(ts, _info(fac, Pr)), T)
    np.testing.assert_allclose(cam.T_cam_lidar[:3, 3] - T[:3, 3], [-0.54, 0, 0], atol=1e-12)
    # Forcing the raw model ignores P.
    raw = rm.camera_model_from_info(cdr(ts, _info(fac, Pr)), T, rectified=False)
    assert np.array_equal(raw.K, K) and raw.distortion_model == "plumb_bob"
    # A zero 4th column keeps the raw (K, D) model; rectified=True uses P[:, :3] without offset.
    P0 = np.hstack([Kp, np.zeros((3, 1))])
    assert np.array_equal(rm.camera_model_from_info(cdr(ts, _info(fac, P0)), T).K, K)
    forced = rm.camera_model_from_info(cdr(ts, _info(fac, P0)), T, rectified=True)
    assert np.array_equal(forced.K, Kp) and np.array_equal(forced.T_cam_lidar, T)


def test_camera_not_calibrated(ts, fac):
    info = fac.CameraInfo(
        header=rm.make_header(fac, 0, "cam"), height=0, width=0, distortion_model="",
        d=np.zeros(0), k=np.zeros(9), r=np.zeros(9), p=np.zeros(12), binning_x=0, binning_y=0,
        roi=fac.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
    with pytest.raises(FrameError, match="camera not calibrated"):
        rm.camera_model_from_info(cdr(ts, info), np.eye(4))


def test_camera_info_binning_and_roi(ts, fac):
    P = np.hstack([K, np.zeros((3, 1))])
    cam = rm.camera_model_from_info(cdr(ts, _info(fac, P, binning=(2, 2))), np.eye(4))
    assert (cam.width, cam.height) == (621, 187)
    np.testing.assert_allclose(cam.K[0], [K[0, 0] / 2, K[0, 1] / 2, (K[0, 2] + 0.5) / 2 - 0.5])
    np.testing.assert_allclose(cam.K[1], [0, K[1, 1] / 2, (K[1, 2] + 0.5) / 2 - 0.5])
    full = rm.camera_model_from_info(cdr(ts, _info(fac, P)), np.eye(4))
    assert np.array_equal(full.K, K) and (full.width, full.height) == (1242, 375)
    crop = rm.camera_model_from_info(cdr(ts, _info(fac, P, roi=(100, 50, 640, 200))), np.eye(4))
    assert (crop.width, crop.height) == (640, 200)
    np.testing.assert_allclose(crop.K[:2, 2], K[:2, 2] - [100, 50])


def test_camera_info_duck_typed_lists():
    cam = CameraModel(K, 640, 480, np.eye(4), "plumb_bob", np.array([0.1, 0.0, 0.0, 0.0, 0.01]))
    f = rm.camera_info_fields(cam)
    info = types.SimpleNamespace(
        **{k: (array.array("d", v) if isinstance(v, np.ndarray) else v) for k, v in f.items()})
    info.k = list(f["k"])  # rclpy-like mixtures of list / array.array
    back = rm.camera_model_from_info(info, np.eye(4))
    assert back.frame_id == "" and np.array_equal(back.K, K) and np.array_equal(back.D, cam.D)


# ------------------------------------------------------------------------------------------------
# Stamps
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ns", [0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789])
def test_stamp_round_trip(ts, fac, ns):
    header = cdr(ts, rm.make_header(fac, ns, "base"))
    assert rm.stamp_to_ns(header) == ns and rm.stamp_to_ns(header.stamp) == ns
    assert 0 <= header.stamp.nanosec < 1_000_000_000
    assert rm.stamp_to_ns(types.SimpleNamespace(nanoseconds=ns)) == ns
    with pytest.raises(ValueError, match="int32"):
        rm.ns_to_stamp(fac, 2**31 * 1_000_000_000)


def test_rosbags_factory_is_a_message_factory(fac):
    assert isinstance(fac, rm.MessageFactory)


# ------------------------------------------------------------------------------------------------
# Input-style clouds, TF, error hierarchy
# ------------------------------------------------------------------------------------------------

def test_points_cloud_array_round_trip(ts, fac):
    n = 40
    rng = np.random.default_rng(9)
    pts = rng.normal(0, 5, (n, 4)).astype(np.float32)
    extra = {"ring": rng.integers(0, 64, n).astype(np.uint16),
             "t": rng.random(n),  # float64: aligned to 8
             "label": rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
             "rgb3": rng.integers(0, 256, (n, 3)).astype(np.uint8)}
    arr = pc2.points_cloud_array(pts, extra)
    offsets = {name: off for name, off, _, _ in pc2.pointfields_of(arr.dtype)}
    assert offsets == {"x": 0, "y": 4, "z": 8, "intensity": 12, "ring": 16, "t": 24,
                       "label": 32, "rgb3": 36}
    assert arr.dtype.itemsize == 40
    msg = cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 3, "lidar"), arr))
    got, back = pc2.cloud_to_points(msg)
    assert np.array_equal(got, pts)
    assert sorted(back) == sorted(extra)
    for k, v in extra.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
    with pytest.raises(pc2.CloudError, match="reserved"):
        pc2.points_cloud_array(pts, {"x": np.zeros(n, np.float32)})
    with pytest.raises(pc2.CloudError, match="cannot express"):
        pc2.points_cloud_array(pts, {"id": np.zeros(n, np.int64)})


def test_tf_message_round_trip(ts, fac):
    T1, T2 = _T(0.7, (1.0, 2.0, -0.5)), np.eye(4)
    msg = cdr(ts, rm.make_tf_message(fac, [(5 * 10**9 + 7, "base", "lidar", T1),
                                          (0, "lidar", "cam", T2)]))
    got = rm.tf_message_transforms(msg)
    assert [(s, p, c) for s, p, c, _ in got] == [(5 * 10**9 + 7, "base", "lidar"),
                                                (0, "lidar", "cam")]
    np.testing.assert_allclose(got[0][3], T1, atol=1e-12)
    np.testing.assert_allclose(got[1][3], T2, atol=1e-15)
    with pytest.raises(FrameError, match="not rigid"):
        rm.make_tf_message(fac, [(0, "a", "b", np.diag([2.0, 1, 1, 1]))])
    bad = types.SimpleNamespace(transforms=[types.SimpleNamespace(
        header=types.SimpleNamespace(stamp=types.SimpleNamespace(sec=0, nanosec=0), frame_id="a"),
        child_frame_id="b",
        transform=types.SimpleNamespace(translation=types.SimpleNamespace(x=0, y=0, z=0),
                                        rotation=types.SimpleNamespace(x=0, y=0, z=0, w=0)))])
    with pytest.raises(msg_common.MessageError, match="invalid"):
        rm.tf_message_transforms(bad)


def test_error_hierarchy():
    assert issubclass(pc2.CloudError, msg_common.MessageError)
    assert issubclass(rm.ImageError, msg_common.MessageError)
    assert issubclass(msg_common.MessageError, ValueError)


def test_p_disagreeing_with_k_warns_once_per_calibration(ts, fac, caplog):
    rm._warned_calibrations.clear()
    Kp = K.copy()
    Kp[0, 0] += 5.0  # P's focal length 5 px off K's
    P_bad = np.hstack([Kp, np.zeros((3, 1))])
    with caplog.at_level(logging.WARNING, logger="pl3d_ros.io.ros_msgs"):
        # distorted camera: P is the rectified matrix and may differ from K: no warning
        rm.camera_model_from_info(cdr(ts, _info(fac, P_bad)), np.eye(4))
        assert not caplog.records
        # no distortion, R = I: P and K describe one image, so they must agree
        for _ in range(3):
            cam = rm.camera_model_from_info(cdr(ts, _info(fac, P_bad, d=(0, 0, 0, 0, 0))), np.eye(4))
        assert np.array_equal(cam.K, K)  # K is used
        assert len(caplog.records) == 1 and "differs from K" in caplog.text
        Kp[1, 1] += 1.0  # another calibration: warned once more
        rm.camera_model_from_info(cdr(ts, _info(fac, np.hstack([Kp, np.zeros((3, 1))]), d=(0,) * 5)),
                                  np.eye(4))
        assert len(caplog.records) == 2
        # agreeing within the tolerance: nothing
        rm.camera_model_from_info(cdr(ts, _info(fac, np.hstack([K + 1e-5, np.zeros((3, 1))]), d=(0,) * 5)),
                                  np.eye(4))
        assert len(caplog.records) == 2


def test_huge_field_count_and_excess_data_are_cloud_errors():
    f = types.SimpleNamespace
    for count, point_step, n in [(2**31, 2**32 - 1, 1), (2**31, 16, 0), (2**32 - 1, 2**32 - 1, 1)]:
        msg = ns_cloud(width=n, point_step=point_step, row_step=point_step * n, data=bytes(16),
                       fields=[f(name="x", offset=0, datatype=2, count=count),
                               f(name="y", offset=4, datatype=7, count=1),
                               f(name="z", offset=8, datatype=7, count=1)])
        with pytest.raises(pc2.CloudError, match="count"):
            pc2.cloud_to_points(msg)
    # PointCloud2.msg: data is row_step * height bytes. A width smaller than the data is refused.
    msg = ns_cloud(width=2, row_step=24, data=bytes(36))
    with pytest.raises(pc2.CloudError, match="36 bytes, more than height \\* row_step = 1 \\* 24"):
        pc2.cloud_to_points(msg)
    with pytest.raises(pc2.CloudError, match="more than"):
        pc2.cloud_to_array(ns_cloud(width=0, row_step=0, data=bytes(12)))
    assert pc2.cloud_to_points(ns_cloud())[0].shape == (2, 4)  # exactly row_step * height: fine
