"""sensor_msgs/PointCloud2 <-> numpy structured arrays and the pipeline's (N, 4) points.

Reads any PointCloud2 layout (PointField offsets, datatypes, counts, byte order, row padding) and
builds the clouds pl3d_ros writes: the segmentation / visualization output clouds and input-style
clouds for bags. Messages themselves are made by ``ros_msgs.make_cloud`` from
:func:`cloud_fields`; images, CameraInfo, tf and headers are in ``io/ros_msgs.py``.

Every reader here is duck-typed: it takes any object with the message's attributes, so the same
code serves rclpy messages (``data`` an ``array.array('B')``, ``fields`` a list of PointField
objects), rosbags messages (numpy arrays everywhere; deserialised arrays are read-only views onto
the raw CDR buffer, never written to here) and plain objects such as ``types.SimpleNamespace``
with ``data`` as ``bytes``. Nothing here imports rclpy or sensor_msgs_py.

All conversions are vectorised: a cloud is read through one numpy structured dtype with the
message's offsets and ``itemsize = point_step``, laid over the message buffer without a copy;
only the fields asked for are copied out. Nothing loops in Python over points.

Units: metres for points.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pl3d_ros.io.msg_common import MessageError, _byte_array

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


class CloudError(MessageError):
    """A PointCloud2 (or a structured array meant to become one) is malformed or unsupported."""


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

