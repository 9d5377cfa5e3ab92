"""The last k LiDAR scans, kept in the odometry frame and brought into the current LiDAR frame.

One scan of a 64-beam LiDAR puts few points on a small or distant image mask; the scans before it
saw the same static surfaces from other places. With the LiDAR's pose T_odom_lidar of each scan
(``Frame.pose``, from odometry), :class:`ScanHistory` stores every scan in the odometry frame and
maps the held points into the frame of the scan now being refined:

    p_now = inv(T_odom_lidar(now)) @ T_odom_lidar(then) @ p_then

Moving objects smear (they were elsewhere then): ``age`` lets a caller weight or drop old points.

Memory is bounded twice. At most ``k`` scans are held (adding one more drops the oldest). With
``voxel_m`` > 0 each scan keeps one point per voxel of the odometry frame as it is added, and
``recent`` returns one point per voxel over all held scans, so K is bounded by the occupied
volume, not by k times the scan size: overlapping scans of a surface add no duplicates of
points already there (they would inflate a mask's point count without adding coverage). The
point kept in a voxel is a measured one, not a centroid (a centroid at a class boundary would
belong to neither class): a labelled point before an unlabelled one, then the newest scan's.
0.1 m, the default, thins where points are dense and keeps them where they are sparse, which is
where masks lack points: of a KITTI HDL-64 scan (sequence 00, scan 0, 125k points) it keeps 48 %,
26 % within 10 m of the sensor, 57 % at 10-20 m, 90 % at 20-40 m and 99 % beyond (0.05 m keeps
74 %, 0.2 m 26 %). Points are stored as float32 odometry coordinates: 1 mm resolution 10 km from
the odometry origin.

ROS-free and vectorised (no Python loop over points). Units: metres, nanoseconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from pl3d_ros.frame import check_rigid
from pl3d_ros.transforms import invert

#: Voxel indices are packed into one int64 with this many bits per axis (signed, offset): with
#: 0.1 m voxels the odometry frame may extend +-105 km from its origin before keys wrap.
_KEY_BITS = 21
_KEY_OFFSET = 1 << (_KEY_BITS - 1)
_KEY_MASK = (1 << _KEY_BITS) - 1


def voxel_keys(points: np.ndarray, voxel_m: float) -> np.ndarray:
    """(N,) int64 key of the ``voxel_m`` cube holding each of ``points`` (N, 3), metres."""
    idx = np.floor(np.asarray(points, np.float64) / voxel_m).astype(np.int64) + _KEY_OFFSET
    idx &= _KEY_MASK  # beyond the packed range keys wrap: far apart points may share a voxel
    return (idx[:, 0] << (2 * _KEY_BITS)) | (idx[:, 1] << _KEY_BITS) | idx[:, 2]


def _first_per_voxel(keys: np.ndarray, *priority: np.ndarray) -> np.ndarray:
    """Sorted indices of one point per distinct key: the first by ``priority`` (arrays, most
    important first, smaller wins; ties by index)."""
    order = np.lexsort((*reversed(priority), keys))  # lexsort: the last key is the primary one
    sorted_keys = keys[order]
    first = np.ones(sorted_keys.shape[0], bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.sort(order[first])  # the input's order (newest scan first in recent())


@dataclass
class _Scan:
    points: np.ndarray  # (N, 3) float32, odometry frame
    labels: np.ndarray  # (N,) int64, -1 = none
    stamp_ns: int

    @property
    def nbytes(self) -> int:
        return self.points.nbytes + self.labels.nbytes


class ScanHistory:
    """The last ``k`` scans in the odometry frame (see the module docstring).

    Use per frame: ``recent(frame.pose)`` for the scans before it (in its LiDAR frame), then
    ``add(frame.points, frame.pose, labels, frame.stamp_ns)``. A frame without a pose (odometry
    lost) clears the history; so does a stamp that is not later than the newest held one (a bag
    that loops, a clock that jumps back): the poses before it belong to another trajectory.

    Args:
        k: scans held, >= 1.
        voxel_m: voxel edge in metres for the downsampling; 0 keeps every point.
    """

    def __init__(self, k: int, voxel_m: float = 0.1) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"ScanHistory needs k >= 1 scans, got {k!r}")
        if not np.isfinite(voxel_m) or voxel_m < 0:
            raise ValueError(f"voxel_m must be >= 0 metres (0 = no downsampling), got {voxel_m!r}")
        self.k = int(k)
        self.voxel_m = float(voxel_m)
        self._scans: deque[_Scan] = deque(maxlen=self.k)
        self.resets = 0  # times the history was cleared because odometry was lost or time went back

    def __len__(self) -> int:
        """Scans held."""
        return len(self._scans)

    @property
    def num_points(self) -> int:
        """Points held over all scans (before the cross-scan voxel merge of ``recent``)."""
        return sum(s.points.shape[0] for s in self._scans)

    @property
    def nbytes(self) -> int:
        """Bytes of point and label arrays held: 20 per point (float32 xyz + int64 label)."""
        return sum(s.nbytes for s in self._scans)

    @property
    def stamps_ns(self) -> list[int]:
        """Stamps of the held scans, oldest first."""
        return [s.stamp_ns for s in self._scans]

    def reset(self) -> None:
        """Forget every scan."""
        self._scans.clear()

    def add(self, points_lidar: np.ndarray, pose: np.ndarray | None, labels: np.ndarray | None,
            stamp_ns: int) -> None:
        """Keep one scan.

        Args:
            points_lidar: (N, 3) or (N, >= 3) points in the LiDAR frame (x, y, z first), metres.
            pose: (4, 4) T_odom_lidar of the scan, or None: odometry lost, the history is
                cleared and the scan is not kept.
            labels: (N,) integer labels (pseudo-labels; -1 = none), or None for all -1.
            stamp_ns: the scan's stamp, nanoseconds (required: a stamp not after the newest
                held one clears the history).
        """
        pts = np.asarray(points_lidar)
        if pts.ndim != 2 or pts.shape[1] < 3 or not np.issubdtype(pts.dtype, np.floating):
            raise ValueError(f"points must be a float (N, 3+) array, got {pts.dtype} {pts.shape}")
        n = pts.shape[0]
        if labels is None:
            lab = np.full(n, -1, np.int64)
        else:
            lab = np.asarray(labels)
            if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"labels must be ({n},) integers to match the points, got "
                                 f"{lab.dtype} {lab.shape}")
            lab = lab.astype(np.int64)
        if pose is None:
            if self._scans:
                self.resets += 1
            self.reset()
            return
        T = check_rigid(pose, "pose (T_odom_lidar)")
        stamp_ns = int(stamp_ns)
        if self._scans and stamp_ns <= self._scans[-1].stamp_ns:
            self.resets += 1
            self.reset()
        xyz = pts[:, :3].astype(np.float64)
        ok = np.isfinite(xyz).all(axis=1)  # a NaN point would poison its voxel's key
        # Keys from the stored float32 values, so that recent()'s merge sees the same voxels.
        odom = (xyz[ok] @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
        lab = lab[ok]
        if self.voxel_m > 0 and odom.shape[0]:
            keep = _first_per_voxel(voxel_keys(odom, self.voxel_m), lab < 0)
            odom, lab = odom[keep], lab[keep]
        self._scans.append(_Scan(odom, lab, stamp_ns))

    def recent(self, pose_now: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The held scans in the LiDAR frame of ``pose_now`` (T_odom_lidar of the current scan).

        Returns:
            points (K, 3) float32 metres in the current LiDAR frame, labels (K,) int64 (-1 none),
            age (K,) int64: scans added after the point's scan (0 = the newest held scan; the
            previous frame's when called before ``add`` of the current one). With ``voxel_m``
            one point per voxel of the odometry frame (labelled first, then newest). Empty when
            the history is empty or ``pose_now`` is None (no odometry now).
        """
        empty = (np.zeros((0, 3), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        if pose_now is None or not self._scans:
            return empty
        T_now_odom = invert(check_rigid(pose_now, "pose_now (T_odom_lidar)"))
        scans = list(reversed(self._scans))  # newest first
        pts = np.concatenate([s.points for s in scans])
        labels = np.concatenate([s.labels for s in scans])
        age = np.repeat(np.arange(len(scans), dtype=np.int64), [s.points.shape[0] for s in scans])
        if self.voxel_m > 0 and len(scans) > 1 and pts.shape[0]:
            keep = _first_per_voxel(voxel_keys(pts, self.voxel_m), labels < 0, age)
            pts, labels, age = pts[keep], labels[keep], age[keep]
        now = pts.astype(np.float64) @ T_now_odom[:3, :3].T + T_now_odom[:3, 3]
        return now.astype(np.float32), labels, age
