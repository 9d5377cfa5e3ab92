"""One way to read Frames from any input a command accepts: a SemanticKITTI sequence folder or a
ROS 2 bag (folder, .mcap or .db3), with the reading options every command shares (topics,
synchronisation slop, extrinsics), and what each read skipped and why."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pl3d_ros.frame import Frame
from pl3d_ros.io.bag import BagError, BagReader, BagTopics
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.io.odometry import ODOM_FRAME


@dataclass(frozen=True)
class ReadOptions:
    """How to read a bag: topics (``BagTopics.given`` for names a user chose), the largest
    image-cloud stamp difference that pairs (s), extrinsics to use instead of the bag's TF
    ((4, 4) T_cam_lidar, None: from /tf_static or /tf), and the odometry frame of each Frame's
    pose ("" = none). KITTI folders need none of them (their poses come from poses.txt)."""

    topics: BagTopics = field(default_factory=BagTopics)
    slop_s: float = 0.05
    T_cam_lidar: np.ndarray | None = None
    odom_frame: str = ODOM_FRAME


@dataclass
class FrameSource:
    """Frames of one input; ``length`` is known for KITTI folders, None for bags until read.
    After ``frames()`` is exhausted, ``stats`` says what was read and skipped (a bag's
    synchronisation counts by reason, see ``io.bag.SyncStats``)."""

    path: Path
    kind: str  # "kitti" | "bag"
    length: int | None
    options: ReadOptions = field(default_factory=ReadOptions)
    stats: dict[str, Any] = field(default_factory=dict)

    def frames(self) -> Iterator[Frame]:
        if self.kind == "kitti":
            n = 0
            for frame in KittiSequence(self.path).frames():
                n += 1
                self.stats = {"frames": n, "frames_skipped": 0}
                yield frame
            self.stats = {"frames": n, "frames_skipped": 0}
            return
        o = self.options
        reader = BagReader(self.path, o.topics, slop_s=o.slop_s, T_cam_lidar=o.T_cam_lidar, odom_frame=o.odom_frame)
        n = 0
        try:
            for frame in reader.frames():
                n += 1
                yield frame
        finally:
            self.stats = {"frames": n, **reader.stats.to_dict()}


def open_source(path: str | Path, options: ReadOptions | None = None) -> FrameSource:
    """Recognise ``path`` (KITTI folder if it holds velodyne/, else a bag); clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if (path / "velodyne").is_dir():
        return FrameSource(path, "kitti", len(KittiSequence(path)), options or ReadOptions())
    if path.suffix in (".mcap", ".db3") or (path / "metadata.yaml").is_file() or any(path.glob("*.mcap")):
        return FrameSource(path, "bag", None, options or ReadOptions())
    raise BagError(f"{path} is neither a SemanticKITTI sequence folder (no velodyne/) nor a ROS 2 bag "
                   "(no metadata.yaml, .mcap or .db3)")


def load_frames(paths: list[str | Path], *, require_labels: bool = False,
                options: ReadOptions | None = None) -> list[Frame]:
    """All frames of all inputs in memory (training and evaluation sets are small here)."""
    frames: list[Frame] = []
    for p in paths:
        src = open_source(p, options)
        got = list(src.frames())
        if not got:
            raise BagError(f"{p}: no synchronized camera+LiDAR frames ({describe_skips(src.stats)})")
        if require_labels and any(f.labels is None for f in got):
            raise BagError(f"{p}: frames without ground-truth labels (a bag needs a 'label' field in "
                           "its PointCloud2, a KITTI folder a labels/ folder)")
        frames.extend(got)
    return frames


def describe_skips(stats: dict[str, Any]) -> str:
    """'corrupt_chunk 2, no_image 1' for a source's stats: the frames skipped by reason (a bag's
    ``SyncStats.skipped_frames``), what Frame construction dropped, and a bag that broke off."""
    reasons = {k: v for k, v in (stats.get("skipped_frames") or {}).items() if v}
    parts = [f"{k} {v}" for k, v in reasons.items()]
    for key in ("dropped_points", "dropped_far", "zeroed_intensity"):
        if stats.get(key):
            parts.append(f"{key} {stats[key]} (points)")
    text = ", ".join(parts) or "nothing skipped"
    if stats.get("truncated"):
        text += f"; the bag broke off: {stats.get('error')}"
    return text


def frames_skipped(stats: dict[str, Any]) -> int:
    """Clouds of an input that gave no Frame (0 for KITTI folders)."""
    return int(stats.get("frames_skipped", 0) or 0)
