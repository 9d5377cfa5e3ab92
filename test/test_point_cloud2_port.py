"""The sensor_msgs_py point_cloud2 test cases, ported to pl3d_ros.io.point_cloud2 on rosbags messages.

Source: ros2/common_interfaces, sensor_msgs_py/test/test_point_cloud2.py (rolling). Same clouds,
same assertions, through this package's API instead of sensor_msgs_py's, on messages of the
Humble and the Jazzy typestore that went through CDR as in a bag:

    read_points / read_points_numpy / read_points_list  ->  cloud_to_array / cloud_to_points
    read_points(skip_nans=True)                          ->  Frame (drops non-finite points)
    create_cloud / create_cloud_xyz32                    ->  make_cloud of a structured array

Where this package deliberately differs, the test says so:
- organized clouds are (height, width) as PointCloud2.msg defines them; the upstream test builds
  its organized cloud with height and width swapped, and read_points(reshape_organized_cloud)
  reshapes to (width, height);
- a count > 1 field stays one subarray field (``x`` of shape (3,)), not ``x_0, x_1, x_2``;
- mixed field types are no error (read_points_numpy asserts one dtype for all fields);
- make_cloud keeps the array's point layout (itemsize, padding), so no point_step argument;
- is_dense is computed: False when any float field holds a NaN (upstream create_cloud always
  writes False; the upstream clouds hold NaN, so both agree on them).
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.recfunctions import structured_to_unstructured, unstructured_to_structured

from pl3d_ros.frame import CameraModel, Frame
from pl3d_ros.io import point_cloud2 as pc2
from fakes import cdr
from pl3d_ros.io import ros_msgs as rm

FLOAT32, FLOAT64, UINT8 = 7, 8, 2

pylist = [(0.0, 0.1, 0.2),
          (1.0, 1.1, 1.2),
          (2.0, 2.1, 2.2),
          (3.0, 3.1, 3.2),
          (4.0, np.nan, 4.2),
          (5.0, 5.1, 5.2)]
points = np.array(pylist, dtype=np.float32)
XYZ = [("x", 0, FLOAT32, 1), ("y", 4, FLOAT32, 1), ("z", 8, FLOAT32, 1)]

struct_points = np.array(list(map(tuple, points)),
                         dtype=[("a", np.float32), ("b", np.float64), ("c", np.uint8)])
STRUCT_FIELDS = [("a", 0, FLOAT32, 1), ("b", 4, FLOAT64, 1), ("c", 12, UINT8, 1)]
struct_points_6 = np.array(list(map(tuple, points)),
                           dtype=[("a", np.float32), ("b", np.float32), ("c", np.uint8)])
STRUCT_FIELDS_6 = [("a", 0, FLOAT32, 1), ("b", 4, FLOAT32, 1), ("c", 8, UINT8, 1)]
points3 = points.reshape(2, 3, -1)  # organized: 2 rows (height) of 3 points (width)

dtype_end_padding = np.dtype({"names": ["x", "y", "z"], "formats": ["f4", "f4", "f4"],
                              "offsets": [0, 4, 8], "itemsize": 20})
points_end_padding = np.array(pylist, dtype=dtype_end_padding)


def cloud(ts, fields, data: bytes, height: int, width: int, point_step: int, frame_id="frame"):
    """A PointCloud2 laid out by hand, as the upstream test does, through CDR."""
    fac = rm.rosbags_factory(ts)
    msg = fac.PointCloud2(
        header=rm.make_header(fac, 0, frame_id), height=height, width=width,
        fields=[fac.PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields],
        is_bigendian=False, point_step=point_step, row_step=point_step * width,
        data=np.frombuffer(data, np.uint8), is_dense=False)
    return cdr(ts, msg)


def as_tuple(msg):
    """Everything of a PointCloud2 that equality means (upstream compares messages with ==)."""
    return (msg.header.frame_id, int(msg.height), int(msg.width),
            [(f.name, int(f.offset), int(f.datatype), int(f.count)) for f in msg.fields],
            bool(msg.is_bigendian), int(msg.point_step), int(msg.row_step),
            bytes(np.asarray(msg.data, np.uint8)), bool(msg.is_dense))


@pytest.fixture(scope="module")
def pcd(ts):
    return cloud(ts, XYZ, points.tobytes(), 1, 6, 12)


@pytest.fixture(scope="module")
def pcd2(ts):  # the y, z cloud (upstream builds it from the x, y, z fields by mistake)
    return cloud(ts, [("y", 0, FLOAT32, 1), ("z", 4, FLOAT32, 1)], points[:, 1:].tobytes(), 1, 6, 8)


@pytest.fixture(scope="module")
def pcd3(ts):
    return cloud(ts, XYZ, points3.tobytes(), 2, 3, 12)


@pytest.fixture(scope="module")
def pcd4(ts):
    return cloud(ts, STRUCT_FIELDS, struct_points.tobytes(), 1, 6, struct_points.itemsize)


@pytest.fixture(scope="module")
def pcd5(ts):
    return cloud(ts, [("x", 0, FLOAT32, 3)], points.tobytes(), 1, 6, 12)


@pytest.fixture(scope="module")
def pcd6(ts):
    return cloud(ts, STRUCT_FIELDS_6, struct_points_6.tobytes(), 1, 6, struct_points_6.itemsize)


# ------------------------------------------------------------------------------------ reading

def test_read_points(pcd):
    assert np.allclose(structured_to_unstructured(pc2.cloud_to_array(pcd)), pylist, equal_nan=True)


def test_read_points_field(pcd):
    selected = structured_to_unstructured(pc2.cloud_to_array(pcd)[["x", "z"]])
    assert selected.shape == points[:, [0, 2]].shape
    assert np.allclose(selected, points[:, [0, 2]], equal_nan=True)


def test_read_points_skip_nan(pcd):
    """Upstream: read_points(skip_nans=True). Here a Frame drops the NaN point."""
    xyzi, _ = pc2.cloud_to_points(pcd)
    cam = CameraModel(np.array([[10.0, 0, 1.5], [0, 10.0, 1.5], [0, 0, 1]]), 4, 4)
    frame = Frame(1, xyzi, np.zeros((4, 4, 3), np.uint8), cam)
    points_nonan = points[~np.any(np.isnan(points), axis=1)]
    assert frame.points[:, :3].shape == points_nonan.shape and frame.dropped_points == 1
    assert np.allclose(frame.points[:, :3], points_nonan, equal_nan=False)


def test_read_points_list(pcd):
    assert np.allclose(np.array(pc2.cloud_to_array(pcd).tolist()), points, equal_nan=True)


def test_read_points_organized(pcd3):
    assert np.allclose(structured_to_unstructured(pc2.cloud_to_array(pcd3)), pylist, equal_nan=True)
    organized = pc2.cloud_to_array(pcd3, organized=True)
    assert organized.shape == (2, 3)  # (height, width)
    assert np.allclose(structured_to_unstructured(organized), points3, equal_nan=True)


def test_read_points_numpy(pcd):
    xyzi, extra = pc2.cloud_to_points(pcd)
    assert np.allclose(xyzi[:, :3], points, equal_nan=True) and extra == {}
    assert not xyzi[:, 3].any()  # no intensity field: zeros


def test_read_points_numpy_same_types(pcd4):
    """Upstream: read_points_numpy asserts one dtype for all fields. Mixed types read fine here;
    what cloud_to_points needs is x, y, z, and it says which fields the cloud has instead."""
    assert pc2.cloud_to_array(pcd4).dtype.names == ("a", "b", "c")
    with pytest.raises(pc2.CloudError, match=r"no x, y, z field\(s\); fields present: \['a', 'b', 'c'\]"):
        pc2.cloud_to_points(pcd4)


def test_read_points_numpy_specific_fields(pcd6):
    assert structured_to_unstructured(pc2.cloud_to_array(pcd6)[["a", "b"]]).shape == (6, 2)


def test_read_points_different_types(pcd4):
    arr = pc2.cloud_to_array(pcd4)
    assert all(np.allclose(arr[name], struct_points[name], equal_nan=True)
               for name in struct_points.dtype.names)
    assert arr.dtype == struct_points.dtype


def test_read_points_non_one_count(pcd5):
    arr = pc2.cloud_to_array(pcd5)
    assert np.allclose(arr["x"], points, equal_nan=True)


def test_read_points_non_one_count_structured(pcd5):
    arr = pc2.cloud_to_array(pcd5)
    assert arr.dtype.names == ("x",) and arr["x"].shape == (6, 3)  # one subarray field
    assert np.allclose(structured_to_unstructured(arr), points, equal_nan=True)
    with pytest.raises(pc2.CloudError, match="no y, z field"):
        pc2.cloud_to_points(pcd5)


def test_read_cloud_with_non_standard_point_step(ts):
    itemsize = 123  # larger than the fields need
    padded = np.array(unstructured_to_structured(points), dtype=np.dtype(
        {"names": ["x", "y", "z"], "formats": ["<f4"] * 3, "offsets": [0, 4, 8], "itemsize": itemsize}))
    pc = cloud(ts, XYZ, padded.tobytes(), 1, padded.shape[0], itemsize)
    xyzi, _ = pc2.cloud_to_points(pc)
    assert np.allclose(points, xyzi[:, :3], equal_nan=True)


# ------------------------------------------------------------------------------------ writing

def xyz_array(values: np.ndarray) -> np.ndarray:
    return unstructured_to_structured(np.asarray(values, np.float32),
                                      dtype=np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4")]))


def make(ts, fac, array, frame_id="frame"):
    return cdr(ts, rm.make_cloud(fac, rm.make_header(fac, 0, frame_id), array))


def test_create_cloud(ts, fac, pcd):
    assert as_tuple(make(ts, fac, xyz_array(pylist))) == as_tuple(pcd)
    assert as_tuple(make(ts, fac, xyz_array(pylist), "frame2")) != as_tuple(pcd)
    yz = unstructured_to_structured(points[:, 1:], dtype=np.dtype([("y", "<f4"), ("z", "<f4")]))
    assert as_tuple(make(ts, fac, yz)) != as_tuple(pcd)


def test_create_cloud_itemsize(ts, fac):
    """Upstream needs point_step for a padded array; the array's itemsize is the point_step."""
    msg = make(ts, fac, points_end_padding)
    assert msg.point_step == 20 and msg.row_step == 20 * 6
    assert np.allclose(structured_to_unstructured(pc2.cloud_to_array(msg)), points, equal_nan=True)


