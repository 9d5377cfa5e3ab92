"""LiDAR -> camera extrinsics as the node finds them: a fixed matrix, or tf2 lookups cached per
(camera, LiDAR) frame pair. ROS-free; node.py does the tf2 calls.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from pl3d_ros.config import Config
from pl3d_ros.frame import check_rigid


class Extrinsics:
    """T_cam_lidar: the static-extrinsics setting, or tf2 lookups cached per frame pair.

    The node asks ``get`` on every synced set; a pair not known yet is remembered in ``wanted``,
    which a timer looks up in tf2 (never inside a message callback: a blocking lookup there can
    deadlock a single-threaded executor) and stores with ``store``. A camera-LiDAR mount is rigid,
    so a found transform is kept.
    """

    def __init__(self, static: Sequence[float] = (), camera_frame: str = "",
                 lidar_frame: str = "") -> None:
        self.static = (check_rigid(np.asarray(static, np.float64).reshape(4, 4), "static extrinsics")
                       if len(static) else None)
        self.camera_frame = camera_frame
        self.lidar_frame = lidar_frame
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str], np.ndarray] = {}
        self._wanted: set[tuple[str, str]] = set()

    @classmethod
    def from_config(cls, cfg: Config) -> Extrinsics:
        f = cfg.frames
        return cls(f.static_extrinsics, f.camera_frame, f.lidar_frame)

    def frames(self, camera_header_frame: str, lidar_header_frame: str) -> tuple[str, str]:
        """(camera, lidar) frame names: the settings where given, else the headers'."""
        return (self.camera_frame or camera_header_frame, self.lidar_frame or lidar_header_frame)

    def get(self, camera: str, lidar: str) -> np.ndarray | None:
        """T_cam_lidar, or None while it is not known (the pair is then wanted)."""
        if self.static is not None:
            return self.static
        with self._lock:
            T = self._known.get((camera, lidar))
            if T is None:
                self._wanted.add((camera, lidar))
            return T

    def wanted(self) -> list[tuple[str, str]]:
        """(camera, lidar) pairs asked for and not found yet."""
        with self._lock:
            return sorted(self._wanted)

    def store(self, camera: str, lidar: str, T_cam_lidar: np.ndarray) -> None:
        T = check_rigid(T_cam_lidar, f"transform {lidar} -> {camera}")
        with self._lock:
            self._known[(camera, lidar)] = T
            self._wanted.discard((camera, lidar))

    def store_transform(self, transform_stamped: Any) -> tuple[str, str]:
        """Store a geometry_msgs/TransformStamped from ``lookup_transform(camera, lidar, ...)``
        (header.frame_id = camera, child_frame_id = lidar); returns the pair."""
        from types import SimpleNamespace

        from pl3d_ros.io.ros_msgs import tf_message_transforms

        (_, parent, child, T), = tf_message_transforms(SimpleNamespace(transforms=[transform_stamped]))
        self.store(parent, child, T)
        return parent, child
