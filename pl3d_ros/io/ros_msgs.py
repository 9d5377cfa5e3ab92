"""ROS 2 message <-> numpy conversion: the only module of pl3d_ros that knows message layouts.

Covers sensor_msgs PointCloud2, Image, CameraInfo, std_msgs Header / builtin_interfaces Time and
tf2_msgs TFMessage.

Every reader here is duck-typed: it takes any object with the message's attributes, so the same
code serves rclpy messages (``data`` an ``array.array('B')``, ``d/k/r/p`` ``array.array('d')`` or
numpy arrays, ``fields`` a list of PointField objects), rosbags messages (numpy arrays everywhere;
deserialised arrays are read-only views onto the raw CDR buffer, never written to here) and plain
objects such as ``types.SimpleNamespace`` with ``data`` as ``bytes``.

Every writer goes through a :class:`MessageFactory`, which holds the message classes and two hooks
for the array fields, so the same builders make rosbags messages (``rosbags_factory``) and rclpy
messages (the factory in ``node.py``). Nothing here imports rclpy or sensor_msgs_py.

All conversions are vectorised: a cloud is read through one numpy structured dtype with the
message's offsets and ``itemsize = point_step``, laid over the message buffer without a copy;
only the fields asked for are copied out. Nothing loops in Python over points or pixels.

Units: metres for points, pixels for intrinsics, nanoseconds for stamps.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pl3d_ros.frame import CameraModel, FrameError, check_rigid
from pl3d_ros.transforms import make_transform, matrix_to_quaternion

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# PointCloud2 -> numpy
# --------------------------------------------------------------------------------------------------

#: sensor_msgs/PointField datatype constants.
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = 1, 2, 3, 4, 5, 6, 7, 8

#: PointField datatype -> numpy type code without byte order (the order comes from is_bigendian).
DATATYPE_CODES = {
    INT8: "i1", UINT8: "u1", INT16: "i2", UINT16: "u2",
    INT32: "i4", UINT32: "u4", FLOAT32: "f4", FLOAT64: "f8",
}
DATATYPE_NAMES = {
    INT8: "INT8", UINT8: "UINT8", INT16: "INT16", UINT16: "UINT16",
    INT32: "INT32", UINT32: "UINT32", FLOAT32: "FLOAT32", FLOAT64: "FLOAT64",
}
_KIND_SIZE_TO_DATATYPE = {(np.dtype(code).kind, np.dtype(code).itemsize): dt
                          for dt, code in DATATYPE_CODES.items()}

#: Largest PointField.count read: numpy subarray dimensions are C ints (< 2^31).
MAX_FIELD_COUNT = 2**31 - 1

#: Field names tried, in order, for the intensity channel when none is given. Ouster clouds carry
#: both ``intensity`` and ``reflectivity``; ``intensity`` wins.
INTENSITY_FIELDS = ("intensity", "i", "reflectivity")


class MessageError(ValueError):
    """A message is malformed or unsupported (base of CloudError, ImageError)."""


class CloudError(MessageError):
    """A PointCloud2 (or a structured array meant to become one) is malformed or unsupported."""


class ImageError(MessageError):
    """A sensor_msgs/Image is malformed or has an unsupported encoding."""


def _byte_array(data: Any) -> np.ndarray:
    """View any bytes-like message payload as a 1-D uint8 array, without copying when possible.

    Accepts numpy arrays (rosbags; possibly read-only), ``array.array`` (rclpy), ``bytes``,
    ``bytearray``, ``memoryview``, and as a slow fallback a sequence of ints.
    """
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        mv = memoryview(data)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)  # list of ints: slow but correct
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


def _fields_of(msg: Any) -> list[tuple[str, int, int, int]]:
    """(name, offset, datatype, count) of every PointField; plain 4-tuples are accepted too."""
    out = []
    for f in msg.fields:
        if isinstance(f, tuple):
            name, offset, datatype, count = f
        else:
            name, offset, datatype, count = f.name, f.offset, f.datatype, f.count
        out.append((str(name), int(offset), int(datatype), int(count)))
    return out


def _is_padding(name: str) -> bool:
    # PCL names padding fields "_"; an empty name cannot be a numpy field either.
    return name.strip("_") == ""


def _wire_dtype(fields: list[tuple[str, int, int, int]], point_step: int, big_endian: bool,
                strict: bool = True) -> np.dtype:
    """The structured dtype of one point exactly as it lies in the message buffer.

    Fields with ``count > 1`` become numpy subarrays of shape (count,). ``count == 0``, which some
    drivers send, is read as 1. With ``strict`` every field must end within ``point_step``.
    """
    order = ">" if big_endian else "<"
    names, formats, offsets = [], [], []
    end = 0
    for name, offset, datatype, count in fields:
        if _is_padding(name):
            continue
        if datatype not in DATATYPE_CODES:
            raise CloudError(
                f"field {name!r} has unknown PointField datatype {datatype}; known: "
                + ", ".join(f"{k}={v}" for k, v in DATATYPE_NAMES.items())
            )
        if name in names:
            raise CloudError(f"field {name!r} appears twice in the cloud's fields")
        if count < 0 or count > MAX_FIELD_COUNT:
            # uint32 on the wire; numpy subarray dimensions are C ints, so 2^31 and more cannot
            # be expressed (and no point holds 2 GB of one field).
            raise CloudError(f"field {name!r} has count {count}; at most {MAX_FIELD_COUNT} is "
                             "supported")
        count = max(count, 1)
        base = np.dtype(order + DATATYPE_CODES[datatype])
        size = base.itemsize * count
        if offset < 0:
            raise CloudError(f"field {name!r} has negative offset {offset}")
        if strict and offset + size > point_step:
            raise CloudError(
                f"field {name!r} ({DATATYPE_NAMES[datatype]} x{count}) at offset {offset} ends at "
                f"byte {offset + size}, beyond point_step {point_step}"
            )
        names.append(name)
        formats.append(base if count == 1 else (base, (count,)))
        offsets.append(offset)
        end = max(end, offset + size)
    itemsize = point_step if strict else max(point_step, end)
    try:
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": itemsize})
    except (ValueError, TypeError, OverflowError) as exc:
        # numpy's own limits (e.g. an itemsize beyond a C int on numpy 1.x)
        raise CloudError(f"cannot lay out points of {itemsize} bytes with fields "
                         f"{list(zip(names, offsets))}: {exc}") from exc


def _native_packed(dtype: np.dtype) -> np.dtype:
    """The same named fields, native byte order, packed (no padding), in the same order."""
    out = []
    for name in dtype.names:
        fdt = dtype.fields[name][0]
        out.append((name, fdt.base.newbyteorder("="), fdt.shape))
    return np.dtype(out)


def _cloud_view(msg: Any) -> np.ndarray:
    """A (height, width) structured view of the cloud onto its message buffer (no copy).

    The view's dtype is the wire dtype (message byte order, message offsets, itemsize point_step);
    rows are ``row_step`` bytes apart, so row padding is skipped by the strides. The view is
    read-only whenever the message buffer is.
    """
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    if height < 0 or width < 0:
        raise CloudError(f"cloud has negative size {height} x {width}")
    fields = _fields_of(msg)
    big = bool(msg.is_bigendian)
    if height * width == 0:
        dtype = _wire_dtype(fields, point_step, big, strict=False)
        _check_no_excess(_byte_array(msg.data).size, height, width, max(row_step, 0))
        return np.zeros((height, width), dtype)
    if point_step <= 0:
        raise CloudError(f"point_step is {point_step} for a cloud of {height} x {width} points")
    dtype = _wire_dtype(fields, point_step, big)
    if row_step < width * point_step:
        raise CloudError(
            f"row_step {row_step} is smaller than width * point_step = {width} * {point_step}"
        )
    buf = _byte_array(msg.data)
    need = height * row_step
    if buf.size < need:
        raise CloudError(
            f"cloud data is truncated: {buf.size} bytes, but height * row_step = "
            f"{height} * {row_step} = {need}"
        )
    _check_no_excess(buf.size, height, width, row_step)
    return np.ndarray((height, width), dtype=dtype, buffer=buf, strides=(row_step, point_step))


def _check_no_excess(size: int, height: int, width: int, row_step: int) -> None:
    """PointCloud2.msg: ``data`` is ``row_step * height`` bytes. More bytes than that mean that
    width, height or row_step undercount the points the data holds (a driver that sets width
    smaller than what it filled): reading only the first ``height * row_step`` bytes would
    silently drop points and, with a wrong row_step, misalign every row. So it is an error."""
    need = height * row_step
    if size > need:
        raise CloudError(
            f"cloud data holds {size} bytes, more than height * row_step = {height} * "
            f"{row_step} = {need} (PointCloud2 data is exactly row_step * height bytes): width "
            f"{width} / height {height} / row_step {row_step} do not describe the data"
        )


def cloud_to_array(msg: Any, *, organized: bool = False) -> np.ndarray:
    """Read a sensor_msgs/PointCloud2 into a structured numpy array.

    Args:
        msg: any object with the PointCloud2 attributes (height, width, fields, is_bigendian,
            point_step, row_step, data).
        organized: return (height, width) instead of (N,): rows are the cloud's ``height``
            axis, as PointCloud2.msg defines it (sensor_msgs_py's ``reshape_organized_cloud``
            returns (width, height) instead).

    Returns:
        (N,) structured array, N = height * width (organized clouds flattened row-major), with one
        field per named PointField, in the message's field order, in native byte order, packed
        (padding between fields and at the end of points and rows is dropped). It is a fresh,
        writable copy. Fields with ``count > 1`` are numpy subarrays of shape (count,); fields
        named ``""`` or ``"_"`` (PCL padding) are skipped. A zero-point cloud gives an empty array
        with the same fields.

    Raises:
        CloudError: data shorter or longer than height * row_step, row_step < width *
            point_step, a field ending beyond point_step, a field count of 2^31 or more, an
            unknown datatype, a duplicate field name, or point_step 0 with points present.
    """
    view = _cloud_view(msg)
    out = np.empty(view.shape, _native_packed(view.dtype))
    for name in view.dtype.names:
        # One vectorised (byte-swapping where needed) copy per field, never per point.
        out[name] = view[name]
    return out if organized else out.reshape(-1)


def cloud_field_names(msg: Any) -> list[str]:
    """Names of the PointFields of a cloud, in message order (padding fields included)."""
    return [f[0] for f in _fields_of(msg)]


def cloud_to_points(msg: Any, intensity_field: str | None = None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a PointCloud2 into the pipeline's (N, 4) points plus its other fields.

    Args:
        msg: any object with the PointCloud2 attributes.
        intensity_field: name of the field to use as intensity. None tries ``intensity``, ``i``,
            ``reflectivity`` in that order; if none exists intensity is zero (logged at debug).

    Returns:
        points: (N, 4) float32 x, y, z (metres, the cloud's frame) and intensity (the sensor's raw
            scale, not normalised), N = height * width, row-major for organized clouds. float64
            or integer fields are cast to float32. NaN / inf values are kept as they are:
            ``frame.Frame`` drops (and counts) points with a non-finite or far-off coordinate
            and zeroes (and counts) a non-finite intensity.
        extra: every other named field as its own native-order array, (N,) or (N, count) for
            count > 1 fields, e.g. ``label``, ``ring``, ``t``.

    Raises:
        CloudError: the cloud is malformed (see :func:`cloud_to_array`), has no x, y or z (the
            message names the fields present), has a multi-count x/y/z/intensity field, or lacks
            an explicitly requested intensity field.
    """
    view = _cloud_view(msg)
    names = view.dtype.names
    missing = [c for c in ("x", "y", "z") if c not in names]
    if missing:
        raise CloudError(
            f"cloud has no {', '.join(missing)} field(s); fields present: {list(names)}"
        )
    if intensity_field is not None:
        if intensity_field not in names:
            raise CloudError(
                f"intensity field {intensity_field!r} not in the cloud; fields present: "
                f"{list(names)}"
            )
        iname: str | None = intensity_field
    else:
        iname = next((c for c in INTENSITY_FIELDS if c in names), None)
    for c in ("x", "y", "z", iname):
        if c is not None and view.dtype.fields[c][0].shape != ():
            raise CloudError(f"field {c!r} has count {view.dtype.fields[c][0].shape[0]}, need 1")

    n = view.shape[0] * view.shape[1]
    points = np.empty(view.shape + (4,), dtype=np.float32)
    for j, c in enumerate(("x", "y", "z")):
        points[..., j] = view[c]
    if iname is None:
        points[..., 3] = 0.0
        log.debug("cloud has no intensity field (tried %s; present %s): intensity set to 0",
                  list(INTENSITY_FIELDS), list(names))
    else:
        points[..., 3] = view[iname]

    extra = {}
    for name in names:
        if name in ("x", "y", "z", iname):
            continue
        fdt = view.dtype.fields[name][0]
        extra[name] = view[name].astype(fdt.base.newbyteorder("="), order="C").reshape(
            (n,) + fdt.shape)
    return points.reshape(n, 4), extra