def test_create_cloud_different_types(ts, fac, pcd4):
    msg = make(ts, fac, struct_points)
    assert as_tuple(msg) == as_tuple(pcd4)
    assert not msg.is_dense  # field b holds a NaN: not dense, although there is no x, y, z


def test_create_cloud_xyz32(ts, fac, pcd):
    assert as_tuple(make(ts, fac, xyz_array(pylist))) == as_tuple(pcd)


def test_create_cloud_xyz32_organized(ts, fac, pcd3):
    msg = make(ts, fac, xyz_array(points3.reshape(-1, 3)).reshape(2, 3))
    assert (msg.height, msg.width) == (2, 3)  # (rows, points per row), as PointCloud2.msg says
    assert as_tuple(msg) == as_tuple(pcd3)


def test_create_cloud__non_one_count(ts, fac, pcd5):
    arr = np.zeros(6, dtype=[("x", "<f4", (3,))])
    arr["x"] = points
    msg = make(ts, fac, arr)
    assert as_tuple(msg) == as_tuple(pcd5)
    assert not msg.is_dense  # the NaN sits in element 1 of the count-3 field


def test_is_dense_only_when_every_float_value_is_finite(ts, fac):
    arr = pc2.points_cloud_array(np.ones((4, 4), np.float32),
                                {"normal": np.ones((4, 3), np.float32), "ring": np.zeros(4, np.uint16)})
    assert make(ts, fac, arr).is_dense
    for field, index in (("intensity", 2), ("normal", (1, 2))):
        bad = arr.copy()
        bad[field][index] = np.nan
        assert not make(ts, fac, bad).is_dense, field
    # a packed colour is a bit pattern (alpha 255 and red >= 128 make a NaN pattern): not looked at
    rgb = np.zeros(2, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
    rgb["rgb"] = np.array([0xFF902030, 0xFFC05060], np.uint32).view(np.float32)
    assert np.isnan(rgb["rgb"]).all() and make(ts, fac, rgb).is_dense
