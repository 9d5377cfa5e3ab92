"""Odometry: the LiDAR's pose T_odom_lidar at a cloud's stamp, from recorded /tf samples (bags)
or from tf2 (the node). ROS-free; node.py does the tf2 calls.

Conventions (tf2's): a transform with parent P and child C maps C coordinates into P (T_P_C);
the odometry frame is the parent, so a pose is T_odom_lidar. Metres, nanoseconds.

Between two samples of a moving edge the transform is interpolated as tf2 does it: translation
linearly, rotation by slerp, at ratio (t - t0) / (t1 - t0). A stamp outside an edge's samples is
not covered (tf2 raises an ExtrapolationException there), except an exact match of the first or
last sample. So the offline reader and the node give a frame the same pose.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from pl3d_ros.frame import FrameError, check_rigid
from pl3d_ros.transforms import (TransformError, TransformTree, make_transform,
                                 matrix_to_quaternion)

#: The odometry frame pl3d_ros writes (``pl3d kitti2bag``, ``pl3d sim``) and looks up by default
#: (setting ``frames.odom_frame``). REP 105's name for a continuous, drifting world-fixed frame.
ODOM_FRAME = "odom"


def slerp(q0: np.ndarray, q1: np.ndarray, ratio: float) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions (x, y, z, w) along the shorter arc."""
    q0 = np.asarray(q0, np.float64)
    q1 = np.asarray(q1, np.float64)
    dot = float(q0 @ q1)
    if dot < 0.0:  # q and -q are the same rotation: take the short way round
        q1, dot = -q1, -dot
    if dot > 1.0 - 1e-12:  # (nearly) the same rotation: the arc is a line, and sin(0) divides
        q = q0 + ratio * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(min(dot, 1.0))
    s = np.sin(theta)
    return (np.sin((1.0 - ratio) * theta) * q0 + np.sin(ratio * theta) * q1) / s


def interpolate_transform(t0_ns: int, T0: np.ndarray, t1_ns: int, T1: np.ndarray,
                          t_ns: int) -> np.ndarray:
    """(4, 4) transform at ``t_ns`` between samples (t0_ns, T0) and (t1_ns, T1), as tf2 does it
    (translation lerp, rotation slerp). t0_ns == t1_ns gives T0."""
    if t1_ns == t0_ns:
        return np.array(T0, np.float64)
    ratio = (t_ns - t0_ns) / (t1_ns - t0_ns)
    q = slerp(matrix_to_quaternion(T0[:3, :3]), matrix_to_quaternion(T1[:3, :3]), ratio)
    t = T0[:3, 3] + ratio * (T1[:3, 3] - T0[:3, 3])
    return make_transform(t, q)


