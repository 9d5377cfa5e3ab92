"""Shared fixtures: the real SemanticKITTI sample in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KITTI_ROOT = Path(os.environ.get("PL3D_KITTI_ROOT", REPO.parent / "shared" / "data" / "semantickitti-mini"))
PRETRAINED_ROOT = Path(os.environ.get("PL3D_PRETRAINED_ROOT", REPO.parent / "shared" / "pretrained"))


def kitti_sequence_dir(seq: str = "00") -> Path:
    """The folder of a SemanticKITTI sequence, or skip the test with the reason."""
    path = KITTI_ROOT / "sequences" / seq
    if not (path / "velodyne").is_dir():
        reason = f"SemanticKITTI sample not found at {path} (set PL3D_KITTI_ROOT)"
        if os.environ.get("PL3D_REQUIRE_DATA"):
            pytest.fail(reason)  # CI sets this: real-data tests must run there, not skip
        pytest.skip(reason)
    return path


def pretrained_path(name: str) -> Path:
    """A file or folder under ../shared/pretrained (third-party weights, never copied into the
    repo), or skip the test with the reason; CI (PL3D_REQUIRE_DATA) fails instead."""
    path = PRETRAINED_ROOT / name
    if not path.exists():
        reason = f"pretrained weights not found at {path} (set PL3D_PRETRAINED_ROOT)"
        if os.environ.get("PL3D_REQUIRE_DATA"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def kitti00() -> Path:
    return kitti_sequence_dir("00")


@pytest.fixture(scope="session")
def kitti_bag00(tmp_path_factory, kitti00) -> Path:
    """Sequence 00 converted once per session with `pl3d kitti2bag` (MCAP)."""
    from pl3d_ros.io.kitti import sequence_to_bag

    out = tmp_path_factory.mktemp("bags") / "s00"
    sequence_to_bag(kitti00, out)
    return out


@pytest.fixture(scope="session")
def synthetic_frames():
    """Four synthetic camera+LiDAR frames (test/fakes.py): no dataset needed."""
    from fakes import synthetic_frame

    return [synthetic_frame(i, seq=i) for i in range(4)]


@pytest.fixture(scope="session")
def synthetic_bag(tmp_path_factory):
    """Three synthetic frames as a bag in `pl3d kitti2bag`'s layout (labels, /tf_static)."""
    from fakes import write_synthetic_bag

    return write_synthetic_bag(tmp_path_factory.mktemp("synthetic") / "syn3")


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread. On a loaded 2-core machine two OpenMP threads spin-wait
    for each other and a 50 ms step takes seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- ROS message types without ROS (rosbags): one typestore per distro the node supports ---------

ROS_STORES = ("humble", "jazzy")


@pytest.fixture(scope="module", params=ROS_STORES)
def ts(request):
    """A rosbags typestore of ROS 2 Humble, then Jazzy."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore({"humble": Stores.ROS2_HUMBLE, "jazzy": Stores.ROS2_JAZZY}[request.param])


@pytest.fixture(scope="module")
def fac(ts):
    """The MessageFactory over ``ts``."""
    from pl3d_ros.io import ros_msgs

    return ros_msgs.rosbags_factory(ts)
