"""One way to read Frames from any input a command accepts: a SemanticKITTI sequence folder or a
ROS 2 bag (folder, .mcap or .db3)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pl3d_ros.frame import Frame
from pl3d_ros.io.bag import BagError, BagReader
from pl3d_ros.io.kitti import KittiSequence


@dataclass
class FrameSource:
    """Frames of one input; ``len`` is known for KITTI folders, None for bags until read."""

    path: Path
    kind: str  # "kitti" | "bag"
    length: int | None

    def frames(self) -> Iterator[Frame]:
        if self.kind == "kitti":
            yield from KittiSequence(self.path).frames()
        else:
            yield from BagReader(self.path).frames()


def open_source(path: str | Path) -> FrameSource:
    """Recognise ``path`` (KITTI folder if it holds velodyne/, else a bag); clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if (path / "velodyne").is_dir():
        return FrameSource(path, "kitti", len(KittiSequence(path)))
    if path.suffix in (".mcap", ".db3") or (path / "metadata.yaml").is_file() or any(path.glob("*.mcap")):
        return FrameSource(path, "bag", None)
    raise BagError(f"{path} is neither a SemanticKITTI sequence folder (no velodyne/) nor a ROS 2 bag "
                   "(no metadata.yaml, .mcap or .db3)")


def load_frames(paths: list[str | Path], *, require_labels: bool = False) -> list[Frame]:
    """All frames of all inputs in memory (training and evaluation sets are small here)."""
    frames: list[Frame] = []
    for p in paths:
        src = open_source(p)
        got = list(src.frames())
        if not got:
            raise BagError(f"{p}: no synchronized camera+LiDAR frames")
        if require_labels and any(f.labels is None for f in got):
            raise BagError(f"{p}: frames without ground-truth labels (a bag needs a 'label' field in "
                           "its PointCloud2, a KITTI folder a labels/ folder)")
        frames.extend(got)
    return frames
