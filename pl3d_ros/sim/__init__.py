"""Synthetic camera + LiDAR drives through procedural streets, for demos and domain-shift studies.

``simulate(preset, frames, seed)`` yields frames (points, raw labels, image, camera model);
``simulate_frames`` the same as pl3d_ros Frames; ``write_bag`` a ROS 2 bag laid out like
``pl3d kitti2bag``'s. Presets (``PRESETS``): source, sensor, night, layout, fog, mixed.
"""

from pl3d_ros.sim.presets import PRESETS, SimPreset, get_preset
from pl3d_ros.sim.sequence import SimFrame, Simulator, simulate, simulate_frames, write_bag

__all__ = ["PRESETS", "SimPreset", "SimFrame", "Simulator", "get_preset", "simulate",
           "simulate_frames", "write_bag"]
