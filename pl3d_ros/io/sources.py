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


@dataclass(frozen=True)
class ReadOptions:
    """How to read a bag: topics (``BagTopics.given`` for names a user chose), the largest
    image-cloud stamp difference that pairs (s), and extrinsics to use instead of the bag's TF
    ((4, 4) T_cam_lidar, None: from /tf_static or /tf). KITTI folders need none of them."""

    topics: BagTopics = field(default_factory=BagTopics)
    slop_s: float = 0.05
    T_cam_lidar: np.ndarray | None = None


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
                self.stats = {"frames": n, "skipped": 0}
                yield frame
            self.stats = {"frames": n, "skipped": 0}
            return
        o = self.options
        reader = BagReader(self.path, o.topics, slop_s=o.slop_s, T_cam_lidar=o.T_cam_lidar)
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


#: SyncStats counters that count what was seen, not what was skipped.
_SEEN = ("frames", "skipped", "synced", "clouds", "images", "camera_infos")


def describe_skips(stats: dict[str, Any]) -> str:
    """'no_image 2, out_of_order 1' for a source's stats (reports and errors)."""
    reasons = {k: v for k, v in stats.items()
               if k not in _SEEN and isinstance(v, int) and not isinstance(v, bool) and v}
    text = ", ".join(f"{k} {v}" for k, v in reasons.items()) or "nothing skipped"
    if stats.get("truncated"):
        text += f"; the bag broke off: {stats.get('error')}"
    return text