# --------------------------------------------------------------------------------------------------
# numpy -> PointCloud2
# --------------------------------------------------------------------------------------------------

#: The segmentation output point: x y z intensity (float32, 0..15), label (uint8, 16), 3 zero
#: padding bytes so confidence stays 4-byte aligned, confidence (float32, 20..23): 24 bytes.
SEGMENTATION_DTYPE = np.dtype({
    "names": ["x", "y", "z", "intensity", "label", "confidence"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "u1", "<f4"],
    "offsets": [0, 4, 8, 12, 16, 20],
    "itemsize": 24,
})
#: The visualization point: SEGMENTATION_DTYPE plus packed ``rgb`` float32 at 24: 28 bytes.
VISUALIZATION_DTYPE = np.dtype({
    "names": ["x", "y", "z", "intensity", "label", "confidence", "rgb"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "u1", "<f4", "<f4"],
    "offsets": [0, 4, 8, 12, 16, 20, 24],
    "itemsize": 28,
})


#: Float fields that hold a packed colour (a uint32 bit pattern), not a value: PCL packs
#: 0xAARRGGBB with alpha 255, which as a float32 is a NaN pattern whenever red >= 128.
PACKED_COLOUR_FIELDS = ("rgb", "rgba")


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Pack (N, 3) uint8 RGB into (N,) float32 the PCL/RViz way.

    The uint32 0x00RRGGBB is reinterpreted (not converted) as float32. With a zero top byte the
    bit patterns are tiny or denormal floats, never NaN; never do arithmetic on them (flush-to-zero
    would erase the colour), only copy them.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 2 or rgb.shape[1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (N, 3) uint8, got {rgb.shape} {rgb.dtype}")
    packed = ((rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8)
              | rgb[:, 2].astype(np.uint32))
    return packed.view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rgb`: (N,) float32 (or uint32) packed colour -> (N, 3) uint8 RGB."""
    packed = np.ascontiguousarray(packed).reshape(-1)
    if packed.dtype == np.float32:
        u = packed.view(np.uint32)
    elif packed.dtype == np.uint32:
        u = packed
    else:
        raise ValueError(f"packed rgb must be float32 or uint32, got {packed.dtype}")
    out = np.empty((u.shape[0], 3), dtype=np.uint8)
    out[:, 0] = (u >> 16) & 0xFF
    out[:, 1] = (u >> 8) & 0xFF
    out[:, 2] = u & 0xFF
    return out


def segmentation_cloud_array(points: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                             rgb: np.ndarray | None = None) -> np.ndarray:
    """Assemble the labeled output cloud as a structured array.

    Args:
        points: (N, 4) float32 x, y, z (metres), intensity.
        labels: (N,) uint8 train ids.
        confidence: (N,) float32 in [0, 1].
        rgb: optional (N, 3) uint8 colours; when given the result also has ``rgb`` (packed float32,
            see :func:`pack_rgb`) for RViz's RGB8 colour transformer.

    Returns:
        (N,) array of :data:`SEGMENTATION_DTYPE` (24 bytes a point) or, with rgb,
        :data:`VISUALIZATION_DTYPE` (28 bytes). Padding bytes are zero, so messages are
        deterministic and leak no memory contents.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 4:
        raise CloudError(f"points must be (N, 4) [x, y, z, intensity], got {points.shape}")
    n = points.shape[0]
    labels = np.asarray(labels)
    confidence = np.asarray(confidence)
    if labels.shape != (n,) or confidence.shape != (n,):
        raise CloudError(
            f"labels and confidence must be ({n},), got {labels.shape} and {confidence.shape}"
        )
    if labels.dtype != np.uint8 and (not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and (labels.min() < 0 or labels.max() > 255))):
        raise CloudError(f"labels must be integers in 0..255 for the uint8 field ({labels.dtype})")
    out = np.zeros(n, dtype=SEGMENTATION_DTYPE if rgb is None else VISUALIZATION_DTYPE)
    for j, c in enumerate(("x", "y", "z", "intensity")):
        out[c] = points[:, j]
    out["label"] = labels
    out["confidence"] = confidence
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape != (n, 3):
            raise CloudError(f"rgb must be ({n}, 3), got {rgb.shape}")
        out["rgb"] = pack_rgb(rgb)
    return out


def points_cloud_array(points: np.ndarray,
                       extra_fields: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Assemble an input-style cloud (e.g. for writing bags) as a structured array.

    Args:
        points: (N, 4) float x, y, z (metres), intensity; stored as float32.
        extra_fields: more per-point columns, each (N,) or (N, k) (a count-k field) of a type
            PointField can express, e.g. ``{"label": uint32 (N,)}``; kept in the given order.

    Returns:
        (N,) structured array: x, y, z, intensity float32 at offsets 0, 4, 8, 12, then each extra
        field at the next offset that is a multiple of its element size (natural alignment), the
        point size rounded up to the largest alignment (at least 4). Padding bytes are zero.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 4:
        raise CloudError(f"points must be (N, 4) [x, y, z, intensity], got {points.shape}")
    n = points.shape[0]
    extra = {name: np.asarray(v) for name, v in (extra_fields or {}).items()}
    names, formats, offsets = ["x", "y", "z", "intensity"], ["<f4"] * 4, [0, 4, 8, 12]
    end, align = 16, 4
    for name, v in extra.items():
        if name in names or _is_padding(name):
            raise CloudError(f"extra field name {name!r} is reserved or repeated")
        if v.ndim not in (1, 2) or v.shape[0] != n:
            raise CloudError(f"extra field {name!r} must be ({n},) or ({n}, k), got {v.shape}")
        base = v.dtype.newbyteorder("<")
        if (base.kind, base.itemsize) not in _KIND_SIZE_TO_DATATYPE:
            raise CloudError(
                f"extra field {name!r} has type {v.dtype}, which PointField cannot express"
            )
        offset = -(-end // base.itemsize) * base.itemsize
        names.append(name)
        formats.append(base if v.ndim == 1 else (base, (v.shape[1],)))
        offsets.append(offset)
        end = offset + base.itemsize * (v.shape[1] if v.ndim == 2 else 1)
        align = max(align, base.itemsize)
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                      "itemsize": -(-end // align) * align})
    out = np.zeros(n, dtype=dtype)
    for j, c in enumerate(("x", "y", "z", "intensity")):
        out[c] = points[:, j]
    for name, v in extra.items():
        out[name] = v
    return out


def pointfields_of(dtype: np.dtype) -> list[tuple[str, int, int, int]]:
    """PointField descriptions (name, offset, datatype, count) of a structured dtype.

    Subarray fields give count = their element count. Byte order is not part of a PointField (it
    is the cloud's is_bigendian), so it is ignored here.

    Raises:
        CloudError: not a structured dtype, or a field type PointField cannot express (bool,
            int64, float16, nested structures, ...).
    """
    dtype = np.dtype(dtype)
    if dtype.names is None:
        raise CloudError(f"need a structured dtype, got {dtype}")
    out = []
    for name in dtype.names:
        fdt, offset = dtype.fields[name][:2]
        base = fdt.base
        datatype = _KIND_SIZE_TO_DATATYPE.get((base.kind, base.itemsize))
        if base.names is not None or datatype is None:
            raise CloudError(
                f"field {name!r} has type {base}, which PointField cannot express; use one of "
                "int8/uint8/int16/uint16/int32/uint32/float32/float64"
            )
        count = int(np.prod(fdt.shape)) if fdt.shape else 1
        out.append((name, int(offset), datatype, count))
    return out


def _with_byteorder(dtype: np.dtype, order: str) -> np.dtype:
    """The same layout (names, offsets, itemsize) with every field in byte order ``order``."""
    formats = []
    for name in dtype.names:
        fdt = dtype.fields[name][0]
        base = fdt.base.newbyteorder(order)
        formats.append(base if not fdt.shape else (base, fdt.shape))
    return np.dtype({"names": list(dtype.names), "formats": formats,
                     "offsets": [dtype.fields[n][1] for n in dtype.names],
                     "itemsize": dtype.itemsize})


def cloud_fields(array: np.ndarray, *, is_bigendian: bool = False,
                 is_dense: bool | None = None) -> dict[str, Any]:
    """The PointCloud2 field values (all but the header) for a structured array.

    Args:
        array: (N,) structured array (an unorganized cloud: height 1, width N) or (H, W) (an
            organized cloud). The array's layout (offsets, padding, itemsize) becomes the point
            layout; numeric field types only (see :func:`pointfields_of`).
        is_bigendian: byte order of ``data``; the array is converted if its fields differ.
        is_dense: None computes it: True iff every value of every floating-point field
            (whatever its name, every element of a count > 1 field) is finite. PointCloud2.msg
            says "True if there are no invalid points", and a consumer that trusts it skips its
            NaN checks (sensor_msgs_py's ``read_points(skip_nans=True)`` does), so any NaN
            makes a cloud not dense. Packed colours (:data:`PACKED_COLOUR_FIELDS`) are bit
            patterns, not values, and are not looked at.

    Returns:
        dict with height, width, fields (list of (name, offset, datatype, count) tuples),
        is_bigendian, point_step, row_step (= width * point_step, no row padding), data (1-D
        uint8; a view of ``array`` when it is already contiguous and in the requested byte order,
        so do not modify ``array`` while the message is in use) and is_dense.
    """
    array = np.asarray(array)
    if array.dtype.names is None:
        raise CloudError(f"need a structured array, got dtype {array.dtype}")
    if array.ndim == 1:
        height, width = 1, array.shape[0]
    elif array.ndim == 2:
        height, width = array.shape
    else:
        raise CloudError(f"cloud array must be 1-D or 2-D, got shape {array.shape}")
    fields = pointfields_of(array.dtype)
    target = _with_byteorder(array.dtype, ">" if is_bigendian else "<")
    if array.dtype != target:
        converted = np.zeros(array.shape, dtype=target)
        for name in array.dtype.names:
            converted[name] = array[name]
        array = converted
    array = np.ascontiguousarray(array)
    if is_dense is None:
        is_dense = all(bool(np.isfinite(array[c]).all()) for c in array.dtype.names
                       if array.dtype.fields[c][0].base.kind == "f"
                       and c not in PACKED_COLOUR_FIELDS)
    point_step = array.dtype.itemsize
    return {
        "height": int(height),
        "width": int(width),
        "fields": fields,
        "is_bigendian": bool(is_bigendian),
        "point_step": int(point_step),
        "row_step": int(width * point_step),
        "data": array.reshape(-1).view(np.uint8),
        "is_dense": bool(is_dense),
    }


# --------------------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------------------

#: Supported sensor_msgs/Image encodings -> bytes per pixel.
IMAGE_ENCODINGS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2}


def _check_encoding(encoding: Any) -> str:
    enc = str(encoding).strip().lower()
    if enc not in IMAGE_ENCODINGS:
        raise ImageError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(IMAGE_ENCODINGS)}"
        )
    return enc


def image_to_rgb(msg: Any) -> np.ndarray:
    """Read a sensor_msgs/Image into RGB.

    Args:
        msg: any object with height, width, encoding, is_bigendian, step, data. Rows may be padded
            (step > width * bytes per pixel). Encodings: rgb8, bgr8, rgba8, bgra8 (alpha
            dropped), mono8 and mono16 (grey replicated to 3 channels; mono16 keeps its high byte,
            value >> 8, honouring is_bigendian).

    Returns:
        (H, W, 3) uint8 RGB, a fresh writable C-contiguous array.

    Raises:
        ImageError: unknown encoding (the message lists the supported ones), zero size, step
            smaller than a row, or data shorter than height * step.
    """
    enc = _check_encoding(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageError(f"image has zero size {width} x {height}")
    bpp = IMAGE_ENCODINGS[enc]
    if step < width * bpp:
        raise ImageError(f"step {step} is smaller than a {enc} row of {width} * {bpp} bytes")
    buf = _byte_array(msg.data)
    if buf.size < height * step:
        raise ImageError(
            f"image data is truncated: {buf.size} bytes, but height * step = "
            f"{height} * {step} = {height * step}"
        )
    if enc == "mono16":
        order = ">" if msg.is_bigendian else "<"
        grey16 = np.ndarray((height, width), dtype=np.dtype(order + "u2"), buffer=buf,
                            strides=(step, 2))
        grey = (grey16 >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    px = np.ndarray((height, width, bpp), dtype=np.uint8, buffer=buf, strides=(step, bpp, 1))
    if enc == "mono8":
        return np.repeat(px, 3, axis=2)
    if enc in ("rgb8", "rgba8"):
        return px[:, :, :3].copy()
    return px[:, :, 2::-1].copy()  # bgr8, bgra8


def rgb_to_image_fields(img: np.ndarray, encoding: str = "rgb8", *,
                        is_bigendian: bool = False) -> dict[str, Any]:
    """The sensor_msgs/Image field values (all but the header) for an RGB image.

    Args:
        img: (H, W, 3) uint8 RGB.
        encoding: one of :data:`IMAGE_ENCODINGS`. rgba8/bgra8 get alpha 255; mono8 is the
            ITU-R BT.601 luma (integer, rounded); mono16 is that luma * 257 (so >> 8 gives it back).
        is_bigendian: byte order of mono16 data; ignored for 8-bit encodings.

    Returns:
        dict with height, width, encoding, is_bigendian (0/1, the field is uint8), step
        (= width * bytes per pixel, no padding) and data (1-D uint8; for rgb8 a view of ``img``
        when it is C-contiguous).
    """
    enc = _check_encoding(encoding)
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ImageError(f"image must be (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    height, width = img.shape[:2]
    if height == 0 or width == 0:
        raise ImageError(f"image has zero size {width} x {height}")
    if enc == "rgb8":
        px = img
    elif enc == "bgr8":
        px = img[:, :, ::-1]
    elif enc in ("rgba8", "bgra8"):
        px = np.empty((height, width, 4), dtype=np.uint8)
        px[:, :, :3] = img if enc == "rgba8" else img[:, :, ::-1]
        px[:, :, 3] = 255
    else:
        rgb = img.astype(np.uint32)
        luma = (299 * rgb[:, :, 0] + 587 * rgb[:, :, 1] + 114 * rgb[:, :, 2] + 500) // 1000
        if enc == "mono8":
            px = luma.astype(np.uint8)
        else:
            px = (luma * 257).astype(">u2" if is_bigendian else "<u2")
    px = np.ascontiguousarray(px)
    return {
        "height": int(height),
        "width": int(width),
        "encoding": enc,
        "is_bigendian": int(bool(is_bigendian) and enc == "mono16"),
        "step": int(width * IMAGE_ENCODINGS[enc]),
        "data": px.reshape(-1).view(np.uint8),
    }


# --------------------------------------------------------------------------------------------------
# CameraInfo
# --------------------------------------------------------------------------------------------------

#: |P[:, :3] - K| above this (pixels) is a disagreement worth a warning (see _warn_p_vs_k);
#: calibration files print 5-6 significant digits, well below it.
P_K_TOLERANCE_PX = 1e-3
#: Distinct calibrations remembered for warn-once (bounded: a node runs for days).
_WARNED_MAX = 256
_warned_calibrations: dict[bytes, None] = {}
_warned_lock = threading.Lock()


def _warn_p_vs_k(K: np.ndarray, P: np.ndarray, D: np.ndarray, R: np.ndarray,
                 frame_id: str) -> None:
    """Warn (once per distinct calibration) when a raw camera's P[:, :3] disagrees with K
    although nothing explains the difference.

    For a distorted camera P[:, :3] is the rectified image's camera matrix and legitimately
    differs from K. With no distortion and R = I the two describe the same image and must be
    equal: if they differ, either K or P is wrong, or the topic carries a rectified image whose
    camera matrix is P. The raw model (K) is used, as before; the warning says so.
    """
    if np.any(D) or not np.allclose(R, np.eye(3), atol=1e-9) or not np.any(P[:, :3]):
        return
    diff = float(np.abs(P[:, :3] - K).max())
    if diff <= P_K_TOLERANCE_PX:
        return
    key = b"".join(np.ascontiguousarray(a, dtype=np.float64).tobytes() for a in (K, P, D, R))
    with _warned_lock:
        if key in _warned_calibrations:
            return
        if len(_warned_calibrations) >= _WARNED_MAX:
            _warned_calibrations.pop(next(iter(_warned_calibrations)))
        _warned_calibrations[key] = None
    log.warning(
        "CameraInfo of %r: P[:, :3] %s differs from K %s by up to %.3g px although the camera "
        "has no distortion and R = I; using K (the raw image). If the image topic is the "
        "rectified one, its camera matrix is P: fix the calibration or use rectified=True",
        frame_id, P[:, :3].round(3).tolist(), K.round(3).tolist(), diff)


def _floats(value: Any, n: int | None, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if n is not None and arr.size != n:
        raise FrameError(f"CameraInfo.{name} must have {n} values, got {arr.size}")
    return arr


def camera_model_from_info(info: Any, T_cam_lidar: np.ndarray, frame_id: str | None = None, *,
                           rectified: bool | None = None) -> CameraModel:
    """Build a CameraModel from a sensor_msgs/CameraInfo and the LiDAR -> camera extrinsics.

    ROS's CameraInfo describes two images: the raw one (K, D, distortion_model, in the camera's
    optical frame) and the rectified one (P, after rotating camera coordinates by R). The message
    does not say which one the image topic carries, a known ROS ambiguity; this function decides:

    * raw (the default when P's 4th column is zero, i.e. a monocular camera with P = [K'|0]):
      K from ``k``, D from ``d``, ``distortion_model``; R and P are ignored.
    * rectified (the default when P's 4th column is non-zero: the right camera of a stereo pair,
      or KITTI's P2 with its baseline offset, whose image is necessarily the rectified one; or
      forced with ``rectified=True`` for an ``image_rect`` topic): K' = P[:, :3], no distortion,
      and the rectification and P's offset are folded into the extrinsics, since
      P @ [R X; 1] = K' (R X + inv(K') P[:, 3])::

          T_cam_lidar' = [I | inv(K') @ P[:, 3]] @ [R | 0] @ T_cam_lidar

      With R = I (monocular cameras, most bag converters) this is [I | inv(K') P[:, 3]] @ T. For
      KITTI this means: P = P2, R = R0_rect, and T_cam_lidar = Tr_velo_to_cam (cam0's frame) give
      KITTI's own P2 @ R0_rect @ Tr. An all-zero R is read as identity.

    ``rectified=False`` forces the raw model even when P has an offset (the offset is then
    ignored, which is right only if T_cam_lidar already points to this camera's frame).

    Binning (binning_x/y > 1) and a region of interest (roi with non-zero size) are supported:
    CameraInfo's K and size refer to the full-resolution sensor, so the model is first cropped to
    the ROI, then binned with the pixel-centre convention of ``CameraModel.resized``
    (c' = (c + 0.5) / b - 0.5, f' = f / b, size // b).

    Args:
        info: any object with CameraInfo's attributes (height, width, distortion_model, d, k, r,
            p; optionally binning_x, binning_y, roi, header).
        T_cam_lidar: (4, 4) rigid transform, LiDAR (metres) -> this camera's optical frame.
        frame_id: recorded in the model; None takes ``info.header.frame_id``.
        rectified: None decides from P as above; True / False forces the choice.

    A raw camera without distortion whose P[:, :3] differs from K is logged as a warning, once
    per distinct calibration (K is used).

    Raises:
        FrameError: "camera not calibrated" for an all-zero K, malformed arrays, an R that is not
            a rotation, or anything CameraModel rejects.
    """
    K = _floats(info.k, 9, "k").reshape(3, 3)
    if not np.any(K):
        raise FrameError(
            "camera not calibrated: CameraInfo.k is all zero (the driver publishes no "
            "calibration; calibrate the camera or supply a camera_info_url)"
        )
    P = _floats(info.p, None, "p")
    if P.size == 0 or not np.any(P):
        P = np.hstack([K, np.zeros((3, 1))])  # uncalibrated P: the monocular convention [K|0]
    elif P.size != 12:
        raise FrameError(f"CameraInfo.p must have 12 values, got {P.size}")
    P = P.reshape(3, 4)
    if rectified is None:
        rectified = bool(np.any(P[:, 3] != 0.0))
    if frame_id is None:
        header = getattr(info, "header", None)
        frame_id = str(getattr(header, "frame_id", "")) if header is not None else ""

    T = check_rigid(T_cam_lidar, "T_cam_lidar")
    if rectified:
        Kp = P[:, :3].copy()
        R = _floats(getattr(info, "r", np.zeros(9)), None, "r")
        R = np.eye(3) if R.size == 0 or not np.any(R) else R.reshape(3, 3)
        Rh = np.eye(4)
        Rh[:3, :3] = R
        check_rigid(Rh, "CameraInfo.r (rectification rotation)")
        try:
            offset = np.linalg.solve(Kp, P[:, 3])
        except np.linalg.LinAlgError as exc:
            raise FrameError(f"CameraInfo.p[:, :3] is singular: {Kp.tolist()}") from exc
        A = np.eye(4)
        A[:3, 3] = offset
        T = A @ Rh @ T
        cam = CameraModel(Kp, int(info.width), int(info.height), T, "none", np.zeros(0),
                          frame_id)
    else:
        D = _floats(info.d, None, "d")
        R = _floats(getattr(info, "r", np.zeros(9)), None, "r")
        R = np.eye(3) if R.size != 9 or not np.any(R) else R.reshape(3, 3)
        _warn_p_vs_k(K, P, D, R, frame_id)
        cam = CameraModel(K, int(info.width), int(info.height), T,
                          str(info.distortion_model or "none"), D, frame_id)

    roi = getattr(info, "roi", None)
    if roi is not None and int(roi.width) > 0 and int(roi.height) > 0:
        x0, y0, w, h = int(roi.x_offset), int(roi.y_offset), int(roi.width), int(roi.height)
        if (x0, y0, w, h) != (0, 0, cam.width, cam.height):
            cam = cam.cropped(x0, y0, w, h)
    bx = max(int(getattr(info, "binning_x", 0) or 0), 1)
    by = max(int(getattr(info, "binning_y", 0) or 0), 1)
    if bx > 1 or by > 1:
        Kb = cam.K.copy()
        Kb[0, :2] /= bx
        Kb[1, 1] /= by
        Kb[0, 2] = (Kb[0, 2] + 0.5) / bx - 0.5
        Kb[1, 2] = (Kb[1, 2] + 0.5) / by - 0.5
        cam = CameraModel(Kb, cam.width // bx, cam.height // by, cam.T_cam_lidar,
                          cam.distortion_model, cam.D, cam.frame_id)
    return cam


def camera_info_fields(camera: CameraModel) -> dict[str, Any]:
    """The sensor_msgs/CameraInfo field values (all but header and roi) for a CameraModel.

    The camera is described as a monocular raw camera: r = identity, p = [K|0], no binning. An
    undistorted model ("none", which ROS does not define) is written as plumb_bob with five zero
    coefficients, the ROS convention that image_geometry understands; reading it back gives
    "none" again. T_cam_lidar is not part of CameraInfo (it belongs to TF).

    Returns:
        dict with height, width, distortion_model, d, k (9), r (9), p (12) as float64 numpy
        arrays, binning_x = binning_y = 0.
    """
    if camera.distortion_model == "none":
        model, d = "plumb_bob", np.zeros(5)
    else:
        model, d = camera.distortion_model, camera.D
    p = np.zeros((3, 4))
    p[:, :3] = camera.K
    return {
        "height": int(camera.height),
        "width": int(camera.width),
        "distortion_model": model,
        "d": np.array(d, dtype=np.float64).reshape(-1),
        "k": np.array(camera.K, dtype=np.float64).reshape(-1),
        "r": np.eye(3).reshape(-1),
        "p": p.reshape(-1),
        "binning_x": 0,
        "binning_y": 0,
    }


# --------------------------------------------------------------------------------------------------
# tf2_msgs/TFMessage
# --------------------------------------------------------------------------------------------------

def tf_message_transforms(msg: Any) -> list[tuple[int, str, str, np.ndarray]]:
    """The transforms of a tf2_msgs/TFMessage (or any object with its attributes).

    Returns:
        one (stamp_ns, parent, child, T_parent_child) per TransformStamped, where parent is
        ``header.frame_id``, child is ``child_frame_id`` and T_parent_child (4, 4) float64 maps
        child coordinates (metres) into the parent frame (the tf2 convention). The quaternion is
        normalised; a zero or non-finite one is a MessageError.
    """
    out = []
    for ts in msg.transforms:
        tr, rot = ts.transform.translation, ts.transform.rotation
        q = np.array([rot.x, rot.y, rot.z, rot.w], dtype=np.float64)
        t = np.array([tr.x, tr.y, tr.z], dtype=np.float64)
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))) or np.linalg.norm(q) < 1e-9:
            raise MessageError(
                f"transform {ts.header.frame_id!r} -> {ts.child_frame_id!r} is invalid: "
                f"translation {t.tolist()}, quaternion {q.tolist()}"
            )
        out.append((stamp_to_ns(ts.header), str(ts.header.frame_id), str(ts.child_frame_id),
                    make_transform(t, q)))
    return out


def make_tf_message(factory: MessageFactory,
                    transforms: list[tuple[int, str, str, np.ndarray]]) -> Any:
    """A tf2_msgs/TFMessage of (stamp_ns, parent, child, T_parent_child) tuples.

    T_parent_child is a (4, 4) rigid transform mapping child coordinates into parent (checked with
    ``frame.check_rigid``); its rotation becomes a unit quaternion (x, y, z, w), w >= 0.
    """
    stamped = []
    for stamp_ns, parent, child, T in transforms:
        T = check_rigid(T, f"transform {parent} -> {child}")
        q = matrix_to_quaternion(T[:3, :3])
        stamped.append(factory.TransformStamped(
            header=make_header(factory, stamp_ns, parent),
            child_frame_id=str(child),
            transform=factory.Transform(
                translation=factory.Vector3(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
                rotation=factory.Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                            w=float(q[3])),
            ),
        ))
    return factory.TFMessage(transforms=stamped)


# --------------------------------------------------------------------------------------------------
# Message construction: one set of builders for rosbags and rclpy
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MessageFactory:
    """The message classes the builders instantiate, and two array hooks.

    Builders call the classes with keyword arguments for every field (rosbags requires all of
    them; rclpy accepts them) and pass only Python int / bool / str scalars, since rclpy's setters
    assert ``isinstance(value, int)``, which numpy integers fail.

    The default hooks return numpy arrays, which is what rosbags wants (``rosbags_factory``).
    For rclpy (node.py), subclass and override ``bytes_field``: rclpy's uint8[] setter takes an
    ``array.array('B')`` as is but checks a bytes / list / numpy value element by element, ~100x
    slower for a cloud; build it with ``a = array.array('B'); a.frombytes(data.tobytes())``
    (``array.array('B', memoryview(data))`` copies element by element: 250 ms vs 6 ms for
    3 MB). rclpy's fixed-size
    float64[9]/[12] fields take numpy float64 arrays directly and ``d`` (float64[]) takes
    ``array.array('d', values)``.
    """

    Header: Any
    Time: Any
    PointCloud2: Any
    PointField: Any
    Image: Any
    CameraInfo: Any
    RegionOfInterest: Any
    # Only make_tf_message needs these (bags; the node talks to tf2 directly).
    TFMessage: Any
    TransformStamped: Any
    Transform: Any
    Vector3: Any
    Quaternion: Any

    def bytes_field(self, data: np.ndarray) -> Any:
        """1-D uint8 numpy data -> the library's uint8[] value."""
        return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)

    def float_array(self, values: np.ndarray) -> Any:
        """1-D float64 numpy values -> the library's float64[] / float64[N] value."""
        return np.ascontiguousarray(values, dtype=np.float64).reshape(-1)


def rosbags_factory(typestore: Any) -> MessageFactory:
    """A :class:`MessageFactory` of a rosbags typestore's message classes."""
    t = typestore.types
    return MessageFactory(
        Header=t["std_msgs/msg/Header"],
        Time=t["builtin_interfaces/msg/Time"],
        PointCloud2=t["sensor_msgs/msg/PointCloud2"],
        PointField=t["sensor_msgs/msg/PointField"],
        Image=t["sensor_msgs/msg/Image"],
        CameraInfo=t["sensor_msgs/msg/CameraInfo"],
        RegionOfInterest=t["sensor_msgs/msg/RegionOfInterest"],
        TFMessage=t["tf2_msgs/msg/TFMessage"],
        TransformStamped=t["geometry_msgs/msg/TransformStamped"],
        Transform=t["geometry_msgs/msg/Transform"],
        Vector3=t["geometry_msgs/msg/Vector3"],
        Quaternion=t["geometry_msgs/msg/Quaternion"],
    )


_NS = 1_000_000_000


def stamp_to_ns(header_or_stamp: Any) -> int:
    """Nanoseconds of a Header (its ``stamp``), a builtin_interfaces/Time (sec, nanosec) or an
    ``rclpy.time.Time`` (``nanoseconds``)."""
    stamp = getattr(header_or_stamp, "stamp", header_or_stamp)
    if hasattr(stamp, "sec"):
        return int(stamp.sec) * _NS + int(stamp.nanosec)
    if hasattr(stamp, "nanoseconds"):
        return int(stamp.nanoseconds)
    raise TypeError(f"not a Header or a time stamp: {type(header_or_stamp).__name__}")


def ns_to_stamp(factory: MessageFactory, ns: int) -> Any:
    """A builtin_interfaces/Time for ``ns`` nanoseconds (sec int32, nanosec in [0, 1e9))."""
    sec, nanosec = divmod(int(ns), _NS)
    if not -(2**31) <= sec < 2**31:
        raise ValueError(f"stamp {ns} ns does not fit builtin_interfaces/Time (int32 seconds)")
    return factory.Time(sec=int(sec), nanosec=int(nanosec))


def make_header(factory: MessageFactory, stamp_ns: int, frame_id: str) -> Any:
    """A std_msgs/Header."""
    return factory.Header(stamp=ns_to_stamp(factory, stamp_ns), frame_id=str(frame_id))


def make_cloud(factory: MessageFactory, header: Any, array: np.ndarray, *,
               is_bigendian: bool = False, is_dense: bool | None = None) -> Any:
    """A sensor_msgs/PointCloud2 of a structured array (layout as in :func:`cloud_fields`)."""
    f = cloud_fields(array, is_bigendian=is_bigendian, is_dense=is_dense)
    fields = [factory.PointField(name=n, offset=int(o), datatype=int(d), count=int(c))
              for n, o, d, c in f["fields"]]
    msg = factory.PointCloud2(
        header=header, height=f["height"], width=f["width"], fields=fields,
        is_bigendian=f["is_bigendian"], point_step=f["point_step"], row_step=f["row_step"],
        data=factory.bytes_field(np.zeros(0, np.uint8)), is_dense=f["is_dense"],
    )
    # Assigned after construction: a generated rclpy message's __init__ copies its uint8[]
    # argument into a new array.array, the property setter keeps an array.array('B') as is.
    msg.data = factory.bytes_field(f["data"])
    return msg


def make_image(factory: MessageFactory, header: Any, rgb: np.ndarray,
               encoding: str = "rgb8") -> Any:
    """A sensor_msgs/Image of (H, W, 3) uint8 RGB in ``encoding`` (see rgb_to_image_fields)."""
    f = rgb_to_image_fields(rgb, encoding)
    return factory.Image(
        header=header, height=f["height"], width=f["width"], encoding=f["encoding"],
        is_bigendian=f["is_bigendian"], step=f["step"], data=factory.bytes_field(f["data"]),
    )


def make_camera_info(factory: MessageFactory, header: Any, camera: CameraModel) -> Any:
    """A sensor_msgs/CameraInfo of a CameraModel (see camera_info_fields); full-image ROI."""
    f = camera_info_fields(camera)
    roi = factory.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return factory.CameraInfo(
        header=header, height=f["height"], width=f["width"],
        distortion_model=f["distortion_model"], d=factory.float_array(f["d"]),
        k=factory.float_array(f["k"]), r=factory.float_array(f["r"]),
        p=factory.float_array(f["p"]), binning_x=f["binning_x"], binning_y=f["binning_y"],
        roi=roi,
    )
