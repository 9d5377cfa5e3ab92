"""Simulated drives: frames at the LiDAR rate along a generated street, as data, Frames or a bag.

The bag has the layout ``pl3d kitti2bag`` writes (``io/kitti.py``): /camera/image_raw (rgb8),
/camera/camera_info, /lidar/points (x, y, z, intensity float32 + ``label`` uint32 holding the raw
SemanticKITTI label), one /tf_static transform velodyne -> camera_color_left_optical, and /tf
odom -> velodyne at each cloud's stamp (the world frame is the odometry frame: perfect
odometry). So ``io.bag.BagReader``, replay and evaluation read simulated and real drives alike.

Determinism: the world comes from ``seed``; each frame's sensor noise from (seed, frame index),
so frame i is the same whether simulated alone or in a sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pl3d_ros.frame import CameraModel, Frame
from pl3d_ros.io.kitti import CAMERA_FRAME, DEFAULT_START_NS, LIDAR_FRAME
from pl3d_ros.io.odometry import ODOM_FRAME
from pl3d_ros.sim.camera import render
from pl3d_ros.sim.lidar import scan
from pl3d_ros.sim.presets import SimPreset, get_preset
from pl3d_ros.sim.world import World, generate_world
from pl3d_ros.transforms import invert


@dataclass
class SimFrame:
    """One simulated frame.

    stamp_ns: nanoseconds; points (N, 4) float32 x, y, z (metres, LiDAR frame), intensity;
    labels (N,) uint32 raw SemanticKITTI labels; ring (N,) int16 beam of each point;
    image (H, W, 3) uint8 RGB; image_labels (H, W) uint32 raw label per pixel (0: sky);
    camera: intrinsics and T_cam_lidar; T_world_lidar (4, 4): the LiDAR's pose in the world
    (metres), which is the odometry frame of ``Frame.pose`` and of the bag's /tf.
    """

    seq: int
    stamp_ns: int
    points: np.ndarray
    labels: np.ndarray
    ring: np.ndarray
    image: np.ndarray
    image_labels: np.ndarray
    camera: CameraModel
    T_world_lidar: np.ndarray

    def to_frame(self) -> Frame:
        """The pl3d_ros Frame (ground truth as raw labels, like a SemanticKITTI frame; pose
        T_world_lidar)."""
        return Frame(self.stamp_ns, self.points, self.image, self.camera, self.labels, seq=self.seq,
                     lidar_frame_id=LIDAR_FRAME, pose=self.T_world_lidar)


class Simulator:
    """A preset's world for a drive of ``frames`` frames; frames can be made in any order."""

    def __init__(self, preset: str | SimPreset, frames: int, seed: int = 0, *,
                 start_ns: int = DEFAULT_START_NS) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.preset = get_preset(preset)
        self.frames = int(frames)
        self.seed = int(seed)
        self.start_ns = int(start_ns)
        self.period_s = 1.0 / self.preset.lidar.rate_hz
        self.world: World = generate_world(self.preset.world, self.seed, self.frames * self.period_s)
        self.camera = self.preset.camera.camera_model()
        self._T_base_lidar = np.eye(4)
        self._T_base_lidar[2, 3] = self.preset.lidar.mount_height

    def __len__(self) -> int:
        return self.frames

    def T_world_lidar(self, i: int) -> np.ndarray:
        """(4, 4) pose of the LiDAR at frame i."""
        return self.world.ego_pose(i * self.period_s) @ self._T_base_lidar

    def frame(self, i: int) -> SimFrame:
        """Frame i (0-based)."""
        if not 0 <= i < self.frames:
            raise IndexError(f"frame {i} outside 0..{self.frames - 1}")
        t = i * self.period_s
        rng = np.random.default_rng([self.seed, i])
        scene = self.world.scene_at(t)
        pose = self.T_world_lidar(i)
        lidar = scan(scene, pose, self.preset.lidar, rng)
        cam = render(scene, pose, self.camera, self.preset.lighting, rng,
                     max_range=self.preset.camera.max_range, texture_seed=self.seed)
        return SimFrame(i, self.start_ns + int(round(t * 1e9)), lidar.points, lidar.labels, lidar.ring,
                        cam.image, cam.labels, self.camera, pose)

    def __iter__(self) -> Iterator[SimFrame]:
        for i in range(self.frames):
            yield self.frame(i)


def simulate(preset: str | SimPreset, frames: int, seed: int = 0, *,
             start_ns: int = DEFAULT_START_NS) -> Iterator[SimFrame]:
    """``frames`` simulated frames of ``preset`` at the LiDAR rate (10 Hz)."""
    return iter(Simulator(preset, frames, seed, start_ns=start_ns))


def simulate_frames(preset: str | SimPreset, frames: int, seed: int = 0, *,
                    start_ns: int = DEFAULT_START_NS) -> Iterator[Frame]:
    """The same as pl3d_ros Frames with ground-truth raw labels (training without a bag)."""
    for f in simulate(preset, frames, seed, start_ns=start_ns):
        yield f.to_frame()


def write_bag(preset: str | SimPreset, frames: int, out_path: str | Path, seed: int = 0,
              storage: str = "mcap", progress: Callable[[int, int], None] | None = None, *,
              distro: str = "humble", start_ns: int = DEFAULT_START_NS, overwrite: bool = False) -> int:
    """Write a simulated drive as a ROS 2 bag (written aside and renamed into place on success,
    like ``kitti2bag``); returns the number of frames written. ``progress(done, total)`` is
    called after each frame; an existing ``out_path`` is an error unless ``overwrite``."""
    from pl3d_ros.io import bag as bagio

    sim = Simulator(preset, frames, seed, start_ns=start_ns)
    with bagio.BagWriter(out_path, storage=storage, distro=distro, overwrite=overwrite) as writer:
        for f in sim:
            if f.seq == 0:
                writer.write_static_transform(f.stamp_ns, LIDAR_FRAME, CAMERA_FRAME,
                                              invert(f.camera.T_cam_lidar))
            writer.write_transform(f.stamp_ns, ODOM_FRAME, LIDAR_FRAME, f.T_world_lidar)
            writer.write_frame(f.stamp_ns, f.points, f.image, f.camera, LIDAR_FRAME, CAMERA_FRAME,
                               {"label": f.labels})
            if progress:
                progress(f.seq + 1, sim.frames)
    return sim.frames
