"""What the ROS message modules share: the MessageError base and a uint8[] payload view.

``io/point_cloud2.py`` (PointCloud2 <-> numpy) and ``io/ros_msgs.py`` (images, CameraInfo, tf,
headers / stamps, the message builders) both raise subclasses of :class:`MessageError` and read
``data`` fields through :func:`_byte_array`; they live here so neither module imports the other
for them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class MessageError(ValueError):
    """A message is malformed or unsupported (base of CloudError, ImageError)."""


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

