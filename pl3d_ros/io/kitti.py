"""SemanticKITTI sequence folders: reading frames, and converting a sequence to a ROS 2 bag.

Calibration, and where KITTI's baseline offset goes
---------------------------------------------------
calib.txt gives P2 (3x4, the rectified projection of the left colour camera, image_2) and Tr (3x4,
LiDAR -> rectified camera 0). P2's fourth column is not zero: image_2 is 6 cm to the left of camera
0 (P2 = K [I | t]). A ROS user treats each camera as monocular with its own optical frame, with
CameraInfo P = [K | 0] (Tx = Ty = 0), and gets the camera's pose from TF. So the offset goes into
the extrinsics:

    K = P2[:, :3],   t = K^-1 P2[:, 3],   T_cam_lidar = [I | t] @ [Tr; 0 0 0 1]

and K @ (T_cam_lidar @ p)[:3] equals P2 @ Tr @ p exactly. In the bag, /tf_static carries
T_lidar_cam (parent ``velodyne``, child ``camera_color_left_optical``), the CameraInfo carries K,
zero distortion, R = I and P = [K | 0].

Odometry: poses.txt, and why the LiDAR's pose is inv(Tr) T_i Tr
----------------------------------------------------------------
Line i of poses.txt is T_i = T_w_cam0(i) (3x4): camera 0's pose in camera 0's frame at scan 0
(the world w of the file; T_0 = I). Tr = T_cam0_lidar. A point p in the LiDAR frame at scan i is
``Tr p`` in camera 0 at scan i and ``T_i Tr p`` in w. The odometry frame pl3d_ros uses is the LiDAR
frame at scan 0 (x forward, z up, like every LiDAR frame, where w has z forward and y down):
``p_odom = inv(Tr) p_w``. So

    T_odom_lidar(i) = inv(Tr) @ T_i @ Tr,      T_odom_lidar(0) = I

(SemanticKITTI's own tools use the same product). ``Frame.pose`` holds it; kitti2bag writes it as
/tf ``odom`` -> ``velodyne`` at each cloud's stamp. test/test_odometry.py checks it on the real
scans: static structure of scan j, moved by T_odom_lidar(0)^-1 T_odom_lidar(j), lands on scan 0's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pl3d_ros.frame import RIGID_TOLERANCE, CameraModel, Frame, FrameError
from pl3d_ros.io.odometry import ODOM_FRAME
from pl3d_ros.transforms import invert

log = logging.getLogger(__name__)

LIDAR_FRAME = "velodyne"
CAMERA_FRAME = "camera_color_left_optical"
#: KITTI times.txt starts at 0 s, but ROS treats a zero stamp as "unset" (TF lookups, sim time);
#: bags start at this epoch instead (2011-09-26, the first KITTI drive). Override with --start-time.
DEFAULT_START_NS = 1_317_000_000 * 1_000_000_000


class KittiError(ValueError):
    """A SemanticKITTI folder is missing files or holds malformed ones."""


def read_calib(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a KITTI calib.txt into {name: (3, 4) float64}."""
    out: dict[str, np.ndarray] = {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KittiError(f"cannot read calibration {path}: {exc}") from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, _, values = line.partition(":")
        try:
            mat = np.array(values.split(), dtype=np.float64)
        except ValueError as exc:
            raise KittiError(f"{path}:{n}: malformed values for {key.strip()}") from exc
        if mat.size != 12:
            raise KittiError(f"{path}:{n}: {key.strip()} has {mat.size} values, expected 12")
        out[key.strip()] = mat.reshape(3, 4)
    for key in ("P2", "Tr"):
        if key not in out:
            raise KittiError(f"{path}: no {key} line (found {sorted(out)})")
    return out


def read_poses(path: str | Path, calib: dict[str, np.ndarray]) -> np.ndarray:
    """poses.txt -> (M, 4, 4) float64 T_odom_lidar, the LiDAR's pose at each scan in the LiDAR
    frame of scan 0 (metres): inv(Tr) @ T_w_cam0 @ Tr (module docstring).

    Raises KittiError for a line that is not 12 numbers or a pose that is not rigid.
    """
    try:
        raw = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise KittiError(f"cannot read poses {path}: {exc}") from exc
    if raw.shape[1] != 12:
        raise KittiError(f"{path}: {raw.shape[1]} values per line, expected 12 (3x4 row-major)")
    T_w_cam = np.tile(np.eye(4), (raw.shape[0], 1, 1))
    T_w_cam[:, :3, :] = raw.reshape(-1, 3, 4)
    R = T_w_cam[:, :3, :3]
    err = np.abs(np.einsum("nij,nkj->nik", R, R) - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero((err > RIGID_TOLERANCE) | ~np.isfinite(err)
                         | (np.abs(np.linalg.det(R) - 1.0) > RIGID_TOLERANCE))
    if bad.size:
        raise KittiError(f"{path}:{bad[0] + 1}: pose is not a rigid transform "
                         f"(|R R^T - I|max = {err[bad[0]]:.2e}); {bad.size} such lines")
    Tr = np.vstack([calib["Tr"], [0.0, 0.0, 0.0, 1.0]])
    return invert(Tr) @ T_w_cam @ Tr


def camera_from_calib(calib: dict[str, np.ndarray], width: int, height: int) -> CameraModel:
    """The image_2 CameraModel: K from P2, P2's baseline offset folded into T_cam_lidar."""
    P2 = calib["P2"]
    K = P2[:, :3].copy()
    T_rect = np.eye(4)
    T_rect[:3, 3] = np.linalg.solve(K, P2[:, 3])
    Tr = np.vstack([calib["Tr"], [0.0, 0.0, 0.0, 1.0]])
    return CameraModel(K, width, height, T_rect @ Tr, "none", np.zeros(0), CAMERA_FRAME)


@dataclass(frozen=True)
class KittiSequence:
    """A SemanticKITTI sequence folder (velodyne/, labels/ optional, image_2/, calib.txt,
    times.txt, poses.txt optional: without it frames have no pose)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        object.__setattr__(self, "root", root)
        if not (root / "velodyne").is_dir():
            raise KittiError(f"{root} is not a SemanticKITTI sequence folder: no velodyne/ inside")
        for name in ("calib.txt", "times.txt", "image_2"):
            if not (root / name).exists():
                raise KittiError(f"{root}: missing {name}")
        ids = sorted(p.stem for p in (root / "velodyne").glob("*.bin"))
        if not ids:
            raise KittiError(f"{root}/velodyne holds no .bin scans")
        times = np.loadtxt(root / "times.txt", dtype=np.float64, ndmin=1)
        if times.size < int(ids[-1]) + 1:
            raise KittiError(f"{root}/times.txt has {times.size} stamps, scan {ids[-1]} needs more")
        object.__setattr__(self, "_ids", tuple(ids))
        object.__setattr__(self, "_times", times)
        object.__setattr__(self, "_calib", read_calib(root / "calib.txt"))

    @property
    def calib(self) -> dict[str, np.ndarray]:
        return self._calib

    @property
    def has_labels(self) -> bool:
        return (self.root / "labels" / f"{self._ids[0]}.label").is_file()

    def __len__(self) -> int:
        return len(self._ids)

    def stamp_ns(self, i: int, start_ns: int = DEFAULT_START_NS) -> int:
        """Stamp of frame i: start_ns + times.txt (rounded to the nanosecond)."""
        return int(start_ns) + int(round(self._times[int(self._ids[i])] * 1e9))

    @property
    def has_poses(self) -> bool:
        return (self.root / "poses.txt").is_file()

    def pose(self, i: int) -> np.ndarray | None:
        """(4, 4) T_odom_lidar of scan i (odom: the LiDAR frame of scan 0; read_poses), or None
        without poses.txt. poses.txt is read on first use."""
        poses = self.__dict__.get("_poses")
        if poses is None:
            if not self.has_poses:
                return None
            poses = read_poses(self.root / "poses.txt", self._calib)
            if poses.shape[0] < int(self._ids[-1]) + 1:
                raise KittiError(f"{self.root}/poses.txt has {poses.shape[0]} poses, scan "
                                 f"{self._ids[-1]} needs more")
            object.__setattr__(self, "_poses", poses)
        return poses[int(self._ids[i])].copy()

    def read_points(self, i: int) -> np.ndarray:
        """(N, 4) float32 x, y, z (metres), reflectance of scan i."""
        path = self.root / "velodyne" / f"{self._ids[i]}.bin"
        raw = np.fromfile(path, dtype=np.float32)
        if raw.size % 4:
            raise KittiError(f"{path}: size {raw.size * 4} bytes is not a multiple of 16 (N x 4 float32)")
        return raw.reshape(-1, 4)

    def read_labels(self, i: int) -> np.ndarray | None:
        """(N,) uint32 raw labels of scan i (semantic id in the lower 16 bits), or None."""
        path = self.root / "labels" / f"{self._ids[i]}.label"
        return np.fromfile(path, dtype=np.uint32) if path.is_file() else None

    def read_image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB image_2 of frame i."""
        path = self.root / "image_2" / f"{self._ids[i]}.png"
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise KittiError(f"cannot read image {path}: {exc}") from exc

    def camera(self, width: int, height: int) -> CameraModel:
        return camera_from_calib(self._calib, width, height)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Points (N, 4), labels (N,) or None, and image of frame i, as stored (nothing dropped)."""
        points, labels, image = self.read_points(i), self.read_labels(i), self.read_image(i)
        if labels is not None and labels.shape[0] != points.shape[0]:
            raise KittiError(
                f"{self.root}: scan {self._ids[i]} has {points.shape[0]} points but "
                f"{labels.shape[0]} labels"
            )
        return points, labels, image

    def frame(self, i: int, start_ns: int = DEFAULT_START_NS) -> Frame:
        """Frame i with ground-truth labels when the sequence has them."""
        points, labels, image = self.read(i)
        camera = self.camera(image.shape[1], image.shape[0])
        return Frame(self.stamp_ns(i, start_ns), points, image, camera, labels, seq=i,
                     lidar_frame_id=LIDAR_FRAME, pose=self.pose(i))

    def frames(self, start_ns: int = DEFAULT_START_NS) -> Iterator[Frame]:
        """All frames in order; a malformed frame is logged and skipped."""
        for i in range(len(self)):
            try:
                yield self.frame(i, start_ns)
            except (KittiError, FrameError) as exc:
                log.warning("skipping %s frame %s: %s", self.root, self._ids[i], exc)


def sequence_to_bag(
    seq_dir: str | Path,
    out: str | Path,
    *,
    storage: str = "mcap",
    start_ns: int = DEFAULT_START_NS,
    distro: str = "humble",
    max_frames: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a SemanticKITTI sequence as a ROS 2 bag; returns the number of frames written.

    Topics: /camera/image_raw (rgb8), /camera/camera_info, /lidar/points (x, y, z, intensity
    float32 + label uint32 holding the raw .label value when labels exist), /tf_static, and
    with poses.txt /tf: ``odom`` -> ``velodyne`` (T_odom_lidar, see read_poses) at each cloud's
    stamp, written before the frame's messages so that a player publishes it first.
    """
    from pl3d_ros.io import bag as bagio  # the writer lives with the reader

    seq = KittiSequence(seq_dir)
    n = len(seq) if max_frames is None else min(len(seq), max_frames)
    with bagio.BagWriter(out, storage=storage, distro=distro) as writer:
        for i in range(n):
            points, labels, image = seq.read(i)  # raw, so the bag reproduces the files exactly
            stamp = seq.stamp_ns(i, start_ns)
            camera = seq.camera(image.shape[1], image.shape[0])
            if i == 0:
                writer.write_static_transform(stamp, LIDAR_FRAME, CAMERA_FRAME,
                                              invert(camera.T_cam_lidar))
            pose = seq.pose(i)
            if pose is not None:
                writer.write_transform(stamp, ODOM_FRAME, LIDAR_FRAME, pose)
            extra = {"label": labels} if labels is not None else {}
            writer.write_frame(stamp, points, image, camera, LIDAR_FRAME, CAMERA_FRAME, extra)
            if progress:
                progress(i + 1, n)
    return n