class _Edge:
    """Samples of one moving edge, appended in any order and sorted on first use."""

    def __init__(self) -> None:
        self._stamps: list[int] = []
        self._mats: list[np.ndarray] = []
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, stamp_ns: int, T: np.ndarray) -> None:
        self._stamps.append(int(stamp_ns))
        self._mats.append(np.asarray(T, np.float64))
        self._sorted = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(M,) int64 stamps strictly increasing, (M, 4, 4) transforms."""
        if self._sorted is None:
            stamps = np.asarray(self._stamps, np.int64)
            order = np.argsort(stamps, kind="stable")
            # A repeated stamp keeps the first sample recorded at it (a recorder's repeat).
            _, first = np.unique(stamps[order], return_index=True)
            keep = order[first]
            self._sorted = (stamps[keep], np.stack(self._mats)[keep])
        return self._sorted

    def at(self, stamp_ns: int) -> np.ndarray | None:
        stamps, mats = self.arrays()
        i = int(np.searchsorted(stamps, stamp_ns, side="left"))
        if i < len(stamps) and stamps[i] == stamp_ns:
            return mats[i].copy()
        if i == 0 or i == len(stamps):
            return None  # before the first or after the last sample: not covered
        return interpolate_transform(int(stamps[i - 1]), mats[i - 1], int(stamps[i]), mats[i],
                                     int(stamp_ns))

    def __len__(self) -> int:
        return len(self._stamps)


class TfHistory:
    """Recorded transforms: static edges (valid at every time) and time-stamped samples of
    moving edges, looked up at a stamp along any path between two frames.

    Memory: one (4, 4) float64 (128 bytes) per moving sample, e.g. 4.6 MB for an hour of one
    edge at 10 Hz.
    """

    def __init__(self) -> None:
        self._static: dict[tuple[str, str], np.ndarray] = {}
        self._edges: dict[tuple[str, str], _Edge] = {}

    def add_static(self, parent: str, child: str, T_parent_child: np.ndarray) -> None:
        """A /tf_static edge (maps ``child`` coordinates into ``parent``)."""
        self._static[(parent, child)] = np.asarray(T_parent_child, np.float64)

    def add(self, stamp_ns: int, parent: str, child: str, T_parent_child: np.ndarray) -> None:
        """One /tf sample of a moving edge at ``stamp_ns`` (the TransformStamped's header stamp)."""
        self._edges.setdefault((parent, child), _Edge()).add(stamp_ns, T_parent_child)

    @property
    def moving_edges(self) -> dict[tuple[str, str], int]:
        """{(parent, child): number of samples} of the moving edges."""
        return {k: len(e) for k, e in self._edges.items()}

    def lookup(self, target: str, source: str, stamp_ns: int) -> np.ndarray | None:
        """T_target_source (4, 4) at ``stamp_ns``, or None when no path between the frames is
        covered at that stamp (a missing edge, or a moving edge with no samples around it)."""
        tree = TransformTree()
        for (parent, child), T in self._static.items():
            tree.add(parent, child, T)
        for (parent, child), edge in self._edges.items():
            T = edge.at(stamp_ns)
            if T is not None:
                tree.add(parent, child, T)
        try:
            return tree.lookup(target, source)
        except TransformError:
            return None


class OdometryPoses:
    """The node's side of odometry: counts and validates the tf2 lookups of T_odom_lidar.

    node.py calls tf2's ``lookup_transform(odom_frame, lidar_frame, cloud stamp)`` (zero timeout:
    it never waits inside the synchronizer callback), then ``found(transform_stamped)`` or
    ``missed(reason)``; either way the frame goes on, without a pose when it was missed.
    ``odom_frame`` "" turns odometry off (no lookups).
    """

    def __init__(self, odom_frame: str = ODOM_FRAME) -> None:
        self.odom_frame = str(odom_frame)
        self._lock = threading.Lock()  # the diagnostics timer reads while the executor writes
        self.with_pose = 0
        self.without_pose = 0
        self.last_error = ""

    @classmethod
    def from_config(cls, cfg: Any) -> OdometryPoses:
        """From ``cfg.frames.odom_frame`` (a ``config.Config``)."""
        return cls(cfg.frames.odom_frame)

    @property
    def enabled(self) -> bool:
        return bool(self.odom_frame)

    def found(self, transform_stamped: Any) -> np.ndarray | None:
        """T_odom_lidar (4, 4) from a geometry_msgs/TransformStamped (header.frame_id = odom,
        child_frame_id = the LiDAR), or None (counted) when it is not a rigid transform."""
        from types import SimpleNamespace

        from pl3d_ros.io.msg_common import MessageError
        from pl3d_ros.io.ros_msgs import tf_message_transforms

        try:
            (_, parent, child, T), = tf_message_transforms(
                SimpleNamespace(transforms=[transform_stamped]))
            T = check_rigid(T, f"transform {child} -> {parent}")
        except (MessageError, FrameError) as exc:
            self.missed(f"unusable: {exc}")
            return None
        with self._lock:
            self.with_pose += 1
        return T

    def missed(self, reason: str) -> None:
        """A cloud whose pose could not be looked up (it goes on without one)."""
        with self._lock:
            self.without_pose += 1
            self.last_error = str(reason)

    def values(self) -> dict[str, str]:
        """Diagnostics key -> value."""
        with self._lock:
            return {"odometry_frame": self.odom_frame or "(off)",
                    "frames_with_odometry": str(self.with_pose),
                    "frames_without_odometry": str(self.without_pose),
                    "last_odometry_error": self.last_error}
