"""ROS 2 message <-> numpy conversion for everything but PointCloud2, and the message builders.

Covers sensor_msgs Image and CameraInfo, std_msgs Header / builtin_interfaces Time, tf2_msgs
TFMessage, and the :class:`MessageFactory` builders (``make_*``) for every message pl3d_ros writes,
clouds included. PointCloud2 layouts (reading clouds, building their structured arrays and field
values) are in ``io/point_cloud2.py``; ``make_cloud`` wraps its :func:`cloud_fields`.

Every reader here is duck-typed: it takes any object with the message's attributes, so the same
code serves rclpy messages (``data`` an ``array.array('B')``, ``d/k/r/p`` ``array.array('d')`` or
numpy arrays), rosbags messages (numpy arrays everywhere; deserialised arrays are read-only views
onto the raw CDR buffer, never written to here) and plain objects such as
``types.SimpleNamespace`` with ``data`` as ``bytes``.

Every writer goes through a :class:`MessageFactory`, which holds the message classes and two hooks
for the array fields, so the same builders make rosbags messages (``rosbags_factory``) and rclpy
messages (the factory in ``node.py``). Nothing here imports rclpy or sensor_msgs_py.

All conversions are vectorised: nothing loops in Python over pixels.

Units: pixels for intrinsics, metres for translations, nanoseconds for stamps.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pl3d_ros.frame import CameraModel, FrameError, check_rigid
from pl3d_ros.io.msg_common import MessageError, _byte_array
from pl3d_ros.io.point_cloud2 import cloud_fields
from pl3d_ros.transforms import make_transform, matrix_to_quaternion

log = logging.getLogger(__name__)


class ImageError(MessageError):
    """A sensor_msgs/Image is malformed or has an unsupported encoding."""


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
